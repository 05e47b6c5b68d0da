"""Fit a scaling law to a ladder of tiny CPU runs on Shakespeare, then test it on a run it never saw.

The loop a researcher runs with scalelab, at a scale a 2-core CPU finishes in well under an hour:

1. the demo's data: a 2048-token BPE trained on Shakespeare and memory-mapped shards (reused from
   --demo-dir when `scalelab demo` already made them);
2. a ladder: 5 LLaMA-3-style sizes (2L x 64 ... 5L x 256, head_dim 32, 2 KV heads) x 3 token counts
   (0.25M, 0.6M, 1.4M; never more than one pass over the training split), every run one recipe
   (`scalelab train`, AdamW at 3e-3 x 128/width, cosine to a tenth, batch 16 x 128);
3. `scalelab fit` on the 15 run directories -> law.json and fit.png;
4. `scalelab plan` with that law at the demo's budget and in its search space, then train the
   planned model (a shape the ladder never ran) and compare the law's predicted validation loss
   with the measured one — the number that says whether planning with a fitted law is worth
   anything.

    python benchmarks/ladder_shakespeare.py                  # ~25 min on 2 cores
    python benchmarks/ladder_shakespeare.py --out runs/ladder --budget 2e13
Everything goes to --out; finished runs are skipped, so an interrupted ladder continues.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from scalelab.cli.demo import demo_learning_rate
from scalelab.scaling.fit import read_run_dir

SIZES = [(2, 64), (2, 128), (4, 128), (4, 192), (5, 256)]  # (n_layer, n_embd); heads of 32
TOKENS = [250_000, 600_000, 1_400_000]
RECIPE = ["train.seq_len=128", "model.block_size=128", "train.micro_batch_size=16", "train.global_batch_tokens=2048",
          "train.warmup=20", "eval.every=100000", "eval.batches=16", "logging.every=50", "checkpoint.every=100000"]


def learning_rate(n_embd: int) -> list[str]:
    """`scalelab demo`'s rule: AdamW peak 3e-3 at width 128, scaled as 1/width (muP's rule for
    hidden matrices), cosine to a tenth. One rate for every width made the widest runs worse than
    narrower ones (5L x 256 on 0.25M tokens: 5.355 nats at 3e-3, 5.151 at 1.5e-3), and a law
    cannot be fitted to a ladder whose big models are mistrained."""
    lr = demo_learning_rate(n_embd)
    return ["--set", f"train.lr={lr:.6g}", "--set", f"train.min_lr={lr / 10:.6g}"]


def scalelab(*args: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "scalelab", *args]
    print("$ scalelab " + " ".join(args), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return r.stdout if capture else ""


def base_config(out: Path, data_dir: Path, vocab: int) -> Path:
    cfg = out / "base.toml"
    cfg.write_text(f"""[model]
style = "llama3"
n_layer = 2
n_embd = 64
n_head = 2
num_key_value_heads = 2
vocab_size = {vocab}
block_size = 128

[data]
dir = "{data_dir.resolve()}"

[train]
max_tokens = 250000
dtype = "fp32"
""")
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/ladder")
    ap.add_argument("--demo-dir", default="runs/demo", help="reuse this demo's tokenizer/ and data/ when present")
    ap.add_argument("--budget", default="1e13", help="the held-out run's compute (the demo's budget)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    demo = Path(args.demo_dir)
    tok_dir, data_dir = demo / "tokenizer", demo / "data"
    if not (data_dir / "meta.json").is_file():
        tok_dir, data_dir = out / "tokenizer", out / "data"
        if not (tok_dir / "tokenizer.json").is_file():
            scalelab("tokenizer", "train", "--dataset", "shakespeare", "--vocab-size", "2048", "--out", str(tok_dir))
        if not (data_dir / "meta.json").is_file():
            scalelab("prepare", "--dataset", "shakespeare", "--tokenizer", f"hf:{tok_dir}", "--out", str(data_dir))
    meta = json.loads((data_dir / "meta.json").read_text())
    vocab, train_tokens = meta["vocab_size"], meta["splits"]["train"]["tokens"]
    cfg = base_config(out, data_dir, vocab)
    sets = [x for kv in RECIPE for x in ("--set", kv)]

    for n_layer, n_embd in SIZES:
        for tokens in TOKENS:
            run = out / "runs" / f"L{n_layer}-H{n_embd}-D{tokens // 1000}K"
            if (run / "final").is_dir():  # written after the last evaluation
                continue
            scalelab("train", str(cfg), "--run-dir", str(run), *sets, *learning_rate(n_embd),
                     "--set", f"model.n_layer={n_layer}",
                     "--set", f"model.n_embd={n_embd}", "--set", f"model.n_head={n_embd // 32}",
                     "--set", f"train.max_tokens={tokens}")

    law_file, fit_png = out / "law.json", out / "fit.png"
    fit = json.loads(scalelab("fit", str(out / "runs"), "--out", str(law_file), "--plot", str(fit_png),
                              "--bootstrap", "100", "--budget", args.budget, "--json", capture=True))

    plan_toml = out / "heldout.toml"
    plan = json.loads(scalelab("plan", args.budget, "--law-file", str(law_file), "--style", "llama3",
                               "--hidden", "64:512:32", "--layers", "2:12:1", "--head-dims", "32", "--kv-heads", "2",
                               "--vocab", str(vocab), "--seq-len", "128", "--max-tokens", str(train_tokens),
                               "--emit-config", str(plan_toml), "--json", capture=True))
    best = plan["best"]
    heldout = out / "heldout"
    if not (heldout / "final").is_dir():
        scalelab("train", str(plan_toml), "--run-dir", str(heldout), "--set", f"data.dir={data_dir.resolve()}",
                 *sets, *learning_rate(best["n_embd"]))
    measured = read_run_dir(heldout)[2]

    summary = {"law": {k: fit[k] for k in ("E", "A", "B", "alpha", "beta", "objective")},
               "stderr": fit.get("stderr"), "runs": len(SIZES) * len(TOKENS),
               "heldout": {"budget": float(args.budget), "shape": best.get("name"), "N": best["N"], "D": best["D"],
                           "predicted_val_loss": best["loss"], "measured_val_loss": measured,
                           "error": measured - best["loss"]},
               "minutes": (time.time() - started) / 60}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
