"""Fitting loss laws to training runs: Approach 3 (parametric) and Approach 2 (IsoFLOP).

Approach 3 (Hoffmann et al. 2022; Besiroglu et al. 2024's replication) fits

    L(N, D) = E + A / N^alpha + B / D^beta

by minimising  sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i )
over x = (a, b, e, alpha, beta), with A = exp(a), B = exp(b), E = exp(e) and delta = 1e-3.

The classic way (`fit_classic_grid`) starts L-BFGS-B from each of 4500 grid points and keeps the
best; it takes minutes and the objective is nearly flat along some directions, so coarse grids
under-converge (Epoch AI's point about the original paper). `fit_approach3` exploits the
structure instead: for fixed (alpha, beta) the model is *linear* in (A, B, E), so a weighted
non-negative least-squares solve (loss/L_i - 1 ~ the log residual) gives the best (A, B, E) for
every cell of a fine (alpha, beta) grid at once (vectorised, a few ms). The true Huber objective
ranks the cells; the best few distinct cells are polished jointly in all five parameters by
L-BFGS-B with an analytic gradient. On the Chinchilla data this reaches an objective at least as
good as the full classic grid about 100x faster (benchmarks/fit_speed.py).

Approach 2 (`fit_isoflop`): runs grouped by compute budget C, a parabola of loss in log N per
budget, its minimum N_opt(C), D_opt = the tokens C buys at N_opt at the runs' own FLOPs per token,
and power laws N_opt ∝ C^a, D_opt ∝ C^b.

Reading runs (`load_runs`): CSV / JSONL tables with N, D, loss (aliases below), or run
directories written by `scalelab train` (metrics.jsonl + config.toml / model.toml).

No torch here: `scalelab fit` must start quickly (tests check `sys.modules`).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from scalelab.errors import UserError
from scalelab.scaling.laws import LossLaw
from scalelab.units import format_count

HUBER_DELTA = 1e-3
PARAM_NAMES = ("E", "A", "B", "alpha", "beta")

# ---- data -----------------------------------------------------------------------------------

# Column aliases (lower-cased, spaces/underscores/dashes removed before lookup).
_ALIASES = {
    "N": ("n", "params", "parameters", "numparams", "modelsize", "nparams"),
    "D": ("d", "tokens", "trainingtokens", "ntokens", "tokensseen"),
    "loss": ("loss", "valloss", "finalloss", "evalloss"),
    "C": ("c", "flops", "trainingflop", "trainingflops", "compute"),
    "lr": ("lr", "learningrate", "peaklr"),
    "batch": ("batch", "batchtokens", "globalbatchtokens"),
}


@dataclass
class Runs:
    """Training runs as arrays: N parameters, D tokens, loss; C = training FLOPs if known."""
    N: np.ndarray
    D: np.ndarray
    loss: np.ndarray
    C: np.ndarray  # FLOPs as given (a table's C column, a run's logged flops), else 6ND
    source: list[str] = field(default_factory=list)  # "file:line" or run directory, per run
    lr: np.ndarray | None = None     # peak learning rate per run, when every run gives one
    batch: np.ndarray | None = None  # global batch in tokens per run, when every run gives one

    def __len__(self) -> int:
        return len(self.loss)

    def subset(self, idx) -> "Runs":
        idx = np.asarray(idx)
        return Runs(self.N[idx], self.D[idx], self.loss[idx], self.C[idx], [self.source[i] for i in idx],
                    None if self.lr is None else self.lr[idx], None if self.batch is None else self.batch[idx])


def _norm(name: str) -> str:
    return "".join(ch for ch in name.strip().lower() if ch not in " _-")


def _find_columns(columns: Iterable[str]) -> dict[str, str]:
    """Map our names (N, D, loss, C) to the file's column names, by alias."""
    found: dict[str, str] = {}
    for col in columns:
        key = _norm(col)
        for ours, aliases in _ALIASES.items():
            if key in aliases and ours not in found:
                found[ours] = col
    return found


