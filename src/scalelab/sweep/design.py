"""Designing a scaling sweep: which runs to train, with which full training configs.

For each budget C the planner's search (scaling/search.py) gives the prior optimum N_opt(C) under
the prior loss law. Around it the design takes `points` shapes spaced evenly in log N on one grid
shared by every budget (log10 N = j · step, step = 2 · spread / (points - 1) dex), each grid value
snapped to the space's shape closest in log N. The snap depends on the grid value only, so budgets
that sample the same N train the same shape: that sharing is what makes a WSD design cheap. Each
run's D is solved exactly from C with the shape's exact training FLOPs per token at the sequence
length (counting.training_flops_per_token), D = C / fpt, and trained for ceil(D / batch) steps.

Methods:
  isoflop  every (budget, shape) point is its own run with a full schedule (the law's, e.g. cosine);
  grid     every shape of any budget trained at every budget (a full N × D grid);
  wsd      the isoflop points, but each shape trains once at a constant rate (a "stable" run) and
           every point of that shape is a decay branch (train.branch_from) taken from the stable
           run's checkpoint at step k with a decay of T - k steps (about decay_fraction of T), T the
           point's length: the shape costs its longest run plus the other points' decays.

Hyperparameters (peak lr, batch tokens, warmup, schedule, min lr) come from a hyperparameter law of
compute (scaling/hparams.py; DeepSeek LLM's by default). The branches of one WSD shape share their
stable run, hence one set of hyperparameters: those of the shape's largest point.

The design is a pure function of its inputs; its fingerprint (a hash of the inputs and every run)
ties a sweep directory to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.config import apply_overrides
from scalelab.errors import UserError
from scalelab.scaling.hparams import HyperparameterLaw, hyperparameters_for
from scalelab.scaling.laws import LossLaw
from scalelab.scaling.search import SearchSpace, enumerate_shapes, evaluate, search

METHODS = ("isoflop", "grid", "wsd")
SWEEP_FILE = "sweep.toml"
RUNS_DIR = "runs"
FORMAT = 1
TUNE_LR = (0.5, 1.0, 2.0)  # --tune-lr: multiples of the law's learning rate ...
TUNE_BATCH = (0.5, 1.0, 2.0)  # ... and of its batch, at the smallest TUNE_BUDGETS budgets
TUNE_BUDGETS = 2  # sweep fit's hyperparameter laws need grids at two budgets at least
MIN_STEPS = 20  # fewer optimizer steps than this: a note says the run measures early optimisation
MAX_MICRO_BATCH = 16  # sequences per forward/backward: the largest divisor of the batch up to this
# What the design decides for every run: --set may not change these (the figures assume them).
DESIGN_OWNED = ("data.dir", "train.seq_len", "train.global_batch_tokens", "train.max_steps", "train.max_tokens",
                "train.max_flops", "train.lr", "train.min_lr", "train.warmup", "train.schedule", "train.decay",
                "train.decay_shape", "train.branch_from", "train.init_from", "logging.run_dir")
COMPARE_SPACE_FIELDS = {"style": "style", "num_key_value_heads": "kv_heads", "kv_heads": "kv_heads"}


@dataclass(frozen=True)
class Spec:
    """Everything a design is made from (the fingerprint covers all of it)."""
    budgets: tuple[float, ...]
    space: SearchSpace
    law: LossLaw
    hparams: HyperparameterLaw
    data_dir: str  # absolute
    points: int = 5
    method: str = "isoflop"
    spread_dex: float = 0.5  # half the span of log10 N sampled at each budget
    decay_fraction: float = 0.2
    decay_shape: str = "1-sqrt"
    batch_tokens: int | None = None  # a fixed global batch instead of the law's
    tune_lr: bool = False  # add learning-rate x batch grids at the smallest budgets
    compare: tuple[str, tuple[Any, ...]] | None = None
    overrides: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        return {"format": FORMAT, "method": self.method, "budgets": list(self.budgets), "points": self.points,
                "spread_dex": self.spread_dex, "space": self.space.describe(), "law": self.law.to_dict(),
                "hparams": self.hparams.to_dict(), "data_dir": self.data_dir,
                "decay_fraction": self.decay_fraction, "decay_shape": self.decay_shape,
                "batch_tokens": self.batch_tokens, "tune_lr": self.tune_lr,
                "compare": None if self.compare is None else {"field": self.compare[0], "values": list(self.compare[1])},
                "overrides": list(self.overrides)}


def check_spec(spec: Spec) -> None:
    """UserError for inputs no design can come from (before any search)."""
    b = spec.budgets
    if not b:
        raise UserError("--budgets is empty; give budgets in FLOPs in increasing order, e.g. --budgets 1e13,3e13,1e14")
    if any(not (math.isfinite(x) and x > 0) for x in b):
        raise UserError(f"--budgets must be positive numbers of FLOPs, got {','.join(f'{x:g}' for x in b)}")
    if any(y <= x for x, y in zip(b, b[1:])):
        raise UserError(f"--budgets must be strictly increasing, got {','.join(f'{x:g}' for x in b)}; "
                        f"write them in order, e.g. {','.join(f'{x:g}' for x in sorted(set(b)))}")
    if spec.method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got {spec.method!r}")
    if not 2 <= spec.points <= 50:
        raise UserError(f"--points must be between 2 and 50 (shapes per budget), got {spec.points}")
    if not (math.isfinite(spec.spread_dex) and 0 < spec.spread_dex <= 3):
        raise UserError(f"--spread must be in (0, 3] decades of N either side of the optimum, got {spec.spread_dex:g}")
    if not 0 < spec.decay_fraction < 1:
        raise UserError(f"--decay-fraction must be in (0, 1), got {spec.decay_fraction:g}")
    if spec.batch_tokens is not None and (spec.batch_tokens < spec.space.seq_len
                                          or spec.batch_tokens % spec.space.seq_len):
        raise UserError(f"--batch-tokens {spec.batch_tokens} must be a positive multiple of --seq-len "
                        f"{spec.space.seq_len}")
    for item in spec.overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith("model.") or key in DESIGN_OWNED:
            raise UserError(f"--set {item}: the design chooses {key} for each run; use the design's flags "
                            "(--budgets, --hparams, --batch-tokens, --seq-len, --compare ...) instead")


# ---- shapes -------------------------------------------------------------------------------------

def grid_step(spec: Spec) -> float:
    """The spacing of the shared log10 N grid (dex)."""
    return 2 * spec.spread_dex / (spec.points - 1)


def snapped_shapes(space: SearchSpace, step: float) -> tuple[dict[str, np.ndarray], dict[int, int]]:
    """The space's shapes (budget-independent constraints applied) and, for every grid index j with a
    shape within half a step of N = 10^(j·step), the index of the shape closest in log N."""
    shapes, _ = enumerate_shapes(space)
    ev = evaluate(shapes, space, 1.0, _UNIT_LAW)
    keep = np.ones(len(shapes["n_layer"]), dtype=bool)
    for name in ("aspect", "max_params", "memory"):
        if name in ev["masks"]:
            keep &= ev["masks"][name]
    idx = np.flatnonzero(keep)
    if not len(idx):
        raise UserError("no shape of the search space passes its aspect, size and memory limits; widen --hidden, "
                        "--layers or --aspect")
    logn = np.log10(ev["N"][idx])
    snaps = {}
    for j in range(int(math.floor(logn.min() / step)), int(math.ceil(logn.max() / step)) + 1):
        gap = np.abs(logn - j * step)
        best = int(np.argmin(gap))  # first of equals: enumeration order
        if gap[best] <= step / 2:
            snaps[j] = int(idx[best])
    return shapes, snaps


def shapes_n(shapes, space: SearchSpace, i: int) -> float:
    """The parameter count of shape i."""
    return float(evaluate({k: v[i:i + 1] for k, v in shapes.items()}, space, 1.0, _UNIT_LAW)["N"][0])


_UNIT_LAW = LossLaw(E=1.0, A=1.0, B=1.0, alpha=0.5, beta=0.5, name="unit")  # masks and N only


def budget_points(C: float, spec: Spec, space: SearchSpace, shapes, snaps: dict[int, int]) -> tuple[list[int], dict]:
    """The shape indices sampled at budget C (centred on the prior optimum, feasible at C) and the
    planner's result there. UserError when no shape of the space can spend C."""
    ev = evaluate(shapes, space, C, spec.law)
    one_sequence = ev["fpt"] * space.seq_len
    if not (one_sequence <= C).any():
        i = int(one_sequence.argmin())
        least = float(one_sequence[i])
        scale = 10.0 ** (math.floor(math.log10(least)) - 2)
        raise UserError(f"budget {C:g} is too small for any shape of the space: the cheapest "
                        f"({shapes['n_layer'][i]}L x {shapes['n_embd'][i]}H) needs {least:.6g} FLOPs for one sequence "
                        f"of {space.seq_len}; give budgets of at least {math.ceil(least / scale) * scale:.3g}")
    plan = search(C, spec.law, space, top=1)  # its errors explain an otherwise infeasible budget
    step = grid_step(spec)
    centre = round(math.log10(plan.best["N"]) / step)
    feasible = np.ones(len(shapes["n_layer"]), dtype=bool)
    for m in ev["masks"].values():
        feasible &= m
    # the `points` feasible grid shapes nearest the optimum: centred on it, or, where it lies near the
    # space's edge, reaching further into the space on the other side
    near = sorted((j for j, i in snaps.items() if feasible[i]), key=lambda j: (abs(j - centre), j))
    chosen: list[int] = []
    for j in near:
        if snaps[j] not in chosen and len(chosen) < spec.points:
            chosen.append(snaps[j])
    chosen.sort(key=lambda i: shapes_n(shapes, space, i))
    if not chosen:
        raise UserError(f"budget {C:g}: no shape near the prior optimum (N ≈ {plan.best['N']:.3g}) can spend it; "
                        "widen --hidden / --layers or change --budgets")
    taken = [j for j in near if snaps[j] in chosen]
    plan.one_sided = len(chosen) > 1 and (centre <= min(taken) or centre >= max(taken))
    # what cuts the ladder off at that edge: the space's end, or limits (--max-tokens...) on its shapes beyond
    below = centre <= min(taken) if plan.one_sided else False
    beyond = {i for j, i in snaps.items() if (j < min(taken) if below else j > max(taken))} if plan.one_sided else set()
    plan.edge_limits = sorted({k for i in beyond for k, m in ev["masks"].items() if not m[i]})
    return chosen, plan


