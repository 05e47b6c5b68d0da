"""`scalelab sweep fit OUT_DIR`: fit a finished (or partly finished) sweep and extrapolate.

For each variant of the design (one, or one per `--compare` value):
- the runs: every finished run of the variant (done, as `sweep status` says) but the WSD stable trunks;
  N = total parameters, D = tokens and C = exact training FLOPs logged at the final evaluation, loss = that
  evaluation's val_loss; learning-rate x batch grids (sweep design --tune-lr) are found by
  hparams.grid_groups, fitted as hyperparameter laws (DeepSeek LLM's method) and reduced to their best run;
- Approach 3 (scaling.fit.fit_approach3) with a bootstrap over runs, and Approach 2 (fit_isoflop, grouped by
  the design's budgets, D_opt from the runs' exact FLOPs per token);
- the recommendation at the target budget: the planner's (scaling.search) best shape under the fitted law
  in the design's search space (style, head dims, KV heads, vocabulary, sequence length; width and depth
  grow with the budget), its exact tokens, hyperparameters from the fitted hyperparameter law (or the
  design's law), and the predicted loss with a 95% bootstrap prediction interval: each resampled law's loss
  at the recommended (N, D) times a resampled run residual (so the interval covers a single run's noise).
With two variants, `comparison` says which predicts the lower loss at the target, by how much, and whether
the bootstrap interval of the difference excludes zero.

Writes OUT_DIR/fit.json (FIT_FILE; keys in docs/interfaces.md, read by `sweep verify`), OUT_DIR/report.md
and the PNGs it shows. No torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.errors import UserError
from scalelab.scaling import fit as F
from scalelab.scaling.hparams import (HyperparameterLaw, hyperparameter_law_from_dict, hyperparameters_for)
from scalelab.scaling.laws import LossLaw
from scalelab.sweep.execute import run_progress

FIT_FILE = "fit.json"
REPORT_FILE = "report.md"
FORMAT = 1
DEFAULT_EXTRAPOLATION = 10.0  # the default target budget: this times the largest budget
DEFAULT_BOOTSTRAP = 200
COMPARE_SPACE_FIELDS = {"style": "style", "num_key_value_heads": "kv_heads", "kv_heads": "kv_heads"}
NO_FLOOR = 0.01  # E below this fraction of the lowest run loss: the fit found no irreducible loss
NOT_FIT_KINDS = ("stable",)  # WSD trunks: constant learning rate, no decay; their branches are the points


# ---- reading the sweep -----------------------------------------------------------------------------

def read_curves(run_dir: Path) -> dict[str, list[float]]:
    """The training records of RUN/metrics.jsonl as lists: step, tokens, loss, lr (for the plots)."""
    out: dict[str, list[float]] = {"step": [], "tokens": [], "loss": [], "lr": []}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("kind") == "train" and all(
                isinstance(rec.get(k), (int, float)) for k in out):
            for k in out:
                out[k].append(float(rec[k]))
    return out


def collect(out_dir: Path, doc: dict[str, Any]) -> dict[str, Any]:
    """{variant label: F.Runs (source = run name)}, the unfinished runs' names, and per-run curves."""
    by_variant: dict[str, list[tuple]] = {}
    unfinished, curves = [], {}
    for run in doc["runs"]:
        if run.get("kind") in NOT_FIT_KINDS:
            continue
        run_dir = out_dir / run["run_dir"]
        if run_progress(out_dir, run)["state"] != "done":  # as `sweep status` says
            unfinished.append(run["name"])
            continue
        n, d, loss, c, _ = F.read_run_dir(run_dir)
        hp = F.run_hyperparameters(run_dir) or (math.nan, math.nan)
        c = c if c is not None else float(run["flops_per_token"]) * d
        by_variant.setdefault(run.get("variant", ""), []).append((n, d, loss, c, run["name"], *hp))
        curves[run["name"]] = dict(read_curves(run_dir), budget=run.get("budget"), variant=run.get("variant", ""))
    runs = {}
    for label, rows in by_variant.items():
        n, d, loss, c, names, lr, batch = zip(*rows)
        has_hp = not any(math.isnan(x) for x in lr + batch)
        runs[label] = F.Runs(np.array(n), np.array(d), np.array(loss), np.array(c), list(names),
                             np.array(lr) if has_hp else None, np.array(batch) if has_hp else None)
    return {"runs": runs, "unfinished": unfinished, "curves": curves}