def _number(value: Any, *, where: str, column: str) -> float:
    if isinstance(value, bool):
        raise UserError(f"{where}: column '{column}' must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: column '{column}' must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise UserError(f"{where}: column '{column}' is {value!r}; every value must be finite (remove the row)")
    if x <= 0:
        raise UserError(f"{where}: column '{column}' must be positive, got {value!r} (remove or fix the row)")
    return x


def _table_rows(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """(where, record) pairs and the column names of a CSV or JSONL file."""
    text = path.read_text(encoding="utf-8-sig", errors="replace")  # -sig: spreadsheets start CSVs with a BOM
    rows: list[tuple[str, dict[str, Any]]] = []
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        columns: dict[str, None] = {}
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i}: not valid JSON ({e.msg}); JSONL needs one object per line") from None
            if not isinstance(rec, dict):
                raise UserError(f"{path}:{i}: each JSONL line must be an object with N, D, loss")
            columns.update(dict.fromkeys(rec))
            rows.append((f"{path}:{i}", rec))
        return rows, list(columns)
    reader = csv.reader(text.splitlines())
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(f"{path}: empty file; expected a CSV header with N, D, loss") from None
    header = [h.strip() for h in header]
    for i, values in enumerate(reader, start=2):
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise UserError(f"{path}:{i}: {len(values)} fields but the header has {len(header)}")
        rows.append((f"{path}:{i}", dict(zip(header, values))))
    return rows, header


def read_table(path: str | Path, *, tokens_from_flops: bool = False) -> Runs:
    """A CSV or JSONL file of runs: columns N (params), D (tokens) and loss; or N, C, loss with
    tokens_from_flops (D = C / 6N)."""
    path = Path(path)
    rows, columns = _table_rows(path)
    cols = _find_columns(columns)
    if "N" not in cols:
        raise UserError(f"{path}: missing column 'N' (or 'params'); columns are {', '.join(columns) or 'none'}")
    if "loss" not in cols:
        raise UserError(f"{path}: missing column 'loss'; columns are {', '.join(columns) or 'none'}")
    if "D" not in cols:
        if "C" in cols and not tokens_from_flops:
            raise UserError(f"{path}: missing column 'D' (or 'tokens'); it has '{cols['C']}' (FLOPs): "
                            f"add --tokens-from-flops to use D = C/(6N)")
        if "C" not in cols:
            raise UserError(f"{path}: missing column 'D' (or 'tokens'); columns are {', '.join(columns)}")
    if not rows:
        raise UserError(f"{path}: no data rows")
    N, D, L, C, src, LR, B = [], [], [], [], [], [], []
    for where, rec in rows:
        def get(ours: str) -> float:
            col = cols[ours]
            if col not in rec or rec[col] is None or rec[col] == "":
                raise UserError(f"{where}: column '{col}' is empty")
            return _number(rec[col], where=where, column=col)
        n, loss = get("N"), get("loss")
        c = get("C") if "C" in cols else None
        d = get("D") if "D" in cols else _number(c / (6.0 * n), where=where, column=f"{cols['C']}/(6·{cols['N']})")
        N.append(n), D.append(d), L.append(loss), C.append(c if c is not None else 6.0 * n * d), src.append(where)
        if "lr" in cols and "batch" in cols:
            LR.append(get("lr")), B.append(get("batch"))
    return Runs(np.array(N), np.array(D), np.array(L), np.array(C), src,
                np.array(LR) if LR else None, np.array(B) if B else None)


# ---- run directories (scalelab train) --------------------------------------------------------

RUN_CONFIG_NAMES = ("model.toml", "config.toml")  # the bare ModelConfig, or the training config's [model]


def _run_params(run_dir: Path, *, non_embedding: bool) -> float:
    from scalelab.config import ModelConfig
    from scalelab.counting import count_params

    for name in RUN_CONFIG_NAMES:
        cfg_path = run_dir / name
        if cfg_path.is_file():
            counts = count_params(ModelConfig.from_toml(cfg_path))
            return float(counts.non_embedding if non_embedding else counts.total)
    raise UserError(f"{run_dir}: no {' or '.join(RUN_CONFIG_NAMES)} to count the model's parameters")


def run_hyperparameters(run_dir: Path) -> tuple[float, float] | None:
    """(peak lr, global batch tokens) from a run's config.toml [train]; None when it has none. A batch of 0
    (one micro-batch per device) counts micro_batch_size x seq_len (one device)."""
    import tomllib

    path = run_dir / "config.toml"
    if not path.is_file():
        return None
    try:
        train = tomllib.loads(path.read_text(encoding="utf-8")).get("train", {})
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    if not isinstance(train, dict) or "lr" not in train:
        return None
    batch = train.get("global_batch_tokens") or (train.get("micro_batch_size", 8) * train.get("seq_len", 1024))
    return (_number(train["lr"], where=str(path), column="train.lr"),
            _number(batch, where=str(path), column="train.global_batch_tokens"))


def read_run_dir(run_dir: str | Path, *, pick: str = "final",
                 non_embedding: bool = False) -> tuple[float, float, float, float | None, str]:
    """(N, D, loss, C, where) of one `scalelab train` run directory.

    Loss is the final (or, with pick='best', the lowest) evaluation loss `val_loss` in
    metrics.jsonl, D the `tokens` seen at that evaluation and C its `flops` (None if not
    logged); a run without evaluations falls back to its last training `loss`. N is the total
    parameter count of the run's model.toml (or config.toml's [model]).
    """
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl; give a run directory written by `scalelab train` or a CSV/JSONL")
    lines = metrics.read_text(encoding="utf-8", errors="replace").splitlines()
    evals, trains = [], []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):  # a run killed mid-write: its torn last line
                continue
            raise UserError(f"{metrics}:{i}: not valid JSON (fix or delete the line)") from None
        if not isinstance(rec, dict):
            continue
        tokens = rec.get("tokens", rec.get("tokens_seen"))
        if tokens is None:
            continue
        where = f"{metrics}:{i}"
        if rec.get("val_loss") is not None:
            evals.append((where, tokens, rec["val_loss"], rec.get("flops")))
        elif rec.get("loss") is not None:
            trains.append((where, tokens, rec["loss"], rec.get("flops")))
    chosen = evals or trains
    if not chosen:
        raise UserError(f"{metrics}: no record with 'tokens' and 'val_loss' (or 'loss')")
    col = "val_loss" if evals else "loss"
    if pick == "best":
        where, tokens, loss, flops = min(chosen, key=lambda r: _number(r[2], where=r[0], column=col))
    else:
        where, tokens, loss, flops = chosen[-1]
    d = _number(tokens, where=where, column="tokens")
    loss = _number(loss, where=where, column=col)
    c = _number(flops, where=where, column="flops") if flops is not None else None
    return _run_params(run_dir, non_embedding=non_embedding), d, loss, c, str(run_dir)


def load_runs(inputs: Sequence[str | Path], *, tokens_from_flops: bool = False, pick: str = "final",
              non_embedding: bool = False) -> Runs:
    """Runs from CSV/JSONL files, run directories, and directories of run directories."""
    parts: list[Runs] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            dirs = [path] if (path / "metrics.jsonl").is_file() else sorted(
                p for p in path.iterdir() if (p / "metrics.jsonl").is_file())
            if not dirs:
                raise UserError(f"{path}: not a run directory (no metrics.jsonl) and holds no run directories")
            vals = [read_run_dir(d, pick=pick, non_embedding=non_embedding) for d in dirs]
            n, d, loss = (np.array([v[k] for v in vals]) for k in range(3))
            c = np.array([v[3] if v[3] is not None else 6.0 * v[0] * v[1] for v in vals])
            hp = [run_hyperparameters(Path(v[4])) for v in vals]
            lr, batch = (np.array([h[k] for h in hp]) if all(hp) else None for k in range(2))
            parts.append(Runs(n, d, loss, c, [v[4] for v in vals], lr, batch))
        elif path.is_file():
            parts.append(read_table(path, tokens_from_flops=tokens_from_flops))
        else:
            raise UserError(f"input not found: {path}")
    if not parts:
        raise UserError("no input: give CSV/JSONL files or run directories")
    with_hp = all(p.lr is not None for p in parts)
    runs = Runs(np.concatenate([p.N for p in parts]), np.concatenate([p.D for p in parts]),
                np.concatenate([p.loss for p in parts]), np.concatenate([p.C for p in parts]),
                [s for p in parts for s in p.source],
                np.concatenate([p.lr for p in parts]) if with_hp else None,
                np.concatenate([p.batch for p in parts]) if with_hp else None)
    overflow = np.flatnonzero(~np.isfinite(runs.C))
    if len(overflow):
        raise UserError(f"{runs.source[overflow[0]]}: C = 6·N·D overflows a float; give N and D in raw counts")
    return runs


def hyperparameter_grids(runs: Runs, tolerance_dex: float = 0.1) -> list[list[int]]:
    """The learning-rate x batch grids among the runs (hparams.grid_groups); [] without lr and batch."""
    from scalelab.scaling.hparams import grid_groups

    if runs.lr is None or runs.batch is None:
        return []
    return grid_groups(runs.C, runs.N, runs.lr, runs.batch, tolerance_dex=tolerance_dex)


def best_of_grids(runs: Runs, grids: list[list[int]]) -> Runs:
    """The runs with each learning-rate x batch grid reduced to its lowest-loss run: a loss law L(N, D) is a
    law of well-tuned runs, and a grid's mistuned corners would pull it up."""
    if not grids:
        return runs
    drop = {i for g in grids for i in g} - {min(g, key=lambda i: runs.loss[i]) for g in grids}
    return runs.subset([i for i in range(len(runs)) if i not in drop])


def fit_hyperparameters(runs: Runs, grids: list[list[int]], name: str = "fit") -> tuple[dict[str, Any] | None, list[str]]:
    """hparams.fit_hyperparameter_law over the grids' runs (DeepSeek LLM's method) and its warnings; (None, [])
    without grids, (None, [why]) when the grids cannot give a law (all at one budget): the loss law is still
    fitted."""
    from scalelab.scaling.hparams import fit_hyperparameter_law

    if not grids:
        return None, []
    idx = np.array(sorted(i for g in grids for i in g))
    sub = runs.subset(idx)
    try:
        result = fit_hyperparameter_law(sub.C, sub.N, sub.lr, sub.batch, sub.loss, name=name)
    except UserError as e:
        return None, [f"no hyperparameter law fitted: {e}"]
    return result, result["warnings"]