# ---- runs ---------------------------------------------------------------------------------------

def variants(spec: Spec) -> list[tuple[str, SearchSpace, dict[str, Any]]]:
    """(label, search space, model-field overrides) of each --compare variant (one, unlabelled, without)."""
    if spec.compare is None:
        return [("", spec.space, {})]
    field, values = spec.compare
    out = []
    for v in values:
        label = f"{field}={v}"
        if field in COMPARE_SPACE_FIELDS:
            key = COMPARE_SPACE_FIELDS[field]
            out.append((label, dataclasses.replace(spec.space, **{key: v if key == "style" else (int(v),)}), {}))
        else:
            out.append((label, spec.space, {field: v}))
    return out


def model_config(space: SearchSpace, shapes, i: int, fields: dict[str, Any]):
    from scalelab.presets import resolve_model_section

    base = space.model_config(shapes["n_layer"][i], shapes["n_embd"][i], shapes["n_head"][i],
                              shapes["num_key_value_heads"][i])
    if not fields:
        return base
    return resolve_model_section({**base.to_dict(), **fields}, where=f"--compare {', '.join(fields)}")


def shape_name(cfg) -> str:
    return f"L{cfg.n_layer}-H{cfg.n_embd}-A{cfg.n_head}-KV{cfg.num_key_value_heads}"