def variant_labels(doc: dict[str, Any]) -> list[str]:
    compare = doc["design"].get("compare")
    if not compare:
        return [""]
    return [f"{compare['field']}={v}" for v in compare["values"]]


GROW = 4  # the recommendation's width and depth ranges reach this times the design's largest


def grown_range(text: str) -> tuple[int, ...]:
    """A SearchSpace.describe() range ("LO:HI:STEP" or "A,B,...") extended to GROW x its largest value (same
    step; a list: its smallest gap), so the shape at a budget past the sweep's is not cut off by the
    ranges the sweep's own budgets needed. A single value stays as it is: the design fixed that dimension
    (e.g. --layers 1), its runs never varied it, and L(N, D) cannot tell what changing it would cost."""
    if ":" in text:
        lo, hi, step = (int(x) for x in text.split(":"))
    else:
        values = sorted(int(x) for x in text.split(","))
        lo, hi = values[0], values[-1]
        step = min((b - a for a, b in zip(values, values[1:])), default=0)
    if lo == hi or step == 0:
        return (lo,)
    return tuple(range(lo, GROW * hi + 1, step))


def search_space(design: dict[str, Any], label: str, models: list[dict[str, Any]] = ()):
    """The design's search space for one variant (width and depth ranges grown, grown_range; its --max-tokens
    and --max-params kept), and the model fields the variant sets outside the space ({} for none). A style variant's KV heads are those its runs
    (`models`: their [model] tables) trained with (MHA when every run has as many as query heads), and its
    FFN ratio the style's."""
    from scalelab.scaling.search import SearchSpace

    d = design["space"]
    kw: dict[str, Any] = {"style": d["style"], "head_dims": tuple(d["head_dims"]), "seq_len": int(d["seq_len"]),
                          "hidden": grown_range(str(d["hidden"])), "layers": grown_range(str(d["layers"])),
                          "vocab_size": int(d["vocab_size"]), "ffn_ratio": float(d["ffn_ratio"]),
                          "aspect": tuple(d["aspect"]) if d.get("aspect") else None,
                          # the design's data and size limits hold for the extrapolation too (one pass over the data)
                          "max_tokens": d.get("max_tokens"), "max_params": d.get("max_params")}
    if d.get("kv_heads") == "MHA":
        kw["mha"] = True
    elif d.get("kv_heads"):
        kw["kv_heads"] = tuple(int(k) for k in d["kv_heads"])
    fields: dict[str, Any] = {}
    if label:
        field, value = label.split("=", 1)
        compare = design["compare"]
        value = next(v for v in compare["values"] if str(v) == value)
        if field in COMPARE_SPACE_FIELDS:
            key = COMPARE_SPACE_FIELDS[field]
            if key == "style":
                kv = {int(m["num_key_value_heads"]) for m in models}
                mha = bool(models) and all(m["num_key_value_heads"] == m["n_head"] for m in models)
                kw.update(style=str(value), mha=mha, kv_heads=None if mha or not kv else tuple(sorted(kv)))
                kw.pop("ffn_ratio")
            else:
                kw["kv_heads"], kw["mha"] = (int(value),), False
        else:
            fields[field] = value
    return SearchSpace(**kw), fields


# ---- fitting one variant -----------------------------------------------------------------------------

