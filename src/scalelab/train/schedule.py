"""Learning-rate schedules: linear warmup from 0, then cosine, linear or constant decay to min_lr.

A pure function of the step, so a resumed run needs nothing but the step number to continue
the schedule exactly.
"""

from __future__ import annotations

import math


def learning_rate(step: int, *, lr: float, min_lr: float, warmup: int, total: int, schedule: str = "cosine") -> float:
    """The learning rate for optimizer step `step` (0-based) of `total`.

    Warmup: lr · (step + 1) / warmup for step < warmup (the first step is never at lr 0).
    Then progress p = (step - warmup) / max(1, total - warmup - 1) runs 0 → 1 over the
    remaining steps, so the last step is at exactly min_lr:
      cosine:   min_lr + (lr - min_lr) · (1 + cos(π p)) / 2
      linear:   lr + (min_lr - lr) · p
      constant: lr (min_lr unused)
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    p = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "linear":
        return lr + (min_lr - lr) * p
    raise ValueError(f"unknown schedule {schedule!r}")