def drop_highest_loss(runs: Runs, k: int) -> Runs:
    """Drop the k runs with the highest loss (Epoch AI drop the 5 worst of Chinchilla's Figure 4)."""
    if k <= 0:
        return runs
    if k >= len(runs):
        raise UserError(f"--drop-highest-loss {k} would drop all {len(runs)} runs")
    keep = np.sort(np.argsort(runs.loss, kind="stable")[: len(runs) - k])
    return runs.subset(keep)


# ---- Approach 3: the objective ---------------------------------------------------------------

def _lse3(t1, t2, t3):
    m = np.maximum(np.maximum(t1, t2), t3)
    return m + np.log(np.exp(t1 - m) + np.exp(t2 - m) + np.exp(t3 - m))


def huber(r, delta: float = HUBER_DELTA):
    """scipy.special.huber(delta, r): r²/2 inside ±delta, delta·(|r| − delta/2) outside."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def objective(x, logN, logD, logL, delta: float = HUBER_DELTA) -> float:
    """sum_i Huber(LSE(a − α log N, b − β log D, e) − log L); x = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = x
    r = _lse3(a - alpha * logN, b - beta * logD, np.full_like(logN, e)) - logL
    return float(np.sum(huber(r, delta)))


def objective_and_grad(x, logN, logD, logL, delta: float = HUBER_DELTA):
    """The objective and its exact gradient (softmax weights times the clipped residual)."""
    a, b, e, alpha, beta = x
    t1 = a - alpha * logN
    t2 = b - beta * logD
    m = np.maximum(np.maximum(t1, t2), e)
    w1, w2, w3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
    s = w1 + w2 + w3
    r = m + np.log(s) - logL
    psi = np.clip(r, -delta, delta) / s  # dHuber/dr, divided by the softmax normaliser
    g1, g2 = psi * w1, psi * w2
    grad = np.array([g1.sum(), g2.sum(), (psi * w3).sum(), -(g1 @ logN), -(g2 @ logD)])
    return float(np.sum(huber(r, delta))), grad


_LOG_FLOAT_MAX = math.log(np.finfo(float).max)


def law_from_x(x, name: str = "fit") -> LossLaw:
    a, b, e, alpha, beta = (float(v) for v in x)
    for coef, log_value, exponent, var in (("A", a, alpha, "N"), ("B", b, beta, "D")):
        if log_value > _LOG_FLOAT_MAX:  # A ≈ (loss term)·N^alpha: huge N at a steep exponent
            raise UserError(f"the fitted {coef} = e^{log_value:.4g} overflows a float ({coef} ≈ loss term × "
                            f"{var}^{exponent:.3g} at these {var}): give N as a count of parameters and D of tokens")
    return LossLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta, name=name)


def _scaled(x, scale, logN, logD, logL, delta):
    f, g = objective_and_grad(x, logN, logD, logL, delta)
    return f / scale, g / scale


# alpha, beta >= 0: a law whose loss grows with N or D is no scaling law, and when a term is
# too small to see in the data, an unbounded fit can trade it for a tiny A with a negative
# exponent that explodes outside the data (seen in synthetic tests with a 1e-3-nat term).
# alpha, beta <= EXPONENT_MAX: when the loss does not fall as a power of N (or D) across the
# runs — a ladder whose largest models are undertrained, say — the best fit turns the term into
# a step that only the smallest runs feel, alpha -> infinity with log A = alpha·log N_min, until
# A overflows (seen on a real CPU ladder: alpha 19 and climbing). Published exponents are
# 0.07-0.8; a fit that reaches the cap is reported as such (Approach3Fit.at_bounds).
EXPONENT_MAX = 3.0
_BOUNDS = [(None, None)] * 3 + [(0.0, EXPONENT_MAX)] * 2


def _minimize():
    """scipy.optimize.minimize, loading scipy with a single-threaded OpenBLAS unless the user
    chose otherwise: scipy >= 1.15's L-BFGS-B calls BLAS on 5x5 problems, and idle OpenBLAS
    threads spinning beside it made every fit 3-7x slower on a busy 2-core machine. The
    variable only affects BLAS libraries loaded after it is set (numpy's is already loaded)."""
    import os
    import sys

    if "scipy.optimize" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from scipy.optimize import minimize

    return minimize


def _lbfgs(x0, logN, logD, logL, delta, *, analytic: bool = True, scale: float = 1.0, maxiter: int = 5000):
    """One L-BFGS-B run. Ours (analytic) minimises objective/scale: L-BFGS-B's ftol test is
    absolute for |f| < 1, so dividing by the current objective makes it relative (an exact
    fit's objective heads to 0 and would otherwise stop far from it)."""
    minimize = _minimize()

    if analytic:
        res = minimize(_scaled, np.asarray(x0, float), args=(max(scale, 1e-300), logN, logD, logL, delta),
                       jac=True, method="L-BFGS-B", bounds=_BOUNDS,
                       options={"maxiter": maxiter, "ftol": 1e-14, "gtol": 1e-10, "maxcor": 20})
        return res.x, objective(res.x, logN, logD, logL, delta)
    # the classic setting: finite-difference gradient, scipy's default tolerances
    res = minimize(objective, np.asarray(x0, float), args=(logN, logD, logL, delta), method="L-BFGS-B")
    return res.x, float(res.fun)


@dataclass
class Approach3Fit:
    law: LossLaw
    x: np.ndarray  # (a, b, e, alpha, beta)
    objective: float
    n_points: int
    delta: float
    method: str

    def values(self) -> dict[str, float]:
        return {k: float(getattr(self.law, k)) for k in PARAM_NAMES}

    @property
    def at_bounds(self) -> list[str]:
        """Exponents the fit pushed to a bound, e.g. ['alpha=3 (max)']: the data do not pin them."""
        out = []
        for name, v in (("alpha", self.law.alpha), ("beta", self.law.beta)):
            if v <= 1e-6:
                out.append(f"{name}=0 (min)")
            elif v >= EXPONENT_MAX - 1e-6:
                out.append(f"{name}={EXPONENT_MAX:g} (max)")
        return out


# ---- Approach 3: what a design of runs can identify -----------------------------------------
#
# L = E + A/N^alpha + B/D^beta is a sum of a function of N, a function of D and a constant. Runs
# at only two distinct N see the N term at two levels: one difference for A and alpha, and its
# level is indistinguishable from E, so a whole curve of (E, A, alpha) fits equally well. Three
# levels give two differences for (A, alpha); with three levels of D likewise for (B, beta), and
# the overall level then fixes E. Repeated (N, D) pairs add no equation. And when every run lies
# on one line D = k·N^s with s > 0 (one tokens-per-parameter ratio, s = 1), both terms are
# decreasing powers of N along it: (A, alpha) and (B·k^-beta, s·beta) swap roles exactly, two
# laws with different N_opt fit identically. (A line with s < 0, one compute budget, is not
# ambiguous: there one term falls and the other rises with N.) These are necessary conditions;
# the bootstrap intervals say how well a design that meets them pins the law down.

