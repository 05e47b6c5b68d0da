"""A scaling study on a CPU, from design to verification: `scalelab sweep` on Shakespeare.

Nothing but the public verbs, in order:

1. `scalelab prepare --dataset shakespeare --tokenizer byte`: the corpus as bytes (vocabulary 258,
   4.53M training tokens), so that the embedding is a small part of every model and the verified
   run at ten times the largest budget stays within one pass over the data;
2. `scalelab sweep design`: an IsoFLOP ladder at three budgets (1.5e11, 3e11, 6e11 FLOPs), five
   one-layer LLaMA-3-style shapes each (widths 16-256, heads of 8, 2 KV heads, sequence 128; the
   budgets sample 15.5K-300K parameters) around the prior optimum (ladder_shakespeare_prior.json:
   Chinchilla's law with A halved), D solved exactly from C, every run on one recipe: batch
   16 x 128, AdamW peak 3e-3 x 128 / width (the width rule), cosine to a tenth;
3. `scalelab sweep run` (resumable: rerun after an interruption and it continues);
4. `scalelab sweep fit --budget 6e12`: Approach 3 with bootstrap intervals and Approach 2, and the
   recommended run at ten times the largest budget (held to one pass and the sweep's batch);
5. `scalelab sweep verify`: train that recommendation and compare its loss with the prediction.

    python benchmarks/ladder_shakespeare.py                 # about 5 min on 2 cores
    python benchmarks/ladder_shakespeare.py --out runs/ladder --parallel 2

Why this setup, and every attempt (docs/sweep.md, "A study on a CPU"): the first (a 2048-token BPE,
1.5e11-6e11 FLOPs) had every budget's optimum below its space and failed verification.

OUT/summary.json records the wall time of each step and the verification.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BUDGETS = "1.5e11,3e11,6e11"
TARGET = "6e12"  # ten times the largest budget
PRIOR = Path(__file__).with_name("ladder_shakespeare_prior.json")  # Chinchilla's law with A halved (its "source")
SPACE = ["--style", "llama3", "--hidden", "16:256:8", "--layers", "1", "--head-dims", "8", "--kv-heads", "2",
         "--aspect", "none", "--seq-len", "128", "--batch-tokens", "2048", "--hparams", "width:3e-3@128",
         "--points", "5", "--law-file", str(PRIOR)]


def scalelab(*args: str) -> None:
    print("$ scalelab " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "scalelab", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/ladder", help="the sweep directory (its data beside it, OUT-data)")
    ap.add_argument("--parallel", type=int, default=2, help="runs trained at once (`sweep run --parallel`)")
    args = ap.parse_args()
    out = Path(args.out)
    seconds: dict[str, float] = {}

    def step(name: str, *cmd: str) -> None:
        start = time.time()
        scalelab(*cmd)
        seconds[name] = round(time.time() - start, 1)

    data_dir = out.parent / f"{out.name}-data"
    if not (data_dir / "meta.json").is_file():
        step("prepare", "prepare", "--dataset", "shakespeare", "--tokenizer", "byte", "--out", str(data_dir))
    step("design", "sweep", "design", str(out), "--budgets", BUDGETS, "--data", str(data_dir), *SPACE)
    step("run", "sweep", "run", str(out), "--parallel", str(args.parallel))
    step("fit", "sweep", "fit", str(out), "--budget", TARGET)
    # one thread: on a machine shared with other work, two threads on two cores ran 20x slower
    step("verify", "sweep", "verify", str(out), "--budget", TARGET, "--threads", "1")
    verify = json.loads((out / "verify.json").read_text())
    summary = {"seconds": seconds, "minutes": round(sum(seconds.values()) / 60, 1), "verify": verify}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
