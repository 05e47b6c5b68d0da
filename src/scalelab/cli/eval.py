"""`scalelab eval MODEL --data DIR`: loss, perplexity, bits per byte and loss by position.

MODEL is a run directory (its newest intact checkpoint), a checkpoint directory, RUN/final, a
native checkpoint (model.safetensors + model.toml) or a Hugging Face directory (config.json +
safetensors, imported on the fly). The data is a directory `scalelab prepare` wrote, with the
model's tokenizer. The split is read as non-overlapping windows of --seq-len + 1 tokens, in order
from its start (the same tokens every time): all of them, or the first --tokens target tokens
rounded up to whole windows. The window length defaults to the run's train.seq_len for a run's
model, else the model's block_size.

Loss by position: target position t is predicted from the t + 1 tokens before it in its window;
the table groups positions 0-127, 128-511, 512-2047, ... (×4) up to the window length (or
--buckets). Under torchrun the windows are divided among the ranks and the sums reduced; rank 0
prints the one result.

--tasks runs downstream benchmarks through EleutherAI's lm-evaluation-harness instead
(pip install "scalelab[eval]"); see docs/eval.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import sys
from pathlib import Path

from scalelab.cli import HelpFormatter, leave_torchrun_worker, parse_quantity, print_json
from scalelab.cli.sample import resolve_device
from scalelab.errors import UserError

EXAMPLES = """examples:
  scalelab eval runs/demo/run --data data/shakespeare
  scalelab eval runs/demo/run --data data/shakespeare --seq-len 256 --tokens 100k --plot loss_by_position.png
  scalelab eval path/to/hf-model --data data/fineweb-llama3 --seq-len 8192 --device cuda --json
  torchrun --nproc_per_node=8 -m scalelab eval runs/big --data data/fineweb --tokens 50M
