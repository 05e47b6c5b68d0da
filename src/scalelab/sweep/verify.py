"""`scalelab sweep verify`: train the fit's recommendation and compare its loss with the prediction.

OUT_DIR/fit.json (written by `scalelab sweep fit`; keys in docs/interfaces.md) holds the
recommendation at the target budget: the model config, its token count and steps, hyperparameters,
and the predicted loss with a 95% prediction interval. The verification run uses the sweep's own
recipe for everything else (the first run's config: data, eval, dtype, ...), so its measured loss
is comparable with the runs the law was fitted to. It trains into OUT_DIR/verify/C<budget>
(resumable like any run) and the result goes to OUT_DIR/verify.json.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from scalelab.errors import UserError
from scalelab.files import atomic_write_text
from scalelab.sweep.design import micro_batch, read_sweep

FIT_FILE = "fit.json"
VERIFY_FILE = "verify.json"


def read_fit(out_dir: Path, budget: float | None) -> dict[str, Any]:
    """OUT_DIR/fit.json, checked against the sweep it claims to fit and the budget asked for."""
    doc = read_sweep(out_dir)
    path = out_dir / FIT_FILE
    if not path.is_file():
        raise UserError(f"{out_dir} has no {FIT_FILE}; fit the finished runs first: scalelab sweep fit {out_dir}"
                        + (f" --budget {budget:g}" if budget else ""))
    try:
        fit = json.loads(path.read_text())
        rec = fit["recommendation"]
        fit["_check"] = (rec["config"], rec["steps"], rec["hyperparameters"]["peak_lr"], fit["budget"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a fit written by `scalelab sweep fit` ({e}); fit again") from None
    if fit.get("fingerprint") != doc["fingerprint"]:
        raise UserError(f"{path} fits another design (fingerprint {fit.get('fingerprint')}, the sweep's "
                        f"{doc['fingerprint']}); fit again: scalelab sweep fit {out_dir}")
    if budget is not None and not math.isclose(budget, float(fit["budget"]), rel_tol=1e-6):
        raise UserError(f"{path} recommends for C = {float(fit['budget']):g}, not --budget {budget:g}; fit for it: "
                        f"scalelab sweep fit {out_dir} --budget {budget:g}")
    fit["_doc"] = doc
    return fit


def verification_config(doc: dict[str, Any], fit: dict[str, Any]) -> dict[str, Any]:
    """The recommendation's training config, on the sweep's recipe (its first run's other settings)."""
    rec = fit["recommendation"]
    hp = rec["hyperparameters"]
    template = next(r for r in doc["runs"] if r["kind"] != "stable")["config"]
    data = copy.deepcopy(template)
    seq = int(rec["seq_len"])
    batch = int(hp["batch_tokens"])
    steps = int(rec["steps"])
    train = data["train"]
    for key in ("decay", "decay_shape", "branch_from"):
        train.pop(key, None)
    schedule = hp["schedule"]
    train.update(seq_len=seq, global_batch_tokens=batch, micro_batch_size=micro_batch(batch // seq),
                 max_steps=steps, lr=float(hp["peak_lr"]), min_lr=float(hp["min_lr"]), warmup=float(hp["warmup"]),
                 schedule=schedule)
    if schedule == "wsd":
        train.update(decay=float(doc["design"].get("decay_fraction", 0.2)),
                     decay_shape=doc["design"].get("decay_shape", "1-sqrt"))
    data["model"] = rec["config"]
    data["checkpoint"] = {"every": max(1, steps // 4), "keep": 2}
    data["logging"] = dict(data.get("logging", {}), every=max(1, steps // 20))
    return data


def verify(out_dir: Path, fit: dict[str, Any], *, threads: int = 0) -> dict[str, Any]:
    """Train the recommendation (or resume it, or report it done) and compare its loss."""
    import torch

    from scalelab.scaling.fit import read_run_dir
    from scalelab.train.config import config_from_dict
    from scalelab.train.trainer import train

    doc = fit["_doc"]
    rec = fit["recommendation"]
    data = verification_config(doc, fit)
    run_dir = out_dir / "verify" / f"C{float(fit['budget']):.3g}"
    cfg = config_from_dict(data, where=f"{out_dir / FIT_FILE} recommendation")
    if threads > 0:
        torch.set_num_threads(threads)
    summary = train(cfg, run_dir)
    if summary.get("exit_code", 0):
        raise UserError(f"the verification run stopped at step {summary.get('step')}; run the same command again "
                        "to resume it")
    n, d, measured, c, _ = read_run_dir(run_dir)
    interval = rec.get("loss_interval_95")
    result = {"budget": float(fit["budget"]), "extrapolation": float(fit["budget"]) / float(fit["largest_budget"]),
              "shape": rec.get("name", ""), "N": n, "D": d, "flops": c, "predicted": float(rec["loss"]),
              "interval": interval, "measured": measured, "error": measured - float(rec["loss"]),
              "inside": bool(interval and interval[0] <= measured <= interval[1]), "run_dir": str(run_dir),
              "fingerprint": doc["fingerprint"]}
    atomic_write_text(out_dir / VERIFY_FILE, json.dumps(result, indent=2) + "\n")
    return result