MIN_LEVELS = 3  # distinct N, and distinct D
ONE_LINE_SPREAD = 0.05  # every run's D within ±5% of one rising power law D = k·N^s


def _distinct(values: np.ndarray) -> np.ndarray:
    return np.unique(np.round(np.log(values), 9))


def _more_levels(values: np.ndarray, thing: str, var: str, term: str) -> str:
    levels = np.exp(_distinct(values))
    hi, missing = levels.max(), MIN_LEVELS - len(levels)
    ratio = max(hi / levels.min(), 3.0)
    seen = ", ".join(format_count(v) for v in levels)
    return (f"only {len(levels)} distinct {thing}{'s' if len(levels) > 1 else ''} {var} ({seen}): the {term} term "
            f"needs {MIN_LEVELS} or more to be told apart from E; add runs at {missing} more {thing}"
            f"{'s' if missing > 1 else ''} (e.g. {var} = {format_count(hi * ratio)}), spanning a decade or more")


def design_problem(runs: Runs) -> str | None:
    """Why these runs cannot identify E, A, alpha, B, beta and which runs to add; None if the
    design meets the necessary conditions above."""
    if len(_distinct(runs.N)) < MIN_LEVELS:
        return _more_levels(runs.N, "model size", "N", "A/N^alpha")
    if len(_distinct(runs.D)) < MIN_LEVELS:
        return _more_levels(runs.D, "token count", "D", "B/D^beta")
    logs = np.stack([np.log(runs.N), np.log(runs.D)], axis=1)
    pairs = len(np.unique(np.round(logs, 9), axis=0))
    if pairs < len(PARAM_NAMES):
        return (f"only {pairs} distinct (N, D) pairs for {len(PARAM_NAMES)} parameters (repeating a run adds no "
                f"equation); add runs at {len(PARAM_NAMES) - pairs} or more new (N, D) pairs")
    slope, intercept = np.polyfit(logs[:, 0], logs[:, 1], 1)
    off_line = logs[:, 1] - (slope * logs[:, 0] + intercept)  # log D relative to the power law D = k·N^slope
    if slope > 0 and np.ptp(off_line) < 2 * math.log1p(ONE_LINE_SPREAD):
        return (f"every run lies on one line D ∝ N^{slope:.2f} (e.g. one tokens-per-parameter ratio): along it "
                "the N and D terms are both falling powers of N and can swap roles, so N_opt is undetermined; "
                "add runs of the same sizes trained for other token counts (e.g. 4x fewer and 4x more)")
    return None


def check_identifiable(runs: Runs) -> None:
    problem = design_problem(runs)
    if problem is not None:
        raise UserError(f"these {len(runs)} runs cannot determine L = E + A/N^alpha + B/D^beta: {problem}")


# ---- Approach 3: classic multi-start grid (the reference) ----------------------------------

def classic_grid_starts() -> np.ndarray:
    """Hoffmann et al. / Epoch AI's 4500 starts: alpha, beta ∈ {0, 0.5, …, 2}, e ∈ {−1, −0.5, …, 1},
    a, b ∈ {0, 5, …, 25}; rows are (a, b, e, alpha, beta)."""
    ab = np.arange(0, 30, 5.0)
    e = np.arange(-1, 1.5, 0.5)
    al = np.arange(0, 2.5, 0.5)
    grid = np.array(np.meshgrid(ab, ab, e, al, al, indexing="ij")).reshape(5, -1).T
    return grid


def fit_classic_grid(runs: Runs, *, delta: float = HUBER_DELTA, starts: np.ndarray | None = None,
                     analytic: bool = False, progress=None) -> Approach3Fit:
    """L-BFGS-B from every start (default: all 4500 classic starts, finite-difference gradients
    as in Epoch AI's replication); keep the best. Slow; the reference `fit_approach3` must match."""
    check_identifiable(runs)
    logN, logD, logL = np.log(runs.N), np.log(runs.D), np.log(runs.loss)
    starts = classic_grid_starts() if starts is None else np.atleast_2d(starts)
    best_x, best_f = None, math.inf
    for i, x0 in enumerate(starts):
        with np.errstate(all="ignore"):  # far-off starts overflow exp; L-BFGS-B backs off
            x, f = _lbfgs(x0, logN, logD, logL, delta, analytic=analytic)
        if f < best_f:
            best_x, best_f = x, f
        if progress is not None:
            progress(i + 1, len(starts), best_f)
    return Approach3Fit(law_from_x(best_x, "classic-grid"), best_x, best_f, len(runs), delta, "grid")


# ---- Approach 3: variable projection on an (alpha, beta) grid, then a joint polish ----------

def _projected_starts(logN, logD, logL, delta, alphas, betas, n_starts: int) -> np.ndarray:
    """For each (alpha, beta) on the grid, the best (A, B, E) ≥ 0 by weighted linear least
    squares (minimise sum ((A N^-α + B D^-β + E)/L − 1)², ≈ the squared log residual), solved
    in closed form for all cells at once over the 7 active sets of the 3-variable NNLS. Returns
    the n_starts cells (as x = (a, b, e, alpha, beta)) with the lowest true Huber objective."""
    L = np.exp(logL)
    al, be = np.meshgrid(alphas, betas, indexing="ij")
    al, be = al.ravel(), be.ravel()
    # columns scaled by their value at the geometric-mean point so the 3x3 systems are well conditioned
    u = np.exp(-al[:, None] * (logN - logN.mean())[None, :]) / L  # (cells, n)
    v = np.exp(-be[:, None] * (logD - logD.mean())[None, :]) / L
    w = np.broadcast_to(1.0 / L, u.shape)
    X = np.stack([u, v, w], axis=-1)  # (cells, n, 3)
    G = np.einsum("cni,cnj->cij", X, X)
    h = X.sum(axis=1)  # X^T 1
    best_coef = np.zeros((len(al), 3))
    best_sse = np.full(len(al), np.inf)
    n = len(logL)
    for mask in ((1, 1, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1)):
        idx = [i for i in range(3) if mask[i]]
        Gs = G[:, idx][:, :, idx] + 1e-12 * np.eye(len(idx))
        try:
            c = np.linalg.solve(Gs, h[:, idx][..., None])[..., 0]
        except np.linalg.LinAlgError:
            continue
        ok = np.all(c >= 0, axis=1)
        coef = np.zeros((len(al), 3))
        coef[:, idx] = c
        # SSE = n − 2 c·h + cᵀGc
        sse = n - 2 * np.einsum("ci,ci->c", coef, h) + np.einsum("ci,cij,cj->c", coef, G, coef)
        better = ok & (sse < best_sse)
        best_sse = np.where(better, sse, best_sse)
        best_coef = np.where(better[:, None], coef, best_coef)
    # coefficients are each term's value (in loss units) at the data's geometric-mean N or D. A
    # term the NNLS dropped (0) restarts at 1e-4, not at log(0): from there the polish can
    # still grow it (at exp(-70) its gradient would vanish)
    tiny = 1e-4
    a = np.log(np.maximum(best_coef[:, 0], tiny)) + al * logN.mean()
    b = np.log(np.maximum(best_coef[:, 1], tiny)) + be * logD.mean()
    e = np.log(np.maximum(best_coef[:, 2], tiny))
    # the true objective for every cell (vectorised)
    r = _lse3(a[:, None] - al[:, None] * logN, b[:, None] - be[:, None] * logD, e[:, None] + 0 * logN) - logL
    f = huber(r, delta).sum(axis=1)
    f = np.where(np.isfinite(f), f, np.inf)
    order = np.argsort(f)
    # keep distinct starts: skip cells that are grid neighbours of one already chosen
    step_a = (alphas[-1] - alphas[0]) / max(len(alphas) - 1, 1)
    step_b = (betas[-1] - betas[0]) / max(len(betas) - 1, 1)
    chosen: list[int] = []
    for i in order:
        if not np.isfinite(f[i]):
            break
        if all(abs(al[i] - al[j]) > 1.5 * step_a or abs(be[i] - be[j]) > 1.5 * step_b for j in chosen):
            chosen.append(i)
        if len(chosen) >= n_starts:
            break
    return np.stack([a[chosen], b[chosen], e[chosen], al[chosen], be[chosen]], axis=1)


