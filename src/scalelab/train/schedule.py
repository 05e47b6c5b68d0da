"""Learning-rate schedules: linear warmup from 0, then cosine, linear or constant decay to min_lr,
or WSD (warmup-stable-decay): hold lr, then decay to min_lr over the last `decay` steps.

A pure function of the step, so a resumed run needs nothing but the step number to continue
the schedule exactly. WSD's stable phase does not depend on the run's length, so every WSD run
with the same warmup and peak agrees with a stable run (schedule "constant") up to its decay:
a branch from the stable run's checkpoint at step k with a decay of n steps is the WSD run of
k + n steps (train.branch_from).
"""

from __future__ import annotations

import math

DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


def learning_rate(step: int, *, lr: float, min_lr: float, warmup: int, total: int, schedule: str = "cosine",
                  decay: int = 0, decay_shape: str = "1-sqrt") -> float:
    """The learning rate for optimizer step `step` (0-based) of `total`.

    Warmup: lr · (step + 1) / warmup for step < warmup (the first step is never at lr 0).
    Then progress p = (step - warmup) / max(1, total - warmup - 1) runs 0 → 1 over the
    remaining steps, so the last step is at exactly min_lr:
      cosine:   min_lr + (lr - min_lr) · (1 + cos(π p)) / 2
      linear:   lr + (min_lr - lr) · p
      constant: lr (min_lr unused)
    wsd: lr until the last `decay` steps (decay ≥ 1), then over them p = (step - (total - decay) + 1) /
    decay runs 1/decay → 1 (each decay step is lower than the last; the last is at exactly min_lr):
      linear:   lr + (min_lr - lr) · p
      cosine:   min_lr + (lr - min_lr) · (1 + cos(π p)) / 2
      1-sqrt:   min_lr + (lr - min_lr) · (1 - √p)     (Hägele et al. 2024)
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "wsd":
        start = total - decay
        if step < start:
            return lr
        return decayed(lr, min_lr, min(1.0, (step - start + 1) / decay), decay_shape)
    p = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    if schedule == "cosine":
        return decayed(lr, min_lr, p, "cosine")
    if schedule == "linear":
        return decayed(lr, min_lr, p, "linear")
    raise ValueError(f"unknown schedule {schedule!r}")


def decayed(lr: float, min_lr: float, p: float, shape: str) -> float:
    """The learning rate a fraction p ∈ [0, 1] of the way through a decay from lr to min_lr."""
    if shape == "linear":
        return lr + (min_lr - lr) * p
    if shape == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "1-sqrt":
        return min_lr + (lr - min_lr) * (1.0 - math.sqrt(p))
    raise ValueError(f"unknown decay shape {shape!r}")