def prediction_interval(laws: list[LossLaw], residuals: np.ndarray, N: float, D: float, *, seed: int = 0,
                        level: float = 0.95) -> list[float] | None:
    """A bootstrap prediction interval for one run's loss at (N, D): each resampled law's loss times a
    resampled log residual of the full fit (the runs' own noise around the law)."""
    if len(laws) < 2:
        return None
    rng = np.random.default_rng(seed)
    pred = np.array([float(law.loss(N, D)) for law in laws])
    pred = pred * np.exp(rng.choice(residuals, size=len(pred)))
    lo, hi = np.percentile(pred, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def _recommend(law: LossLaw, hp_law: HyperparameterLaw, design: dict[str, Any], label: str, target: float,
               models: list[dict[str, Any]]):
    """The planner's best shape at the target under the fitted law, its tokens and hyperparameters."""
    from scalelab import counting
    from scalelab.config import ModelConfig
    from scalelab.scaling.search import search

    space, fields = search_space(design, label, models)
    try:
        result = search(target, law, space, top=1)
    except UserError as e:
        raise UserError(f"no recommendation at C = {target:.3g} under the fitted law "
                        f"{law.E:.4g} + {law.A:.4g}/N^{law.alpha:.3g} + {law.B:.4g}/D^{law.beta:.3g}: {e}") from None
    best = result.best
    cfg = ModelConfig(**best["config"])
    if fields:  # a field outside the search space: the planner's shape with it set (parsed as --set would)
        cfg = cfg.with_overrides([f"{k}={v}" for k, v in fields.items()])
    seq = space.seq_len
    fpt = float(counting.training_flops_per_token(cfg, seq))
    # a sweep trained at a fixed batch (--batch-tokens) extrapolates at that batch
    hp = hyperparameters_for(cfg, seq, target / fpt, hp_law, batch_tokens=design.get("batch_tokens"))
    batch = int(hp["batch_tokens"])
    steps = max(1, math.ceil(target / fpt / batch))
    N = float(counting.count_params(cfg).total)
    D = float(steps * batch)
    return {"C": target, "flops": D * fpt, "config": cfg.to_dict(), "name": cfg.name(),
            "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
            "num_key_value_heads": cfg.num_key_value_heads, "N": N, "D": D, "seq_len": seq, "steps": steps,
            "tokens_per_param": D / N, "flops_per_token": fpt, "loss": float(law.loss(N, D)),
            "hyperparameters": dict(hp, batch_tokens=batch), "planner_warnings": result.search["warnings"]}


def fit_variant(runs: F.Runs, design: dict[str, Any], label: str, target: float, *, bootstrap: int,
                seed: int = 0, models: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """Approach 3 + bootstrap, Approach 2, hyperparameter laws and the recommendation for one variant."""
    warnings: list[str] = []
    grids = F.hyperparameter_grids(runs)
    hyper, hyper_warnings = F.fit_hyperparameters(runs, grids, name=f"fit{' ' + label if label else ''}")
    warnings += hyper_warnings
    grid_runs = [runs.subset(g) for g in grids]
    runs = F.best_of_grids(runs, grids)
    if hyper is not None:
        hp_law = hyper["law"]
    else:
        hp_law = hyperparameter_law_from_dict(design["hparams"], where="the design's hyperparameter law")
    fit3 = F.fit_approach3(runs)
    law = fit3.law
    name = f"variant {label}: " if label else ""
    try:
        F.compute_optimum(law, target, runs)  # NoOptimum: a term vanished, nothing to extrapolate
    except F.NoOptimum as e:
        raise UserError(f"{name}{e} (see the runs: scalelab fit RUN_DIRS --plot runs.png)") from None
    for bound in fit3.at_bounds:
        warnings.append(f"Approach 3: {bound} is at its bound; the runs do not pin that exponent down")
    if law.E < NO_FLOOR * float(runs.loss.min()):
        warnings.append(f"Approach 3: E = {law.E:.3g}, no irreducible loss: the law falls toward 0 with scale, so "
                        "the extrapolation is optimistic; the runs are too far from their floor to measure it "
                        "(larger budgets)")
    logres = np.log(runs.loss) - np.log(law.loss(runs.N, runs.D))
    out: dict[str, Any] = {
        "runs": len(runs), "run_names": list(runs.source),
        "approach3": {**fit3.values(), "objective": fit3.objective, "N_opt_exponent": law.a,
                      "D_opt_exponent": law.b, "at_bounds": fit3.at_bounds,
                      "residual_rms": float(np.sqrt(np.mean(logres ** 2)))},
    }
    laws: list[LossLaw] = []
    if bootstrap:
        boot = F.bootstrap(runs, fit3, target, bootstrap, seed=seed)
        laws = boot.pop("laws")
        out["approach3"]["bootstrap"] = {k: boot[k] for k in ("resamples", "valid", "degenerate", "seed",
                                                              "no_interval", "stderr", "interval_95") if k in boot}
        if "no_interval" in boot:
            warnings.append(f"Approach 3 bootstrap: {boot['no_interval']}")
    try:
        iso = F.fit_isoflop(runs, budgets=list(design["budgets"]))
        iso["at_budget"] = F.isoflop_at(iso, target)
        warnings += [f"Approach 2: {w}" for w in iso["warnings"]]
        out["approach2"] = {k: v for k, v in iso.items() if k != "budgets"}
        out["approach2"]["budgets"] = [{k: v for k, v in p.items() if k != "index"} for p in iso["budgets"]]
        out["_isoflop"] = iso
    except UserError as e:
        out["approach2"] = {"error": str(e)}
        warnings.append(f"Approach 2 not fitted: {e}")
    rec = _recommend(law, hp_law, design, label, target, models)
    rec["loss_interval_95"] = prediction_interval(laws, logres, rec["N"], rec["D"], seed=seed)
    warnings += [f"recommendation: {w}" for w in rec["planner_warnings"]]
    if laws:
        law_losses = np.array([float(x.loss(rec["N"], rec["D"])) for x in laws])
        rec["law_loss_interval_95"] = [float(v) for v in np.percentile(law_losses, [2.5, 97.5])]
        out["_law_losses"] = law_losses
    out["recommendation"] = rec
    out["hyperparameter_law"] = {"fitted": hyper is not None, **hp_law.to_dict()}
    if hyper is not None:
        out["hyperparameter_law"]["budgets"] = hyper["budgets"]
    largest = max(design["budgets"])
    if target > largest:
        out["extrapolation"] = target / largest
    out["warnings"] = warnings
    out["_law"], out["_laws"], out["_runs"], out["_fit3"] = law, laws, runs, fit3
    out["_grids"], out["_hp_law"], out["_models"] = grid_runs, hp_law, models
    return out


# ---- A/B --------------------------------------------------------------------------------------------

def compare_variants(results: dict[str, dict[str, Any]], *, seed: int = 0) -> dict[str, Any]:
    """Which variant predicts the lowest loss at the target, by how much over the runner-up (the `loser`; every
    other variant under `others`), and whether the bootstrap interval of each difference (independent resamples
    of each variant's runs) excludes zero."""
    losses = {label: r["recommendation"]["loss"] for label, r in results.items()}
    ranked = sorted(losses, key=losses.get)
    winner = ranked[0]
    rng = np.random.default_rng(seed)
    sw = results[winner].get("_law_losses")
    others = []
    for label in ranked[1:]:
        diff = losses[label] - losses[winner]
        row: dict[str, Any] = {"variant": label, "difference": diff, "relative": diff / losses[label],
                               "difference_interval_95": None, "distinguishable": None}
        sl = results[label].get("_law_losses")
        if sw is not None and sl is not None and len(sw) >= 2 and len(sl) >= 2:
            k = max(len(sw), len(sl))
            d = rng.choice(sl, k) - rng.choice(sw, k)  # this variant - the winner
            lo, hi = (float(v) for v in np.percentile(d, [2.5, 97.5]))
            row.update(difference_interval_95=[lo, hi], distinguishable=bool(lo > 0))
        others.append(row)
    first = others[0]
    C = results[winner]["recommendation"]["C"]
    out: dict[str, Any] = {"variants": list(results), "winner": winner, "loser": first["variant"], "loss": losses,
                           **{k: first[k] for k in ("difference", "relative", "difference_interval_95",
                                                    "distinguishable")}, "others": others}
    diff, iv = first["difference"], first["difference_interval_95"]
    if iv is None:
        out["verdict"] = (f"{winner} predicts the lowest loss at C = {C:.3g}, {diff:.4f} nats below {first['variant']}; "
                          "no bootstrap intervals (run with --bootstrap K) to say whether that exceeds the noise")
    elif first["distinguishable"]:
        out["verdict"] = (f"{winner} wins at C = {C:.3g}: predicted loss {diff:.4f} nats ({100 * first['relative']:.2f}%) "
                          f"lower than {first['variant']}; the 95% interval of the difference [{iv[0]:.4f}, {iv[1]:.4f}] "
                          "excludes zero")
    else:
        out["verdict"] = (f"not distinguishable: {winner} predicts {diff:.4f} nats lower than {first['variant']} at "
                          f"C = {C:.3g}, but the 95% interval of the difference [{iv[0]:.4f}, {iv[1]:.4f}] includes zero")
    return out


# ---- the whole fit ---------------------------------------------------------------------------------

def check_target(budget: float | None, design: dict[str, Any]) -> float:
    largest = max(design["budgets"])
    if budget is None:
        return DEFAULT_EXTRAPOLATION * largest
    if not (math.isfinite(budget) and budget > 0):
        raise UserError(f"--budget must be a positive number of FLOPs, got {budget}")
    return float(budget)


def fit_sweep(out_dir: str | Path, doc: dict[str, Any], *, budget: float | None = None,
              bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """Fit every variant of the sweep in OUT_DIR (doc: its sweep.toml, read). Returns the fit.json content
    plus private entries (keys starting with '_') the report uses."""
    out_dir = Path(out_dir)
    design = doc["design"]
    target = check_target(budget, design)
    got = collect(out_dir, doc)
    results: dict[str, dict[str, Any]] = {}
    for label in variant_labels(doc):
        runs = got["runs"].get(label)
        name = f"variant {label}: " if label else ""
        if runs is None or len(runs) == 0:
            raise UserError(f"{out_dir}: {name}no finished runs to fit ({len(got['unfinished'])} unfinished); "
                            f"run `scalelab sweep run {out_dir}` first")
        problem = F.design_problem(F.best_of_grids(runs, F.hyperparameter_grids(runs)))
        if problem is not None:
            raise UserError(f"{out_dir}: {name}the {len(runs)} finished runs cannot determine a law yet: {problem} "
                            f"({len(got['unfinished'])} runs unfinished: `scalelab sweep run {out_dir}`)")
        models = [r["config"]["model"] for r in doc["runs"]
                  if r.get("variant", "") == label and "model" in r.get("config", {})]
        results[label] = fit_variant(runs, design, label, target, bootstrap=bootstrap, seed=seed, models=models)
    warnings = []
    if got["unfinished"]:
        warnings.append(f"{len(got['unfinished'])} runs are unfinished and left out: "
                        f"{', '.join(got['unfinished'][:5])}{' ...' if len(got['unfinished']) > 5 else ''}")
    for label, r in results.items():
        warnings += [f"{label + ': ' if label else ''}{w}" for w in r["warnings"]]
    first = next(iter(results.values()))
    out: dict[str, Any] = {
        "format": FORMAT, "fingerprint": doc["fingerprint"], "budget": target,
        "largest_budget": max(design["budgets"]), "budgets": list(design["budgets"]),
        "bootstrap": bootstrap, "seed": seed, "unfinished": got["unfinished"],
        "variants": {label: {k: v for k, v in r.items() if not k.startswith("_")} for label, r in results.items()},
        "warnings": warnings,
    }
    if len(results) > 1:
        out["comparison"] = compare_variants(results, seed=seed)
        out["recommendation"] = results[out["comparison"]["winner"]]["recommendation"]
    else:
        out["recommendation"] = first["recommendation"]
    out["_results"], out["_curves"] = results, got["curves"]
    return out


def public(result: dict[str, Any]) -> dict[str, Any]:
    """fit.json's content: the result without its private ('_') entries."""
    return {k: v for k, v in result.items() if not k.startswith("_")}