def fit_approach3(runs: Runs, *, delta: float = HUBER_DELTA, grid_size: int = 40, n_starts: int = 6,
                  alpha_max: float = 2.0, beta_max: float = 2.0, x0: Sequence[float] | None = None) -> Approach3Fit:
    """Minimise the Huber objective: projected (alpha, beta) grid → best n_starts cells → joint
    L-BFGS-B polish with analytic gradients (extra start x0 optional, e.g. for bootstraps)."""
    check_identifiable(runs)
    logN, logD, logL = np.log(runs.N), np.log(runs.D), np.log(runs.loss)
    alphas = np.linspace(0.02, alpha_max, grid_size)
    betas = np.linspace(0.02, beta_max, grid_size)
    starts = _projected_starts(logN, logD, logL, delta, alphas, betas, n_starts)
    if x0 is not None:
        starts = np.vstack([np.asarray(x0, float)[None, :], starts])
    best_x, best_f = None, math.inf
    for s in starts:
        x, f = _lbfgs(s, logN, logD, logL, delta, scale=objective(s, logN, logD, logL, delta))
        if f < best_f:
            best_x, best_f = x, f
    if best_x is None or not math.isfinite(best_f):
        raise UserError("the fit found no finite objective; check the data (losses, N and D in raw units)")
    # restart from the best point, rescaled to its objective, while that still helps (L-BFGS's
    # memory is stale after the Huber kinks; a near-exact fit gains orders of magnitude per round)
    for _ in range(6):
        x, f = _lbfgs(best_x, logN, logD, logL, delta, scale=best_f)
        if not f < best_f:
            break
        improved = best_f - f
        best_x, best_f = x, f
        if improved <= 1e-9 * best_f:
            break
    return Approach3Fit(law_from_x(best_x), best_x, best_f, len(runs), delta, "approach3")


# ---- the compute optimum a fitted law implies -------------------------------------------------
#
# N_opt = G·(C/6)^(beta/(alpha+beta)) exists only when both terms fall with their variable across
# the data. A fit can drop a term instead (alpha or beta at 0, or A or B so small the term is
# invisible): the law then does not depend on N (or D), its "optimum" runs off to N -> 0 (or
# D -> 0), and G divides by zero or returns 1e-65 parameters. Such a law answers no planning
# question; the CLI refuses it and the bootstrap counts it.

VANISHED = 1e-6  # a term that moves the predicted loss by less than this fraction across the runs


class NoOptimum(UserError):
    """A fitted law with no compute-optimal point; `why` is the short reason (bootstraps count them)."""

    def __init__(self, why: str, fix: str):
        super().__init__(f"the fitted law has no compute optimum: {why}; {fix}")
        self.why = why


def _term_change(coef: float, exponent: float, values: np.ndarray) -> float:
    """How much coef / x^exponent changes across the values' range (0 for a constant term)."""
    lo, hi = float(values.min()), float(values.max())
    if coef <= 0 or exponent <= 0:
        return 0.0
    with np.errstate(over="ignore"):
        return float(coef * np.float64(lo) ** -exponent * -math.expm1(-exponent * math.log(hi / lo)))


def compute_optimum(law: LossLaw, budget: float, runs: Runs) -> dict[str, float]:
    """The law's closed-form optimum at `budget` (N, D, tokens_per_param, loss); NoOptimum when a
    term vanished across the runs or the closed form leaves the floats."""
    floor = VANISHED * float(runs.loss.min())
    for term, coef, exponent, values, var in (("A/N^alpha", law.A, law.alpha, runs.N, "N"),
                                              ("B/D^beta", law.B, law.beta, runs.D, "D")):
        if _term_change(coef, exponent, values) < floor:
            raise NoOptimum(f"its {term} term is flat across the runs' {var} (loss does not fall with {var})",
                            f"check that the runs at larger {var} trained well, or widen the ladder in {var}")
    with np.errstate(all="ignore"):
        try:
            opt = law.closed_form(budget)
        except ArithmeticError:  # G's float power or D/N in plain Python floats
            opt = None
    if opt is None or not all(math.isfinite(opt[k]) and opt[k] > 0 for k in ("N", "D", "tokens_per_param", "loss")):
        raise NoOptimum(f"N_opt = G·(C/6)^a leaves the floating-point range at C = {budget:.3g} "
                        f"(alpha {law.alpha:.3g}, beta {law.beta:.3g})",
                        "choose a --budget nearer the runs' compute, or widen the ladder")
    return opt


def summarize(fit: Approach3Fit, budget: float, runs: Runs) -> dict[str, Any]:
    """The fitted law and what it implies: N_opt ∝ C^a, D_opt ∝ C^b, and the optimum at budget."""
    law = fit.law
    opt = compute_optimum(law, budget, runs)
    return {
        **fit.values(),
        "objective": fit.objective,
        "huber_delta": fit.delta,
        "n_points": fit.n_points,
        "method": fit.method,
        "N_opt_exponent": law.a,
        "D_opt_exponent": law.b,
        "G": law.G,
        "budget": budget,
        "N_opt": opt["N"],
        "D_opt": opt["D"],
        "tokens_per_param": opt["tokens_per_param"],
        "loss_at_budget": opt["loss"],
        "at_bounds": fit.at_bounds,
    }


BOOTSTRAP_KEYS = PARAM_NAMES + ("N_opt_exponent", "D_opt_exponent", "N_opt", "D_opt", "tokens_per_param")