def micro_batch(sequences: int) -> int:
    """The largest divisor of the global batch (in sequences) up to MAX_MICRO_BATCH."""
    return max(d for d in range(1, min(sequences, MAX_MICRO_BATCH) + 1) if sequences % d == 0)


def hyperparameters(spec: Spec, cfg, tokens: float, batch_tokens: int | None = None) -> dict[str, Any]:
    """The law's hyperparameters for a run of `cfg` on `tokens` tokens, at `batch_tokens`, --batch-tokens or
    the law's batch (the warmup follows the batch)."""
    hp = hyperparameters_for(cfg, spec.space.seq_len, tokens, spec.hparams,
                             batch_tokens=batch_tokens or spec.batch_tokens)
    hp["batch_tokens"] = int(hp["batch_tokens"])
    return hp


def tuning_runs(spec: Spec, label: str, C: float, cfg) -> list[dict[str, Any]]:
    """--tune-lr: the learning-rate x batch grid around the law's values for one (budget, shape) point,
    its centre left out (the point's own run): what `sweep fit` fits hyperparameter laws to."""
    seq = spec.space.seq_len
    base = hyperparameters(spec, cfg, C / _fpt(cfg, spec))
    runs = []
    for bm in TUNE_BATCH:
        batch = max(seq, round(base["batch_tokens"] * bm / seq) * seq)
        for lm in TUNE_LR:
            if (lm, bm) == (1, 1):
                continue
            hp = hyperparameters(spec, cfg, C / _fpt(cfg, spec), batch_tokens=batch)
            hp.update(peak_lr=hp["peak_lr"] * lm, min_lr=hp["min_lr"] * lm)
            p = point(spec, label, C, cfg, hp, spec.law, "tune")
            p["name"] += f"-lr{lm:g}x-b{bm:g}x"
            runs.append(dict(p, hparams=_hp_record(hp),
                             config=train_config(spec, cfg, hp, p["steps"], {"schedule": hp["schedule"]})))
    return runs


