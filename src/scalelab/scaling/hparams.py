"""Hyperparameter laws: the peak learning rate and global batch (tokens) of a compute-optimal run as power
laws of its training compute C, and the warmup, schedule and final learning rate that go with them.

The default is DeepSeek LLM's fit (DeepSeek-AI, "DeepSeek LLM: Scaling Open-Source Language Models with
Longtermism", arXiv 2401.02954, section 3.1, eq. 1):

    eta_opt = 0.3118 * C^-0.1250        B_opt = 0.2920 * C^0.3271  (tokens)

Their C is M * D with M the *non-embedding* training FLOPs per token (section 3.2: M = 72 n_layer d^2 +
6 n_layer d l_seq): every GEMM of the blocks, three times forward (backward = two forwards), plus causal
attention counted at half the score matrix, and neither the vocabulary projection nor the embedding.
A law says which C it takes in `compute`:
- "non_embedding" (DeepSeek's): C = non_embedding_flops_per_token(cfg, seq_len) * D, which is scalelab's exact
  training FLOPs per token minus the lm_head's 6 * n_embd * vocab and minus half of attention's
  12 * n_layer * seq_len * n_embd (our count, like FlopCounterMode, does the full score matrix);
- "training": scalelab's exact training FLOPs (counting.training_flops_per_token * D), the C a sweep logs and
  what `scalelab fit` uses when it fits a law from runs.
`hyperparameters_for(cfg, seq_len, tokens, law)` does this conversion; `hyperparameters(compute, law)` takes
C already in the law's convention.

DeepSeek trained with AdamW (0.9, 0.95), weight decay 0.1, 2000 warmup steps and a multi-step schedule
ending at 10% of the peak (which they found equal to cosine); the default keeps the 10% end (min_lr) with
a cosine decay (the trainer's), and caps the 2000 warmup steps at a tenth of a short run.

A width rule (`kind = "width"`) instead scales a base learning rate inversely with the width
(lr = base_lr * base_width / n_embd, the muP-style rule benchmarks/ladder_shakespeare.py used) and keeps the
compute law for the batch.

A law file (what `scalelab fit --out` writes) may carry a fitted law under the key "hyperparameters":
{"lr": {"coef": c, "exponent": e}, "batch_tokens": {"coef": c, "exponent": e}, "compute": "training", ...};
`hyperparameter_law_from_file(path)` reads it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from scalelab.errors import UserError

COMPUTE_CONVENTIONS = ("non_embedding", "training")
KINDS = ("compute", "width")
SCHEDULES = ("cosine", "linear", "constant", "wsd")


@dataclass(frozen=True)
class HyperparameterLaw:
    """eta_opt = lr_coef * C^lr_exponent, B_opt = batch_coef * C^batch_exponent tokens, C in `compute`'s convention."""
    lr_coef: float
    lr_exponent: float
    batch_coef: float
    batch_exponent: float
    compute: str = "non_embedding"
    kind: str = "compute"            # "width": lr = base_lr * base_width / n_embd; the batch still from C
    base_lr: float | None = None
    base_width: int | None = None
    warmup_steps: int = 2000         # DeepSeek LLM's warmup ...
    max_warmup_fraction: float = 0.1  # ... at most this fraction of a run
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1        # DeepSeek LLM's schedule ends at 10% of the peak
    name: str = "custom"
    source: str = ""

    def __post_init__(self):
        check_hyperparameter_law(self)

    def lr(self, compute: float, width: int | None = None) -> float:
        if self.kind == "width":
            if width is None:
                raise UserError(f"the hyperparameter law '{self.name}' scales the learning rate with the width: "
                                "give the model's n_embd")
            return float(self.base_lr) * float(self.base_width) / float(width)
        return self.lr_coef * compute ** self.lr_exponent

    def batch_tokens(self, compute: float) -> float:
        return self.batch_coef * compute ** self.batch_exponent

    def to_dict(self) -> dict[str, Any]:
        """The law-file form (inverse of hyperparameter_law_from_dict)."""
        d = asdict(self)
        out = {"lr": {"coef": d.pop("lr_coef"), "exponent": d.pop("lr_exponent")},
               "batch_tokens": {"coef": d.pop("batch_coef"), "exponent": d.pop("batch_exponent")}}
        out.update({k: v for k, v in d.items() if v is not None})
        return out