def bootstrap(runs: Runs, fit: Approach3Fit, budget: float, k: int, *, seed: int = 0,
              delta: float = HUBER_DELTA, progress=None) -> dict[str, Any]:
    """Refit k resamples of the runs (drawn with replacement): standard errors (std over
    resamples) and 95% percentile intervals for E, A, B, alpha, beta, the exponents, and
    N_opt / D_opt / tokens-per-parameter at the budget. Each refit starts from the full-data
    optimum plus the best cells of a coarser projected grid. `laws`: the valid resamples' LossLaws.

    A resample whose runs cannot identify the law (design_problem) or whose law has no compute
    optimum (NoOptimum) is counted under `degenerate` by reason, not fatal; the intervals come
    from the `valid` others (none when fewer than 2: `no_interval` says why)."""
    if k < 2:
        raise UserError(f"--bootstrap needs at least 2 resamples, got {k}")
    rng = np.random.default_rng(seed)
    rows, degenerate, laws = [], {}, []
    for i in range(k):
        sample = runs.subset(rng.integers(0, len(runs), len(runs)))
        why = design_problem(sample)
        if why is None:
            try:
                f = fit_approach3(sample, delta=delta, grid_size=24, n_starts=2, x0=fit.x)
                s = summarize(f, budget, sample)
                rows.append([s[key] for key in BOOTSTRAP_KEYS])
                laws.append(f.law)
            except NoOptimum as e:
                why = e.why
            except UserError as e:
                why = str(e)
        if why is not None:
            degenerate[why] = degenerate.get(why, 0) + 1
        if progress is not None:
            progress(i + 1, k)
    out: dict[str, Any] = {"resamples": k, "seed": seed, "valid": len(rows), "degenerate": degenerate,
                           "laws": laws}
    if len(rows) < 2:
        out["no_interval"] = (f"only {len(rows)} of {k} resamples gave a law with a compute optimum; "
                              "no standard errors (the runs do not pin the law down: widen the ladder)")
        return out
    arr = np.array(rows, dtype=float)
    lo, hi = np.percentile(arr, [2.5, 97.5], axis=0)
    out["stderr"] = {key: float(s) for key, s in zip(BOOTSTRAP_KEYS, arr.std(axis=0, ddof=1))}
    out["interval_95"] = {key: [float(a), float(b)] for key, a, b in zip(BOOTSTRAP_KEYS, lo, hi)}
    return out


# ---- Approach 2: IsoFLOP profiles -----------------------------------------------------------

def group_budgets(C: np.ndarray, *, budgets: Sequence[float] | None = None, tolerance_dex: float = 0.1) -> np.ndarray:
    """Budget index per run (−1: no budget). Given budgets: the nearest within tolerance_dex
    (in log10 C). Otherwise runs are clustered: sorted by C, a new budget starts wherever
    consecutive runs differ by more than tolerance_dex."""
    logc = np.log10(C)
    if budgets is not None:
        lb = np.log10(np.asarray(budgets, float))
        dist = np.abs(logc[:, None] - lb[None, :])
        idx = dist.argmin(axis=1)
        return np.where(dist[np.arange(len(C)), idx] <= tolerance_dex, idx, -1)
    order = np.argsort(logc, kind="stable")
    group = np.empty(len(C), dtype=int)
    g = 0
    for j, i in enumerate(order):
        if j > 0 and logc[i] - logc[order[j - 1]] > tolerance_dex:
            g += 1
        group[i] = g
    return group


def _power_law(logc: np.ndarray, logy: np.ndarray) -> dict[str, Any]:
    """y = coef · C^exponent by least squares in log space, with the exponent's standard error
    (None, and `exponent_stderr_why`, when two budgets leave no residual to estimate it from)."""
    X = np.stack([np.ones_like(logc), logc], axis=1)
    beta, *_ = np.linalg.lstsq(X, logy, rcond=None)
    out: dict[str, Any] = {"exponent": float(beta[1]), "coefficient": float(np.exp(beta[0]))}
    if len(logc) > 2:
        resid = logy - X @ beta
        s2 = resid @ resid / (len(logc) - 2)
        out["exponent_stderr"] = float(math.sqrt(s2 * np.linalg.inv(X.T @ X)[1, 1]))
    else:
        out["exponent_stderr"] = None
        out["exponent_stderr_why"] = "2 budgets fit a line exactly, leaving no residual; add a third budget"
    return out


FAR_MINIMUM_DEX = 1.0  # a parabola whose minimum lies more than a decade outside the sampled N is too flat to use


def _check_clusters(runs: Runs, group: np.ndarray, budgets, tolerance_dex: float) -> list[str]:
    """Budgets that do not cluster are refused: a group spanning more than the tolerance (consecutive runs
    chained continuous FLOPs together, e.g. Chinchilla's Figure 4 at 0.1 dex chains 222 runs from 6e18 to 1e21)
    mixes budgets, and its "optimum" means nothing. Runs farther than the tolerance from every --budgets value
    are left out, with a warning (returned)."""
    logc = np.log10(runs.C)
    if budgets is None:
        for g in sorted(set(group.tolist())):
            members = logc[group == g]
            span = float(np.ptp(members))
            if span > tolerance_dex:
                raise UserError(
                    f"the runs' FLOPs do not form separate budgets: at --flop-tolerance {tolerance_dex:g} dex, "
                    f"{len(members)} runs from C = {10 ** members.min():.3g} to {10 ** members.max():.3g} "
                    f"({span:.2f} dex) chain into one group, whose profile would mix budgets; give the budgets "
                    "the runs were planned at with --budgets (e.g. --budgets 1e18,3e18,1e19)")
    left_out = int((group == -1).sum())
    if left_out:
        return [f"{left_out} of {len(runs)} runs are more than {tolerance_dex:g} dex from every --budgets "
                "value and are left out; add their budgets or raise --flop-tolerance"]
    return []


def tokens_at(runs: Runs, idx: np.ndarray, C: float, n: float) -> float:
    """The tokens budget C buys a model of n parameters, from the runs' own FLOPs per token (C_i / D_i:
    exact logged FLOPs include attention and leave out the embedding, so for small shapes they differ from
    6N by 4-25%), interpolated piecewise linearly in log N between the budget's runs (exactly C/6N when the
    runs' C is 6ND)."""
    logn, inverse = np.unique(np.round(np.log(runs.N[idx]), 9), return_inverse=True)
    logk = np.bincount(inverse, np.log(runs.C[idx] / runs.D[idx])) / np.bincount(inverse)
    logk_at = float(np.interp(math.log(n), logn, logk))  # piecewise linear; the end values outside
    return float(C / math.exp(logk_at))


MIN_BRACKETING_BUDGETS = 3