def train_config(spec: Spec, cfg, hp: dict[str, Any], steps: int, schedule: dict[str, Any],
                 checkpoint: dict[str, int] | None = None) -> dict[str, Any]:
    """One run's full training config (TrainConfig.to_dict() form), --set applied, checked."""
    from scalelab.train.config import config_from_dict

    seqs = hp["batch_tokens"] // spec.space.seq_len
    data: dict[str, Any] = {
        "model": cfg.to_dict(),
        "data": {"dir": spec.data_dir},
        "train": {"seq_len": spec.space.seq_len, "micro_batch_size": micro_batch(seqs),
                  "global_batch_tokens": hp["batch_tokens"], "max_steps": steps, "lr": hp["peak_lr"],
                  "min_lr": hp["min_lr"], "warmup": float(hp["warmup"]), **schedule},
        "eval": {"every": 0, "at_end": True},
        "checkpoint": checkpoint or {"every": max(1, steps // 4), "keep": 2},
        "logging": {"every": max(1, steps // 20)},
    }
    apply_overrides(data, spec.overrides)
    config_from_dict(json.loads(json.dumps(data)), where="the designed config")  # raises on a bad --set
    return data


def point(spec: Spec, label: str, C: float, cfg, hp, prior: LossLaw, kind: str) -> dict[str, Any]:
    """A (budget, shape) point: its exact D, steps and FLOPs with this batch."""
    from scalelab import counting

    seq = spec.space.seq_len
    fpt = float(counting.training_flops_per_token(cfg, seq))
    tokens = C / fpt
    steps = max(1, math.ceil(tokens / hp["batch_tokens"]))
    n = float(counting.count_params(cfg).total)
    prefix = f"{label}/" if label else ""
    return {"name": f"{prefix}C{C:.3g}-{shape_name(cfg)}", "variant": label, "kind": kind, "budget": C,
            "shape": shape_name(cfg), "N": n, "N_non_embedding": float(counting.count_params(cfg).non_embedding),
            "flops_per_token": fpt, "tokens_exact": tokens, "steps": steps, "tokens": steps * hp["batch_tokens"],
            "flops": steps * hp["batch_tokens"] * fpt, "prior_loss": float(prior.loss(n, tokens))}


EDGE_LIMITS = {  # a mask of scaling.search.evaluate -> what excludes a shape, and how to allow it
    "max_tokens": "need more tokens than --max-tokens (the data's training tokens by default: one pass); "
                  "raise --max-tokens to allow repeated passes, or use larger budgets",
    "max_params": "exceed --max-params; raise it",
    "aspect": "fall outside --aspect; widen it",
    "one_sequence": "cannot train one sequence at this budget",
    "memory": "do not fit the accelerator's memory",
}


def edge_reason(limits: list[str]) -> str:
    """Why a budget's ladder lies on one side of its prior optimum: the space ends there, or its shapes
    beyond are excluded by a limit (at 6e11 FLOPs the Shakespeare study's 15.5K shape would need 6.5M tokens
    of 4.5M: the note said to widen --hidden, which had its smallest width already)."""
    if not limits:
        return ("the space's shapes, so its ladder lies on one side of it (widen --hidden / --layers / --aspect "
                "to bracket it)")
    return ("the shapes it may train, so its ladder lies on one side of it: the space's shapes beyond "
            + "; and ".join(EDGE_LIMITS.get(k, f"fail {k}") for k in limits))


def design(spec: Spec) -> dict[str, Any]:
    """The runs of a design (each with its full training config) and its cost; see the module doc."""
    check_spec(spec)
    runs: list[dict[str, Any]] = []
    notes: list[str] = []
    for label, space, fields in variants(spec):
        shapes, snaps = snapped_shapes(space, grid_step(spec))
        per_budget, optima = {}, {}
        for C in spec.budgets:
            chosen, plan = budget_points(C, spec, space, shapes, snaps)
            per_budget[C], optima[C] = chosen, plan.best["N"]
            if plan.one_sided:
                notes.append(f"{label + ': ' if label else ''}budget {C:g}: the prior optimum (N ≈ "
                             f"{plan.best['N']:.3g}) is at the edge of {edge_reason(plan.edge_limits)}")
            if len(chosen) < min(3, spec.points):
                notes.append(f"{label + ': ' if label else ''}budget {C:g} has {len(chosen)} feasible shape(s) near "
                             "its optimum; a parabola needs 3 (widen --hidden / --layers)")
        if spec.method == "grid":
            every = sorted({i for c in per_budget.values() for i in c})
            per_budget = {C: [i for i in every if _feasible(shapes, space, C, i)] for C in spec.budgets}
        cfgs = {i: model_config(space, shapes, i, fields) for c in per_budget.values() for i in c}
        if spec.tune_lr:  # at each of the smallest budgets, the shape nearest its prior optimum
            for C in spec.budgets[:TUNE_BUDGETS]:
                best = optima[C]
                i = min(per_budget[C], key=lambda i: abs(math.log(shapes_n(shapes, space, i) / best)))
                runs += tuning_runs(spec, label, C, cfgs[i])
        if spec.method == "wsd":
            runs += _wsd_runs(spec, label, per_budget, cfgs)
        else:
            for C, chosen in per_budget.items():
                for i in chosen:
                    hp = hyperparameters(spec, cfgs[i], C / _fpt(cfgs[i], spec))
                    p = point(spec, label, C, cfgs[i], hp, spec.law, spec.method)
                    sched = {"schedule": hp["schedule"]}
                    runs.append(dict(p, hparams=_hp_record(hp),
                                     config=train_config(spec, cfgs[i], hp, p["steps"], sched)))
    short = [r["name"] for r in runs if r["kind"] != "stable" and r["steps"] < MIN_STEPS]
    if short:
        notes.append(f"{len(short)} run(s) train fewer than {MIN_STEPS} steps ({', '.join(short[:3])}"
                     f"{' ...' if len(short) > 3 else ''}): their losses measure the first steps of optimisation more "
                     "than the model; raise the budgets or lower --batch-tokens")
    for r in runs:
        r["run_dir"] = f"{RUNS_DIR}/{r['name']}"
    cost = {"flops": sum(r["flops_trained"] if "flops_trained" in r else r["flops"] for r in runs)}
    if spec.method == "wsd":
        cost["isoflop_flops"] = sum(r["flops"] for r in runs if r["kind"] == "branch")
    body = _drop_none(json.loads(json.dumps({"design": spec.describe(), "runs": runs})))  # as sweep.toml holds it
    return {"fingerprint": fingerprint(body), **body, "cost": cost, "notes": notes}


def _fpt(cfg, spec: Spec) -> float:
    from scalelab import counting

    return float(counting.training_flops_per_token(cfg, spec.space.seq_len))


def _feasible(shapes, space: SearchSpace, C: float, i: int) -> bool:
    ev = evaluate({k: v[i:i + 1] for k, v in shapes.items()}, space, C, _UNIT_LAW)
    return all(bool(m[0]) for m in ev["masks"].values())


def _hp_record(hp: dict[str, Any]) -> dict[str, Any]:
    return {k: hp[k] for k in ("peak_lr", "min_lr", "batch_tokens", "warmup", "schedule", "compute",
                               "compute_convention", "law")}


def _wsd_runs(spec: Spec, label: str, per_budget: dict[float, list[int]], cfgs) -> list[dict[str, Any]]:
    """Per shape: one stable run (constant lr after warmup) to its latest branch point, and a decay
    branch per (budget, shape) point. Branch points k lie on a grid of `unit` steps (the stable run's
    checkpoint interval), so a point's decay is T - k ≥ round(decay_fraction · T) steps."""
    runs = []
    by_shape: dict[int, list[float]] = {}
    for C, chosen in per_budget.items():
        for i in chosen:
            by_shape.setdefault(i, []).append(C)
    for i, budgets in by_shape.items():
        cfg = cfgs[i]
        hp = hyperparameters(spec, cfg, max(budgets) / _fpt(cfg, spec))  # the shape's largest point's
        points = [point(spec, label, C, cfg, hp, spec.law, "branch") for C in budgets]
        starts = [p["steps"] - max(1, round(spec.decay_fraction * p["steps"])) for p in points]
        unit = max(1, min(starts) // 8)
        ks = [max(unit, s // unit * unit) for s in starts]
        warmup = min(int(hp["warmup"]), min(ks))
        hp = dict(hp, warmup=float(warmup), schedule="wsd")
        prefix = f"{label}/" if label else ""
        stable_name = f"{prefix}stable-{shape_name(cfg)}"
        stable_steps = max(ks)
        stable = dict(point(spec, label, max(budgets), cfg, hp, spec.law, "stable"), name=stable_name, steps=stable_steps)
        stable.pop("budget")
        stable.pop("prior_loss")
        stable.update(tokens=stable_steps * hp["batch_tokens"], flops=stable_steps * hp["batch_tokens"] * stable["flops_per_token"],
                      branch_steps=sorted(set(ks)), hparams=_hp_record(dict(hp, schedule="constant")),
                      config=train_config(spec, cfg, hp, stable_steps,
                                          {"schedule": "constant"},
                                          checkpoint={"every": unit, "keep": 1_000_000}))  # every branch point
        runs.append(stable)
        for p, k in zip(points, ks):
            decay = p["steps"] - k
            sched = {"schedule": "wsd", "decay": float(decay), "decay_shape": spec.decay_shape,
                     "branch_from": f"{RUNS_DIR}/{stable_name}/checkpoints/step_{k:08d}"}
            runs.append(dict(p, branch_of=stable_name, branch_step=k, decay_steps=decay,
                             flops_trained=decay * hp["batch_tokens"] * p["flops_per_token"],
                             hparams=_hp_record(hp), config=train_config(spec, cfg, hp, p["steps"], sched)))
    return runs


def fingerprint(body: dict[str, Any]) -> str:
    """sha256 of the design's inputs and runs, as canonical JSON (first 16 hex digits)."""
    text = json.dumps(body, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- the sweep file -----------------------------------------------------------------------------

def sweep_toml(result: dict[str, Any], argv: list[str] | None = None) -> str:
    import tomli_w

    header = ["# scalelab sweep design: written by `scalelab sweep design` (do not edit: the fingerprint",
              "# ties the runs under runs/ to this design)"]
    if argv:
        header.append("# " + " ".join(argv))
    doc = {"fingerprint": result["fingerprint"], "design": result["design"], "cost": result["cost"],
           "notes": result["notes"], "runs": result["runs"]}
    return "\n".join(header) + "\n" + tomli_w.dumps(doc)


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    if isinstance(d, list):
        return [_drop_none(v) for v in d]
    return d


def read_sweep(out_dir: str | Path) -> dict[str, Any]:
    """OUT_DIR/sweep.toml, checked: a sweep directory made by `sweep design`, its runs unchanged."""
    import tomllib

    path = Path(out_dir) / SWEEP_FILE
    if not path.is_file():
        raise UserError(f"{out_dir} is not a sweep directory (no {SWEEP_FILE}); make one with "
                        f"`scalelab sweep design {out_dir} --budgets ...`")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
        recorded, body = doc["fingerprint"], {"design": doc["design"], "runs": doc["runs"]}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a sweep file written by `scalelab sweep design` ({e}); design the sweep "
                        "again into a new directory") from None
    if fingerprint(body) != recorded:
        raise UserError(f"{path}: its runs no longer match its fingerprint {recorded} (edited by hand?); design "
                        "the sweep again into a new directory")
    return doc


def existing_design(out_dir: Path) -> str | None:
    """The fingerprint of the sweep in OUT_DIR, None when OUT_DIR is new or empty; UserError when it
    holds something else."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return None
    if not (out_dir / SWEEP_FILE).is_file():
        raise UserError(f"{out_dir} is not empty and is not a sweep directory (no {SWEEP_FILE}); give a new or "
                        "empty OUT_DIR")
    return read_sweep(out_dir)["fingerprint"]
