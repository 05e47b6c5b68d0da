"""Synthetic sweep directories for tests: run directories whose final losses are drawn from a known law (no
training), laid out as `scalelab sweep design` / `sweep run` leave them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from scalelab.counting import count_params, training_flops_per_token
from scalelab.scaling import hparams
from scalelab.scaling.laws import LossLaw
from scalelab.scaling.search import SearchSpace

LAW = LossLaw(E=2.0, A=30.0, B=60.0, alpha=0.3, beta=0.3, name="synthetic")
HP_LAW = hparams.HyperparameterLaw(lr_coef=5.0, lr_exponent=-0.15, batch_coef=2e-3, batch_exponent=0.5,
                                   compute="training", name="synthetic-hp")
SPACE = SearchSpace(style="llama3", seq_len=128, vocab_size=512, head_dims=(32,), hidden=tuple(range(32, 257, 32)),
                    layers=tuple(range(1, 9)))
BUDGETS = (1e13, 3e13, 1e14)


def shapes():
    """Shapes of SPACE (aspect and head rules applied) as (ModelConfig, N, fpt), by N, at least 10% apart in N
    (as a design's log-N grid samples them)."""
    out = []
    for L in SPACE.layers:
        for H in SPACE.hidden:
            if not 40 <= H / L <= 130 or H % 32:
                continue
            cfg = SPACE.model_config(L, H, H // 32, H // 32)
            out.append((cfg, float(count_params(cfg).total), float(training_flops_per_token(cfg, SPACE.seq_len))))
    spaced = []
    for shape in sorted(out, key=lambda s: s[1]):
        if not spaced or shape[1] > 1.1 * spaced[-1][1]:
            spaced.append(shape)
    return spaced


def around_optimum(law: LossLaw, C: float, points: int = 5):
    """`points` shapes spaced around the law's optimum at C (by exact FLOPs)."""
    all_shapes = shapes()
    losses = [float(law.loss(n, C / f)) for _, n, f in all_shapes]
    best = int(np.argmin(losses))
    lo = min(max(0, best - points // 2), len(all_shapes) - points)
    return all_shapes[lo:lo + points]


def write_run(run_dir: Path, cfg, C: float, fpt: float, loss: float, lr: float, batch: int, steps_logged: int = 4) -> None:
    steps = max(1, math.ceil(C / fpt / batch))
    tokens = steps * batch
    run_dir.mkdir(parents=True)
    (run_dir / "model.toml").write_text(cfg.to_toml())
    (run_dir / "config.toml").write_text(f"[train]\nseq_len = {SPACE.seq_len}\nglobal_batch_tokens = {batch}\n"
                                         f"lr = {lr!r}\nmax_steps = {steps}\n")
    lines = []
    for k in range(1, steps_logged + 1):
        t = tokens * k / steps_logged
        lines.append({"kind": "train", "step": math.ceil(steps * k / steps_logged), "tokens": t, "flops": t * fpt,
                      "loss": loss + 1.0 / k, "lr": lr * (1 - 0.8 * k / steps_logged)})
    lines.append({"kind": "eval", "step": steps, "tokens": tokens, "flops": tokens * fpt, "val_loss": loss})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run_dir / "final").mkdir()
    (run_dir / "final" / "model.safetensors").write_bytes(b"")


def make_sweep(out_dir: Path, laws: dict[str, LossLaw] | None = None, *, noise: float = 0.0, seed: int = 0,
               tune: bool = False, budgets=BUDGETS, finished: float = 1.0, flat_n: bool = False) -> dict:
    """A sweep directory's runs and the sweep document (sweep.toml's content, as read_sweep returns it).
    laws: {variant label: law}; {"": LAW} by default; labels "rope_theta=V" make a --compare design.
    flat_n: every loss as if N were 1e6 (the loss does not fall with N: no compute optimum)."""
    laws = laws or {"": LAW}
    rng = np.random.default_rng(seed)
    runs = []
    for label, law in laws.items():
        for C in budgets:
            chosen = around_optimum(law, C)
            for cfg, n, fpt in chosen:
                hp = hparams.hyperparameters_for(cfg, SPACE.seq_len, C / fpt, HP_LAW)
                batch = int(hp["batch_tokens"])
                steps = max(1, math.ceil(C / fpt / batch))
                loss = float(law.loss(1e6 if flat_n else n, steps * batch)) * math.exp(noise * rng.standard_normal())
                name = f"{label + '/' if label else ''}C{C:.3g}-L{cfg.n_layer}-H{cfg.n_embd}"
                runs.append({"name": name, "variant": label, "kind": "isoflop", "budget": C, "N": n,
                             "flops_per_token": fpt, "run_dir": f"runs/{name}", "steps": steps,
                             "config": {"train": {"global_batch_tokens": batch}},
                             "_args": (cfg, C, fpt, loss, hp["peak_lr"], batch)})
            if tune and C <= budgets[-1]:
                cfg, n, fpt = chosen[len(chosen) // 2]
                lr0, b0 = HP_LAW.lr(C), HP_LAW.batch_tokens(C)
                for i, lr in enumerate(lr0 * 2.0 ** (np.arange(-3, 4) * 0.5 + 0.13)):
                    for j, b in enumerate(b0 * 2.0 ** (np.arange(-2, 3) * 0.5 - 0.07)):
                        batch = max(1, round(b / SPACE.seq_len)) * SPACE.seq_len
                        steps = max(1, math.ceil(C / fpt / batch))
                        bowl = 0.05 * math.log(lr / lr0) ** 2 + 0.03 * math.log(batch / b0) ** 2
                        loss = (float(law.loss(n, C / fpt)) + bowl) * math.exp(noise * rng.standard_normal())
                        name = f"{label + '/' if label else ''}tune-C{C:.3g}-lr{i}-b{j}"
                        runs.append({"name": name, "variant": label, "kind": "tune", "budget": C, "N": n,
                                     "flops_per_token": fpt, "run_dir": f"runs/{name}", "steps": steps,
                                     "config": {"train": {"global_batch_tokens": batch}},
                                     "_args": (cfg, C, fpt, loss, float(lr), batch)})
    for k, r in enumerate(runs):
        if k < finished * len(runs):
            write_run(out_dir / r["run_dir"], *r["_args"])
        r.pop("_args")
    labels = [l for l in laws if l]
    compare = None
    if labels:
        field = labels[0].split("=")[0]
        compare = {"field": field, "values": [l.split("=", 1)[1] for l in labels]}
    design = {"format": 1, "method": "isoflop", "budgets": list(budgets), "points": 5, "space": SPACE.describe(),
              "law": LAW.to_dict(), "hparams": HP_LAW.to_dict(), "data_dir": "/nonexistent"}
    if compare:
        design["compare"] = compare
    return {"fingerprint": "synthetic", "design": design, "runs": runs}


def write_sweep_file(out_dir: Path, doc: dict) -> dict:
    """OUT_DIR/sweep.toml as `sweep design` writes it (fingerprint over the runs as read back); the doc as
    read_sweep returns it."""
    import tomllib

    from scalelab.sweep.design import SWEEP_FILE, fingerprint, read_sweep, sweep_toml

    def drop_none(d):
        if isinstance(d, dict):
            return {k: drop_none(v) for k, v in d.items() if v is not None}
        return [drop_none(v) for v in d] if isinstance(d, list) else d

    result = {"fingerprint": "0", "design": drop_none(doc["design"]), "runs": doc["runs"], "cost": {"flops": 0.0},
              "notes": []}
    path = out_dir / SWEEP_FILE
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(sweep_toml(result))
    back = tomllib.loads(path.read_text())
    result["fingerprint"] = fingerprint({"design": back["design"], "runs": back["runs"]})
    path.write_text(sweep_toml(result))
    return read_sweep(out_dir)