def _isoflop_warnings(profiles: list[dict[str, Any]], runs: Runs) -> list[str]:
    """Honest diagnostics: optima at the edge of a budget's sampled sizes, too few budgets, exponents
    outside (0, 1) (N_opt and D_opt cannot both grow with C otherwise)."""
    out = []
    for p in profiles:
        idx = np.asarray(p["index"])
        n = runs.N[idx]
        best_n = n[np.argmin(runs.loss[idx])]
        if not p["in_range"]:
            out.append(f"budget C = {p['C']:.3g}: the fitted optimum N = {format_count(p['N_opt'])} lies outside the "
                       f"sampled sizes ({format_count(n.min())} .. {format_count(n.max())}), an extrapolation; add "
                       f"sizes {'below' if p['N_opt'] < n.min() else 'above'} them")
        elif best_n in (n.min(), n.max()):
            out.append(f"budget C = {p['C']:.3g}: the lowest loss is at the {'smallest' if best_n == n.min() else 'largest'} "
                       f"sampled size ({format_count(best_n)}), so the optimum sits at the edge of the sampled shapes; "
                       f"add sizes {'below' if best_n == n.min() else 'above'} it")
    if len(profiles) < MIN_BRACKETING_BUDGETS:
        out.append(f"only {len(profiles)} budgets bracket the fit (fewer than {MIN_BRACKETING_BUDGETS}): the exponents "
                   "rest on a line through two points; add a budget")
    return out


def _too_few_profiles(profiles: list[dict[str, Any]], skipped: list[dict[str, Any]], min_runs: int,
                      tolerance_dex: float) -> str:
    """Why Approach 2 has fewer than 2 budgets to fit, counting the budgets the runs did form (three budgets
    that grouped but whose minima lie outside their sizes are not "1 budget found")."""
    need = f"IsoFLOP needs at least 2 budgets whose runs ({max(min_runs, 3)}+ sizes each) have a loss minimum in log N"
    if not skipped:
        return (f"{need}; the runs form {len(profiles)} (budgets are runs within {tolerance_dex:g} dex of FLOPs; "
                "add runs of 3+ sizes at another budget, or set --budgets or --flop-tolerance)")
    reasons = "; ".join(f"C = {s['C']:.3g}: {s['why']}" for s in skipped)
    return (f"{need}; of the {len(profiles) + len(skipped)} budgets the runs form, {len(profiles)} "
            f"{'has' if len(profiles) == 1 else 'have'} one and {len(skipped)} {'was' if len(skipped) == 1 else 'were'} "
            f"skipped ({reasons})")


def fit_isoflop(runs: Runs, *, budgets: Sequence[float] | None = None, tolerance_dex: float = 0.1,
                min_runs: int = 3) -> dict[str, Any]:
    """Approach 2. Per budget: loss = p2·x² + p1·x + p0 with x = ln N; N_opt = exp(−p1 / 2p2),
    D_opt = the tokens C buys at N_opt from the runs' own FLOPs per token (tokens_at; not C / 6N).
    Across budgets: N_opt = k·C^a, D_opt = k'·C^b (least squares in log).
    A budget needs min_runs runs at ≥ 3 distinct N, an upward parabola (p2 > 0) and a minimum
    within FAR_MINIMUM_DEX of the sampled N; others are listed as skipped. Runs whose FLOPs chain into
    a group wider than the tolerance are refused (give --budgets). `warnings`: runs left out, optima at the
    edge of or outside the sampled sizes, fewer than 3 budgets, exponents outside (0, 1)."""
    group = group_budgets(runs.C, budgets=budgets, tolerance_dex=tolerance_dex)
    warnings = _check_clusters(runs, group, budgets, tolerance_dex)
    profiles, skipped = [], []
    far = FAR_MINIMUM_DEX * math.log(10)
    for g in sorted(set(group.tolist()) - {-1}):
        idx = np.flatnonzero(group == g)
        C = float(np.exp(np.log(runs.C[idx]).mean())) if budgets is None else float(budgets[g])
        x, y = np.log(runs.N[idx]), runs.loss[idx]
        if len(idx) < min_runs or len(np.unique(np.round(x, 9))) < 3:
            skipped.append({"C": C, "runs": int(len(idx)), "why": f"fewer than {max(min_runs, 3)} distinct model sizes"})
            continue
        p2, p1, p0 = np.polyfit(x, y, 2)
        if not p2 > 0:
            skipped.append({"C": C, "runs": int(len(idx)), "why": "loss is not convex in log N (no minimum)"})
            continue
        xo = -p1 / (2 * p2)
        if not x.min() - far <= xo <= x.max() + far:
            skipped.append({"C": C, "runs": int(len(idx)),
                            "why": f"the parabola is nearly flat: its minimum lies more than {FAR_MINIMUM_DEX:g} "
                                   "decade outside the sampled sizes (add sizes beyond the lowest-loss run)"})
            continue
        n_opt = float(math.exp(xo))
        profiles.append({"C": C, "runs": int(len(idx)), "parabola": [float(p2), float(p1), float(p0)],
                         "N_opt": n_opt, "D_opt": tokens_at(runs, idx, C, n_opt),
                         "loss_opt": float(p0 - p1 * p1 / (4 * p2)),
                         "in_range": bool(x.min() <= xo <= x.max()), "index": idx.tolist()})
    if len(profiles) < 2:
        raise UserError(_too_few_profiles(profiles, skipped, min_runs, tolerance_dex))
    logc = np.log([p["C"] for p in profiles])
    n_law = _power_law(logc, np.log([p["N_opt"] for p in profiles]))
    d_law = _power_law(logc, np.log([p["D_opt"] for p in profiles]))
    warnings += _isoflop_warnings(profiles, runs)
    for key, law in (("N_opt", n_law), ("D_opt", d_law)):
        if not 0 < law["exponent"] < 1:
            warnings.append(f"{key} ∝ C^{law['exponent']:.3f}: an exponent outside (0, 1) means one of N and D "
                            "shrinks as compute grows; the budgets' optima are not trustworthy (see the profiles)")
    return {"method": "isoflop", "n_points": len(runs), "budgets": profiles, "skipped": skipped,
            "N_opt": n_law, "D_opt": d_law, "N_opt_exponent": n_law["exponent"],
            "D_opt_exponent": d_law["exponent"], "warnings": warnings}


def isoflop_at(result: dict[str, Any], budget: float) -> dict[str, float]:
    """N_opt, D_opt and tokens per parameter from the power laws at `budget` (in log space: a
    far-off budget with a steep fitted exponent must not overflow)."""
    with np.errstate(divide="ignore"):  # a coefficient that underflowed to 0 has log -inf: out of range below
        logs = {key: float(np.log(result[key]["coefficient"])) + result[key]["exponent"] * math.log(budget)
                for key in ("N_opt", "D_opt")}
    if not all(abs(v) < _LOG_FLOAT_MAX for v in (*logs.values(), logs["D_opt"] - logs["N_opt"])):
        raise UserError(f"the IsoFLOP power laws leave the floating-point range at --budget {budget:.3g}; "
                        "choose a budget nearer the runs' compute")
    n, d = math.exp(logs["N_opt"]), math.exp(logs["D_opt"])
    return {"budget": budget, "N_opt": n, "D_opt": d, "tokens_per_param": math.exp(logs["D_opt"] - logs["N_opt"])}


# ---- plots (matplotlib, imported only here) -------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    from scalelab.files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, format="png", bbox_inches="tight")


PLOT_REACH = 1e4  # the plots extend at most this factor beyond the data in N and D (its square in C)