"""


TOKENS_PER_PASS = 1 << 16


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="measure a model on prepared data: loss, perplexity, bits/byte, loss by position",
                       description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("model", metavar="MODEL", help="run directory, checkpoint, RUN/final or Hugging Face directory")
    p.add_argument("--data", metavar="DIR", help="prepared data directory (scalelab prepare --out)")
    p.add_argument("--split", default="val", help="which split of the data")
    p.add_argument("--seq-len", type=int, default=None, metavar="S",
                   help="window length (default: the run's train.seq_len, else the model's block_size)")
    p.add_argument("--tokens", default=None, metavar="N",
                   help="evaluate about N target tokens (rounded up to whole windows; e.g. 1M; default: the whole split)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help=f"windows per forward pass (default: {TOKENS_PER_PASS:,} tokens' worth, at least one window)")
    p.add_argument("--buckets", default=None, metavar="EDGES",
                   help="position bucket edges, comma-separated (e.g. 128,512); default 128,512,2048,... below S")
    p.add_argument("--plot", default=None, metavar="PNG", help="write loss by position as a PNG")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="weights' dtype: auto is fp32 on CPU and the checkpoint's own elsewhere")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model config field before evaluating (repeatable), e.g. "
                        "'rope_scaling={type=\"yarn\", factor=4.0}' or block_size=4096")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--tasks", default=None, metavar="LIST",
                   help="comma-separated lm-evaluation-harness tasks (e.g. hellaswag,arc_easy) instead of --data")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="with --tasks: at most N examples per task")
    p.add_argument("--out", default=None, metavar="DIR", help="with --tasks: where the harness JSON goes")
    p.add_argument("--include-path", default=None, metavar="DIR",
                   help="with --tasks: a directory of extra task YAML files (the harness's --include_path)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def parse_buckets(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(parse_quantity(part, name="--buckets")) for part in text.split(",") if part.strip()]
    except UserError:
        raise UserError(f"--buckets {text!r}: expected comma-separated positions such as 128,512") from None


def parse_tokens(text: str | None) -> int | None:
    if text is None:
        return None
    value = parse_quantity(text, name="--tokens")
    if value < 1:
        raise UserError(f"--tokens {text} must be at least 1 (or omit it to evaluate the whole split)")
    return int(value)


def run_tasks(args: argparse.Namespace) -> int:
    if args.data is not None:
        raise UserError("--tasks and --data are two kinds of evaluation; give one of them")
    try:
        harness = importlib.import_module("scalelab.harness")  # lazily: it imports lm_eval
    except ImportError as e:
        raise UserError(f"--tasks needs scalelab's lm-evaluation-harness support, which is not available here "
                        f"({e}); install it with pip install \"scalelab[eval]\"") from None
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit} must be at least 1 (or omit it for every example)")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError(f"--tasks {args.tasks!r} names no task; give e.g. --tasks hellaswag,arc_easy")
    device = str(resolve_device(args.device, "eval"))
    extra = {} if args.include_path is None else {"include_path": args.include_path}
    # With --json the harness's table goes to stderr, so stdout is the one JSON object.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = harness.evaluate_tasks(args.model, tasks, out_dir=args.out, limit=args.limit, device=device, **extra)
    if args.json and result:  # under torchrun, ranks > 0 get nothing to print
        print_json({"model": args.model, "tasks": tasks, "results": result.get("results", {})})
    return 0


def run(args: argparse.Namespace) -> int:
    return leave_torchrun_worker(_run(args))


def _run(args: argparse.Namespace) -> int:
    if args.tasks is not None:
        return run_tasks(args)
    if args.data is None:
        raise UserError("give --data DIR (prepared data) or --tasks LIST (harness benchmarks)")
    from scalelab.files import check_output_file

    plot = check_output_file(args.plot, flag="--plot", suffixes=(".png",)) if args.plot else None
    max_tokens = parse_tokens(args.tokens)
    buckets = parse_buckets(args.buckets)
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be at least 1")
    if args.seq_len is not None and args.seq_len < 1:
        raise UserError(f"--seq-len {args.seq_len} must be at least 1")
    model_path = Path(args.model)
    if not model_path.exists():
        raise UserError(f"{model_path}: no such model; give a run directory, a checkpoint or a Hugging Face "
                        "directory (config.json + model.safetensors)")
    import torch

    from scalelab.evaluate import evaluate, load_eval_model, trained_seq_len
    from scalelab.train.parallel import destroy_distributed, init_distributed

    device = resolve_device(args.device, "eval")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    if args.dtype == "auto" and device.type == "cpu":
        dtype = torch.float32
    d = init_distributed(str(device))
    try:
        model, tokenizer = load_eval_model(model_path, device=d.device, dtype=dtype, overrides=args.overrides)
        seq_len = args.seq_len or trained_seq_len(model_path) or model.config.block_size
        batch_size = args.batch_size or max(1, TOKENS_PER_PASS // seq_len)
        result = evaluate(model, args.data, split=args.split, seq_len=seq_len, max_tokens=max_tokens,
                          batch_size=batch_size, buckets=buckets, progress=not args.no_progress, dist=d,
                          tokenizer=tokenizer)
        if not d.is_main:
            return 0
        if plot is not None:
            write_plot(result, plot, str(model_path))
        if args.json:
            print_json({"model": str(model_path), "data": str(args.data), **result.to_dict(),
                        "plot": None if plot is None else str(plot)})
        else:
            print_result(result, str(model_path), str(args.data))
            if plot is not None:
                print(f"wrote {plot}")
    finally:
        destroy_distributed()
    sys.stdout.flush()
    return 0


def print_result(result, model: str, data: str) -> None:
    from scalelab.cli import print_table

    bpb = "unknown (the data's tokenizer cannot decode it)" if result.bits_per_byte is None \
        else f"{result.bits_per_byte:.4f}"
    print_table([("model", model), ("data", f"{data} ({result.split})"),
                 ("tokens", f"{result.tokens:,} ({result.windows:,} windows × {result.seq_len})"),
                 ("loss", f"{result.loss:.4f} nats/token"), ("perplexity", f"{result.perplexity:.3f}"),
                 ("bits per byte", bpb)], title="Evaluation")
    title = "Loss by position"
    print(title)
    print("-" * len(title))
    print(f"  {'positions':>15}  {'tokens':>12}  {'loss':>8}  {'ppl':>9}")
    for b in result.buckets:
        print(f"  {f'{b.start}-{b.end - 1}':>15}  {b.tokens:>12,}  {b.loss:>8.4f}  {math.exp(min(b.loss, 700)):>9.3f}")
    print()


def write_plot(result, out: Path, label: str) -> None:
    """Mean loss at each target position (a running mean over ~1/64 of the window) with the
    buckets' means as steps; log-scaled positions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from scalelab.files import atomic_path

    per_position = np.asarray(result.position_loss)
    width = max(1, len(per_position) // 64)
    smooth = np.convolve(per_position, np.ones(width) / width, mode="valid")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(np.arange(len(smooth)) + (width - 1) / 2 + 1, smooth, lw=1.2, label=f"{label} (running mean of {width})")
    for b in result.buckets:
        ax.hlines(b.loss, b.start + 1, b.end, colors="C1", lw=2)
    ax.plot([], [], color="C1", lw=2, label="bucket mean")
    ax.set_xscale("log")
    ax.set_xlabel("context length (target position + 1)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"loss by position: {result.tokens:,} tokens, window {result.seq_len}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