def check_hyperparameter_law(law: HyperparameterLaw, where: str = "hyperparameter law") -> None:
    for key in ("lr_coef", "lr_exponent", "batch_coef", "batch_exponent", "max_warmup_fraction", "min_lr_ratio"):
        v = getattr(law, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UserError(f"{where}: '{key}' must be a finite number, got {v!r}")
    if law.lr_coef <= 0 or law.batch_coef <= 0:
        raise UserError(f"{where}: the coefficients must be positive (lr {law.lr_coef:g}, batch {law.batch_coef:g})")
    if law.compute not in COMPUTE_CONVENTIONS:
        raise UserError(f"{where}: 'compute' must be one of {', '.join(COMPUTE_CONVENTIONS)}, got {law.compute!r}")
    if law.kind not in KINDS:
        raise UserError(f"{where}: 'kind' must be one of {', '.join(KINDS)}, got {law.kind!r}")
    if law.kind == "width" and not (isinstance(law.base_lr, (int, float)) and law.base_lr > 0
                                    and isinstance(law.base_width, int) and law.base_width > 0):
        raise UserError(f"{where}: a width rule needs base_lr > 0 and a whole base_width > 0")
    if law.schedule not in SCHEDULES:
        raise UserError(f"{where}: 'schedule' must be one of {', '.join(SCHEDULES)}, got {law.schedule!r}")
    if not (isinstance(law.warmup_steps, int) and law.warmup_steps >= 0 and 0 <= law.max_warmup_fraction < 1
            and 0 <= law.min_lr_ratio <= 1):
        raise UserError(f"{where}: need whole warmup_steps >= 0, 0 <= max_warmup_fraction < 1, 0 <= min_lr_ratio <= 1")


DEEPSEEK = HyperparameterLaw(
    lr_coef=0.3118, lr_exponent=-0.1250, batch_coef=0.2920, batch_exponent=0.3271, compute="non_embedding",
    name="deepseek-llm",
    source="DeepSeek LLM (arXiv 2401.02954), section 3.1: eta_opt = 0.3118 C^-0.125, B_opt = 0.2920 C^0.3271 "
           "tokens, C = non-embedding training FLOPs")
DEFAULT = DEEPSEEK


def width_rule(base_lr: float, base_width: int, batch_law: HyperparameterLaw = DEFAULT) -> HyperparameterLaw:
    """lr = base_lr * base_width / n_embd; batch, warmup, schedule and min_lr from `batch_law`."""
    return HyperparameterLaw(
        lr_coef=batch_law.lr_coef, lr_exponent=batch_law.lr_exponent, batch_coef=batch_law.batch_coef,
        batch_exponent=batch_law.batch_exponent, compute=batch_law.compute, kind="width", base_lr=float(base_lr),
        base_width=int(base_width), warmup_steps=batch_law.warmup_steps,
        max_warmup_fraction=batch_law.max_warmup_fraction, schedule=batch_law.schedule,
        min_lr_ratio=batch_law.min_lr_ratio, name=f"width({base_lr:g}x{base_width}/n_embd)",
        source=f"lr = {base_lr:g} * {base_width} / n_embd; batch from {batch_law.name}")


def non_embedding_flops_per_token(cfg, seq_len: int) -> float:
    """DeepSeek LLM's M: training FLOPs per token of the blocks' GEMMs plus causal attention at half the score
    matrix (6 * n_layer * seq_len * n_embd), without the lm_head and the embedding."""
    from scalelab.counting import training_flops_per_token

    return float(training_flops_per_token(cfg, seq_len) - 6 * cfg.n_embd * cfg.vocab_size
                 - 6 * cfg.n_layer * seq_len * cfg.n_embd)


def law_compute(law: HyperparameterLaw, cfg, seq_len: int, tokens: float) -> float:
    """The C that `law` takes for a run of `cfg` on `tokens` tokens of `seq_len`."""
    from scalelab.counting import training_flops_per_token

    per_token = (non_embedding_flops_per_token(cfg, seq_len) if law.compute == "non_embedding"
                 else float(training_flops_per_token(cfg, seq_len)))
    return per_token * float(tokens)


def hyperparameters(compute: float, law: HyperparameterLaw = DEFAULT, *, width: int | None = None,
                    tokens: float | None = None, seq_len: int | None = None,
                    batch_tokens: float | None = None) -> dict[str, Any]:
    """The law's hyperparameters at compute C (in the law's own convention, `law.compute`).

    Returns {peak_lr, batch_tokens, warmup, warmup_steps, schedule, min_lr, compute, compute_convention, law,
    source}. batch_tokens is the law's value as a float, or, given seq_len, rounded to whole sequences (at
    least one). warmup is the trainer's train.warmup: whole steps when `tokens` (the run's length) is given,
    min(law.warmup_steps, max_warmup_fraction of the run's steps, at least 1), else the fraction
    max_warmup_fraction; warmup_steps is the step count or None. `width` (n_embd) is needed by a width rule.
    `batch_tokens` fixes the batch instead of the law's (a sweep trained at one batch); the warmup follows it.
    """
    if isinstance(compute, bool) or not isinstance(compute, (int, float)) or not (math.isfinite(compute) and compute > 0):
        raise UserError(f"hyperparameters: the compute must be a positive number of FLOPs, got {compute!r}")
    lr = law.lr(float(compute), width)
    batch = float(batch_tokens) if batch_tokens is not None else law.batch_tokens(float(compute))
    if seq_len is not None:
        batch = float(max(1, round(batch / seq_len)) * seq_len)
    warmup_steps = None
    warmup: float = law.max_warmup_fraction
    if tokens is not None:
        steps = max(1, math.ceil(float(tokens) / batch))
        warmup_steps = max(1, min(law.warmup_steps, int(law.max_warmup_fraction * steps))) if law.warmup_steps else 0
        warmup = float(warmup_steps)
    return {"peak_lr": lr, "batch_tokens": batch, "warmup": warmup, "warmup_steps": warmup_steps,
            "schedule": law.schedule, "min_lr": lr * law.min_lr_ratio, "compute": float(compute),
            "compute_convention": law.compute, "law": law.name, "source": law.source}


def hyperparameters_for(cfg, seq_len: int, tokens: float, law: HyperparameterLaw = DEFAULT, *,
                        batch_tokens: float | None = None) -> dict[str, Any]:
    """hyperparameters() for a run of `cfg` on `tokens` tokens: converts to the law's C (law_compute), rounds
    the batch to whole sequences, and gives the warmup in steps."""
    return hyperparameters(law_compute(law, cfg, seq_len, tokens), law, width=cfg.n_embd, tokens=tokens,
                           seq_len=seq_len, batch_tokens=batch_tokens)


def hyperparameter_law_from_dict(data: dict[str, Any], where: str = "hyperparameter law") -> HyperparameterLaw:
    """Read the law-file form: {"lr": {"coef", "exponent"}, "batch_tokens": {"coef", "exponent"}, "compute", ...}."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: 'hyperparameters' must be a JSON object with 'lr' and 'batch_tokens'")
    kw: dict[str, Any] = {}
    for key, prefix in (("lr", "lr"), ("batch_tokens", "batch")):
        part = data.get(key)
        if not isinstance(part, dict) or "coef" not in part or "exponent" not in part:
            raise UserError(f"{where}: '{key}' must be {{\"coef\": c, \"exponent\": e}}")
        kw[f"{prefix}_coef"], kw[f"{prefix}_exponent"] = part["coef"], part["exponent"]
    known = {f.name for f in HyperparameterLaw.__dataclass_fields__.values()}
    for key, value in data.items():
        if key in known and key not in kw:
            kw[key] = value
    kw.setdefault("compute", "training")  # a fitted law's C is the C its runs logged
    try:
        return HyperparameterLaw(**kw)
    except UserError as e:
        raise UserError(str(e).replace("hyperparameter law", where, 1)) from None


def hyperparameter_law_from_file(path: str | Path) -> HyperparameterLaw | None:
    """The law file's fitted hyperparameter law, or None when it has none (a loss-only law file)."""
    from scalelab.scaling.laws import read_law_json

    data = read_law_json(path)
    if "hyperparameters" not in data:
        return None
    return hyperparameter_law_from_dict(data["hyperparameters"], where=f"{path} hyperparameters")


# ---- fitting a hyperparameter law (DeepSeek LLM's method) -------------------------------------------

NEAR_OPTIMAL = 0.0025  # DeepSeek LLM section 3.1: "generalization error ... within 0.25% of the minimum"
MIN_GRID = 4           # a budget's grid needs this many distinct (lr, batch) pairs


def _log_fit(logc, logy) -> dict[str, Any]:
    """y = coef * C^exponent by least squares in log space, with the exponent's standard error."""
    import numpy as np

    X = np.stack([np.ones_like(logc), logc], axis=1)
    beta, *_ = np.linalg.lstsq(X, logy, rcond=None)
    out = {"coef": float(np.exp(beta[0])), "exponent": float(beta[1]), "exponent_stderr": None}
    if len(logc) > 2 and np.ptp(logc) > 0:
        resid = logy - X @ beta
        s2 = resid @ resid / (len(logc) - 2)
        out["exponent_stderr"] = float(math.sqrt(s2 * np.linalg.inv(X.T @ X)[1, 1]))
    return out


def grid_groups(C, N, lr, batch, *, tolerance_dex: float = 0.1) -> list[list[int]]:
    """Learning-rate x batch grids among runs: runs at one compute (within tolerance_dex) and one model size
    whose (lr, batch) take at least MIN_GRID distinct values. Returns the runs' indices per grid."""
    import numpy as np

    C, N, lr, batch = (np.asarray(a, float) for a in (C, N, lr, batch))
    order = np.lexsort((np.log10(C), np.round(np.log(N), 9)))
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if g and round(math.log(N[g[0]]), 9) == round(math.log(N[i]), 9) and \
                abs(math.log10(C[i]) - math.log10(C[g[0]])) <= tolerance_dex:
            g.append(int(i))
        else:
            groups.append([int(i)])
    return [g for g in groups if len({(round(math.log(lr[i]), 9), round(math.log(batch[i]), 9)) for i in g}) >= MIN_GRID]


def fit_hyperparameter_law(C, N, lr, batch, loss, *, near_optimal: float = NEAR_OPTIMAL,
                           tolerance_dex: float = 0.1, name: str = "fit") -> dict[str, Any]:
    """DeepSeek LLM's method (section 3.1): for each compute budget's learning-rate x batch grid (runs of one
    model size at one C, grid_groups), the near-optimal runs are those whose loss is within `near_optimal`
    (relative) of the grid's minimum; eta_opt(C) and B_opt(C) are power laws fitted by least squares in log
    space through every near-optimal run's (C, lr) and (C, batch). C is the runs' own (logged, exact training
    FLOPs), so the law's `compute` is "training".

    Returns {"law": HyperparameterLaw, "lr": {coef, exponent, exponent_stderr}, "batch_tokens": {...},
    "budgets": [{C, N, runs, near_optimal, best_lr, best_batch_tokens, lr_range, batch_range}], "warnings"}.
    UserError when fewer than 2 budgets have a grid."""
    import numpy as np

    C, N, lr, batch, loss = (np.asarray(a, float) for a in (C, N, lr, batch, loss))
    groups = grid_groups(C, N, lr, batch, tolerance_dex=tolerance_dex)
    budgets_c = sorted({round(math.log10(float(np.exp(np.log(C[g]).mean()))), 3) for g in groups})
    if len(budgets_c) < 2:
        raise UserError(f"fitting a hyperparameter law needs learning-rate x batch grids ({MIN_GRID}+ distinct "
                        f"(lr, batch) pairs at one model size and compute) at 2 or more budgets; found {len(budgets_c)} "
                        "(sweep design --tune-lr designs them)")
    rows, xs, lrs, bs, warnings = [], [], [], [], []
    for g in groups:
        g = np.asarray(g)
        c = float(np.exp(np.log(C[g]).mean()))
        best = g[np.argmin(loss[g])]
        near = g[loss[g] <= loss[best] * (1 + near_optimal)]
        xs += [math.log(c)] * len(near)
        lrs += list(np.log(lr[near]))
        bs += list(np.log(batch[near]))
        rows.append({"C": c, "N": float(N[g[0]]), "runs": int(len(g)), "near_optimal": int(len(near)),
                     "best_lr": float(lr[best]), "best_batch_tokens": float(batch[best]), "best_loss": float(loss[best]),
                     "lr_range": [float(lr[near].min()), float(lr[near].max())],
                     "batch_range": [float(batch[near].min()), float(batch[near].max())]})
        for what, values in (("learning rate", lr), ("batch", batch)):
            grid = np.unique(values[g])
            if len(grid) > 1 and values[best] in (grid.min(), grid.max()):
                warnings.append(f"budget C = {c:.3g}: the best {what} ({values[best]:.3g}) is at the edge of its grid "
                                f"({grid.min():.3g} .. {grid.max():.3g}); the optimum may lie beyond it: widen the grid")
    lr_fit = _log_fit(np.array(xs), np.array(lrs))
    batch_fit = _log_fit(np.array(xs), np.array(bs))
    if len(budgets_c) < 3:
        warnings.append(f"only {len(budgets_c)} budgets have a learning-rate x batch grid: the exponents rest on two "
                        "budgets; add a grid at a third")
    law = HyperparameterLaw(lr_coef=lr_fit["coef"], lr_exponent=lr_fit["exponent"], batch_coef=batch_fit["coef"],
                            batch_exponent=batch_fit["exponent"], compute="training", name=name,
                            source=f"fitted (DeepSeek LLM's method, near-optimal within {near_optimal:g}) to "
                                   f"{sum(r['runs'] for r in rows)} runs at {len(budgets_c)} budgets")
    return {"law": law, "lr": lr_fit, "batch_tokens": batch_fit, "budgets": rows, "warnings": warnings}