def plot_approach3(runs: Runs, fit: Approach3Fit, path: str | Path, *, budget: float | None = None) -> None:
    """Left: runs in the (N, D) plane coloured by loss, the fitted law's iso-loss contours in the
    same colours, iso-FLOP lines and the compute-optimal frontier. Right: loss against compute
    with the law's best achievable loss at each C (the frontier)."""
    plt = _pyplot()
    from matplotlib.colors import Normalize
    from matplotlib.ticker import LogLocator

    law = fit.law
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.4), gridspec_kw={"width_ratios": [1.15, 1]})
    lo_n, hi_n = runs.N.min() / 2, runs.N.max() * 2
    lo_d, hi_d = runs.D.min() / 2, runs.D.max() * 2
    opt = law.closed_form(budget) if budget is not None else None
    if opt is not None:  # show the budget's optimum, unless it lies decades away (then the data would vanish)
        hi_n = min(max(hi_n, opt["N"] * 2), hi_n * PLOT_REACH)
        hi_d = min(max(hi_d, opt["D"] * 2), hi_d * PLOT_REACH)
    gn, gd = np.geomspace(lo_n, hi_n, 300), np.geomspace(lo_d, hi_d, 300)
    NN, DD = np.meshgrid(gn, gd)
    LL = law.loss(NN, DD)
    q = np.quantile(runs.loss, [0.02, 0.98])
    norm = Normalize(vmin=q[0], vmax=q[1])
    cmap = plt.get_cmap("viridis")
    levels = np.linspace(q[0], q[1], 9)
    cs = ax.contour(NN, DD, LL, levels=levels, cmap=cmap, norm=norm, linewidths=1.0, alpha=0.8)
    ax.clabel(cs, fmt="%.2f", fontsize=7)
    # iso-FLOP lines C = 6ND at whole decades
    for e in range(int(np.floor(np.log10(6 * lo_n * lo_d))), int(np.ceil(np.log10(6 * hi_n * hi_d))) + 1):
        c = 10.0 ** e
        d_line = c / (6 * gn)
        m = (d_line >= lo_d) & (d_line <= hi_d)
        if m.sum() > 10:
            ax.plot(gn[m], d_line[m], color="0.75", lw=0.7, ls="--", zorder=0)
            j = np.flatnonzero(m)[int(m.sum() * 0.15)]
            ax.text(gn[j], d_line[j], f"1e{e}", fontsize=7, color="0.5", rotation=-33, ha="center", va="center")
    cgrid = np.geomspace(6 * lo_n * lo_d, 6 * hi_n * hi_d, 200)
    fn, fd = law.optimal_n(cgrid), law.optimal_d(cgrid)
    ax.plot(fn, fd, color="crimson", lw=2,
            label=f"compute-optimal: N ∝ C^{law.a:.3f}, D ∝ C^{law.b:.3f}")
    sc = ax.scatter(runs.N, runs.D, c=runs.loss, cmap=cmap, norm=norm, s=22, edgecolors="k", linewidths=0.4,
                    zorder=3)
    if opt is not None:
        shown = lo_n <= opt["N"] <= hi_n and lo_d <= opt["D"] <= hi_d
        ax.scatter([opt["N"]] if shown else [], [opt["D"]] if shown else [], marker="*", s=220, color="crimson",
                   edgecolors="k", zorder=4, label=f"C = {budget:.3g}: N = {opt['N']:.3g}, D = {opt['D']:.3g} "
                   f"({opt['tokens_per_param']:.3g} tok/param){'' if shown else ', beyond the plotted range'}")
    ax.set(xscale="log", yscale="log", xlim=(lo_n, hi_n), ylim=(lo_d, hi_d),
           xlabel="parameters N", ylabel="training tokens D",
           title=f"L = {law.E:.3f} + {law.A:.4g}/N^{law.alpha:.3f} + {law.B:.4g}/D^{law.beta:.3f}")
    ax.xaxis.set_major_locator(LogLocator(numticks=12))
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    fig.colorbar(sc, ax=ax, label="final loss (points) / fitted loss (contours)", pad=0.01)
    # right: loss vs compute, points coloured by model size, fitted frontier
    from matplotlib.colors import LogNorm

    sc2 = ax2.scatter(runs.C, runs.loss, c=runs.N, cmap="plasma", norm=LogNorm(), s=18, edgecolors="k",
                      linewidths=0.3)
    cr = np.geomspace(runs.C.min() / 2, min(max(runs.C.max() * 2, budget or 0), runs.C.max() * PLOT_REACH ** 2), 200)
    ax2.plot(cr, law.loss(law.optimal_n(cr), law.optimal_d(cr)), color="crimson", lw=2,
             label="fitted loss at the compute-optimal N, D")
    ax2.axhline(law.E, color="0.5", ls=":", lw=1, label=f"irreducible E = {law.E:.3f}")
    ax2.set(xscale="log", xlabel="training compute C = 6ND (FLOPs)", ylabel="final loss",
            title=f"{len(runs)} runs, Huber δ = {fit.delta:g}, objective {fit.objective:.6g}")
    ax2.legend(fontsize=8)
    fig.colorbar(sc2, ax=ax2, label="parameters N", pad=0.01)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_isoflop(runs: Runs, result: dict[str, Any], path: str | Path) -> None:
    """Left: loss against N per budget with each budget's parabola and minimum. Right: N_opt and
    D_opt against C with the fitted power laws."""
    plt = _pyplot()

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    profiles = result["budgets"]
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(profiles)))
    for p, col in zip(profiles, colors):
        idx = np.asarray(p["index"])
        x = np.log(runs.N[idx])
        xs = np.linspace(x.min() - 0.15, x.max() + 0.15, 100)
        ax.scatter(runs.N[idx], runs.loss[idx], color=col, s=22, edgecolors="k", linewidths=0.4, zorder=3)
        ax.plot(np.exp(xs), np.polyval(p["parabola"], xs), color=col, lw=1.5, label=f"C = {p['C']:.2g}")
        ax.scatter([p["N_opt"]], [p["loss_opt"]], marker="v", color=col, s=70, edgecolors="k", zorder=4)
    ax.set(xscale="log", xlabel="parameters N", ylabel="final loss", title="IsoFLOP profiles (▼ fitted minimum)")
    ax.legend(fontsize=8, ncol=2)
    C = np.array([p["C"] for p in profiles])
    cr = np.geomspace(C.min() / 1.5, C.max() * 1.5, 100)
    for key, col, marker in (("N_opt", "tab:blue", "o"), ("D_opt", "tab:orange", "s")):
        law = result[key]
        ax2.scatter(C, [p[key] for p in profiles], color=col, marker=marker, edgecolors="k", zorder=3)
        se = law["exponent_stderr"]
        spread = f" ± {se:.3f}" if se is not None else " (2 budgets: no s.e.)"
        ax2.plot(cr, law["coefficient"] * cr ** law["exponent"], color=col,
                 label=f"{key} ∝ C^{law['exponent']:.3f}{spread}")
    ax2.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", ylabel="parameters / tokens",
            title="compute-optimal N and D per budget")
    ax2.legend(fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
