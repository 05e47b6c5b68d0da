"""WSD decay branches against independent runs of the same length, with the seed noise measured alike.

`scalelab sweep design --method wsd` trains each shape once at a constant rate (a stable run) and
takes every point as a short decay branch from one of its checkpoints; `--method isoflop` trains
every point as its own run on the law's cosine schedule. MiniCPM (Hu et al. 2024) and Hägele et
al. (2024) report that the branch ends at the loss of the independent run. This script checks it
with nothing but the verbs, on runs long enough for the claim to be about training rather than
the first steps: one LLaMA-3-style shape (1 layer x 64, 94.7K parameters, byte-level Shakespeare,
sequence 128, batch 8 x 128), budgets 2e11 / 4e11 / 8e11 FLOPs = 346 / 692 / 1,384 steps, the
branches decaying 1-sqrt over the last 20%, each design trained with --seeds seeds
(`--set train.seed=S`: model init and data order).

Per point it reports the mean final val loss of each method over the seeds, the difference, and
the noise: the rms over points of the seed-to-seed standard deviation, the same statistic for
both methods. The claim holds at a point when |mean WSD - mean isoflop| is within twice the
standard error of that difference (sqrt(sd_wsd^2 / n + sd_iso^2 / n)). A seed gives both methods the
same initialisation and data order, so the per-seed (paired) differences are printed too: their
spread excludes the seed noise and shows a systematic difference the seed noise hides. And the cost: FLOPs
actually trained by each design (the WSD stable runs plus their branches' decays).

    python benchmarks/wsd_vs_independent.py --out runs/wsd-check          # about 10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

BUDGETS = "2e11,4e11,8e11"
SPACE = ["--style", "llama3", "--hidden", "64", "--layers", "1", "--head-dims", "16", "--kv-heads", "2",
         "--aspect", "none", "--seq-len", "128", "--batch-tokens", "1024", "--hparams", "width:3e-3@128",
         "--points", "2"]  # one shape in the space: both points snap to it


def scalelab(*args: str, capture: bool = False) -> str:
    print("$ scalelab " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-m", "scalelab", *args], check=True, text=True,
                          stdout=subprocess.PIPE if capture else None)
    return done.stdout if capture else ""


def final_losses(sweep: Path) -> dict[str, float]:
    """Each fitted point's final val loss (stable runs are trunks, not points), by budget."""
    doc_runs = {r["name"]: r for r in json.loads(scalelab("sweep", "status", str(sweep), "--json", capture=True))}
    import tomllib

    design = tomllib.loads((sweep / "sweep.toml").read_text())
    return {f"{r['budget']:.3g}": doc_runs[r["name"]]["val_loss"] for r in design["runs"] if r["kind"] != "stable"}


def trained_flops(sweep: Path) -> float:
    import tomllib

    design = tomllib.loads((sweep / "sweep.toml").read_text())
    return sum(r.get("flops_trained", r["flops"]) for r in design["runs"])


def summarise(losses: dict[str, list[dict[str, float]]]) -> dict:
    """Per budget: mean and seed sd of each method, the difference and its standard error."""
    rows, sds = [], {"wsd": [], "isoflop": []}
    for budget in losses["isoflop"][0]:
        row = {"budget": budget}
        for method in ("wsd", "isoflop"):
            vals = [seed[budget] for seed in losses[method]]
            mean = sum(vals) / len(vals)
            sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
            row[method] = {"losses": vals, "mean": mean, "sd": sd}
            sds[method].append(sd)
        n = len(losses["wsd"])
        row["difference"] = row["wsd"]["mean"] - row["isoflop"]["mean"]
        row["stderr"] = math.sqrt((row["wsd"]["sd"] ** 2 + row["isoflop"]["sd"] ** 2) / n)
        row["within_2_stderr"] = abs(row["difference"]) <= 2 * row["stderr"]
        # paired by seed (the same init and data order for both schedules): the seed's own noise cancels
        paired = [w - i for w, i in zip(row["wsd"]["losses"], row["isoflop"]["losses"])]
        paired_sd = math.sqrt(sum((d - row["difference"]) ** 2 for d in paired) / (n - 1))
        row["paired"] = {"differences": paired, "sd": paired_sd, "stderr": paired_sd / math.sqrt(n)}
        rows.append(row)
    rms = {m: math.sqrt(sum(s * s for s in v) / len(v)) for m, v in sds.items()}
    return {"points": rows, "seed_sd_rms": rms,
            "difference_rms": math.sqrt(sum(r["difference"] ** 2 for r in rows) / len(rows))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/wsd-check", help="a directory for the data and the sweeps")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per method (at least 2, for the noise)")
    ap.add_argument("--parallel", type=int, default=2, help="runs trained at once (`sweep run --parallel`)")
    args = ap.parse_args()
    out = Path(args.out)
    start = time.time()
    data = out / "data"
    if not (data / "meta.json").is_file():
        scalelab("prepare", "--dataset", "shakespeare", "--tokenizer", "byte", "--out", str(data))
    losses: dict[str, list[dict[str, float]]] = {"wsd": [], "isoflop": []}
    flops: dict[str, float] = {}
    for seed in range(args.seeds):
        for method in ("isoflop", "wsd"):
            sweep = out / f"{method}-seed{seed}"
            scalelab("sweep", "design", str(sweep), "--method", method, "--budgets", BUDGETS, "--data", str(data),
                     *SPACE, "--set", f"train.seed={seed}")
            scalelab("sweep", "run", str(sweep), "--parallel", str(args.parallel))
            losses[method].append(final_losses(sweep))
            flops[method] = trained_flops(sweep)
    summary = summarise(losses)
    summary.update(flops_trained=flops, wsd_flops_fraction=flops["wsd"] / flops["isoflop"],
                   minutes=round((time.time() - start) / 60, 1))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'budget':>8}  {'WSD branch (mean ± sd)':>24}  {'isoflop cosine':>20}  {'diff':>8}  {'2 s.e.':>7}  "
          "paired by seed: differences (2 s.e.)")
    for r in summary["points"]:
        pairs = ", ".join(f"{d:+.4f}" for d in r["paired"]["differences"])
        print(f"{r['budget']:>8}  {r['wsd']['mean']:>14.4f} ± {r['wsd']['sd']:.4f}  {r['isoflop']['mean']:>10.4f} ± "
              f"{r['isoflop']['sd']:.4f}  {r['difference']:>+8.4f}  {2 * r['stderr']:>7.4f}  {pairs} "
              f"({2 * r['paired']['stderr']:.4f})")
    print(f"seed sd (rms over points): WSD {summary['seed_sd_rms']['wsd']:.4f}, isoflop "
          f"{summary['seed_sd_rms']['isoflop']:.4f}; rms difference of the means {summary['difference_rms']:.4f}")
    print(f"FLOPs trained: WSD {flops['wsd']:.3g}, isoflop {flops['isoflop']:.3g} "
          f"({100 * summary['wsd_flops_fraction']:.0f}%); {summary['minutes']} min")


if __name__ == "__main__":
    main()
