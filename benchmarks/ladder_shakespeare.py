"""A scaling study on a CPU, from design to verification: `scalelab sweep` on Shakespeare.

Nothing but the public verbs, in order:

1. the demo's data: a 2048-token BPE trained on Shakespeare and its token shards (reused from
   --demo-dir when `scalelab demo` already made them);
2. `scalelab sweep design`: an IsoFLOP ladder at three budgets (1.5e11, 3e11, 6e11 FLOPs), five
   LLaMA-3-style shapes each from the demo's CPU-sized space (heads of 32, 2 KV heads, sequence
   128) around the prior optimum of the `shakespeare-cpu` law, D solved exactly from C, every run
   on one recipe: batch 16 x 128, AdamW peak 3e-3 x 128 / width (the width rule), cosine to a tenth;
3. `scalelab sweep run` (resumable: rerun after an interruption and it continues);
4. `scalelab sweep fit --budget 6e12`: Approach 3 with bootstrap intervals and Approach 2, and the
   recommended run at ten times the largest budget;
5. `scalelab sweep verify`: train that recommendation and compare its loss with the prediction.

    python benchmarks/ladder_shakespeare.py                 # about 15 min on 2 idle cores
    python benchmarks/ladder_shakespeare.py --out runs/ladder --parallel 2

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
SPACE = ["--style", "llama3", "--hidden", "64:512:32", "--layers", "1:12", "--head-dims", "32", "--kv-heads", "2",
         "--aspect", "16:130", "--seq-len", "128", "--batch-tokens", "2048", "--hparams", "width:3e-3@128",
         "--law", "shakespeare-cpu", "--points", "5"]


def scalelab(*args: str) -> None:
    print("$ scalelab " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "scalelab", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/ladder", help="the sweep directory (and the data, unless --demo-dir has it)")
    ap.add_argument("--demo-dir", default="runs/demo", help="reuse this demo's tokenizer/ and data/ when present")
    ap.add_argument("--parallel", type=int, default=2, help="runs trained at once (`sweep run --parallel`)")
    args = ap.parse_args()
    out = Path(args.out)
    seconds: dict[str, float] = {}

    def step(name: str, *argv: str) -> None:
        start = time.time()
        scalelab(*argv)
        seconds[name] = round(time.time() - start, 1)

    data_dir = Path(args.demo_dir) / "data"
    if not (data_dir / "meta.json").is_file():
        work = out.parent / f"{out.name}-data"
        tok_dir, data_dir = work / "tokenizer", work / "data"
        if not (tok_dir / "tokenizer.json").is_file():
            step("tokenizer", "tokenizer", "train", "--dataset", "shakespeare", "--vocab-size", "2048",
                 "--out", str(tok_dir))
        if not (data_dir / "meta.json").is_file():
            step("prepare", "prepare", "--dataset", "shakespeare", "--tokenizer", f"hf:{tok_dir}", "--out", str(data_dir))
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
