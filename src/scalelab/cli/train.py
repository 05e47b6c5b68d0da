"""`scalelab train CONFIG.toml`: train a model on a prepared data directory.

One process on CPU, MPS or one GPU; many with torchrun (DDP or FSDP2, `[parallel] strategy`).
Resumes automatically from the run directory's latest checkpoint. Progress on stderr; metrics
in RUN_DIR/metrics.jsonl; the resolved config in RUN_DIR/config.toml; final weights in
RUN_DIR/final (native format, for `scalelab sample` and `scalelab export-hf`).

Writes only into a new, empty or run directory (one whose config.toml scalelab train wrote), one
process at a time (RUN_DIR/.lock), and only when counting's predicted peak memory fits in the
device's free memory (train.check_memory).

Exit status: 0 done (or already complete: its recorded figures are reported); 2 bad config or
data, a run directory that is in use or is not a run directory, a run that does not fit in memory,
or a resume that would change what the finished steps meant (one line); 1 unexpected failure or a non-finite
loss/gradient (the last good checkpoint is kept); 143/130 stopped by SIGTERM/SIGINT after
writing a checkpoint (run the same command again to resume).
"""

from __future__ import annotations

import argparse
import os
import sys

from scalelab.cli import HelpFormatter, add_common_flags, leave_torchrun_worker, print_json

EXAMPLES = """examples:
  scalelab train configs/demo.toml
  scalelab train configs/demo.toml --set train.max_steps=50 --set model.n_layer=2 --run-dir runs/tiny
  scalelab train configs/gpt2-124m.toml --resume
  torchrun --nproc_per_node=8 -m scalelab train configs/llama3.1-8b.toml
  python -m scalelab.train.config   # print the reference of every config key
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a TOML config (CPU, GPU, or torchrun DDP/FSDP)",
                       description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("config", metavar="CONFIG.toml", help="training config (see docs/training-config.md)")
    p.add_argument("--run-dir", default=None, help="run directory (default: logging.run_dir, else runs/<config name>)")
    p.add_argument("--resume", action="store_true",
                   help="require a checkpoint in the run directory (resuming is automatic when one exists)")
    p.add_argument("--check", action="store_true", help="validate the config and print the resolved plan; do not train")
    add_common_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return leave_torchrun_worker(_run(args))


def _run(args: argparse.Namespace) -> int:
    from scalelab.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.check:
        return _check(cfg, args)
    from scalelab.train.trainer import TrainingDiverged, default_run_dir, train

    run_dir = args.run_dir or default_run_dir(cfg, args.config)
    try:
        summary = train(cfg, run_dir, resume=args.resume)
    except TrainingDiverged as e:
        print(f"scalelab train: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print_json(summary)
    elif summary["exit_code"] == 0 and _is_main():
        rows = [("Run directory", summary["run_dir"]), ("Steps", str(summary["step"]))]
        if summary.get("loss") is not None:
            rows.append(("Final train loss", f"{summary['loss']:.4f}"))
        if summary.get("val_loss") is not None:
            rows.append(("Val loss", f"{summary['val_loss']:.4f}"))
        if summary.get("val_bpb") is not None:
            rows.append(("Val bits per byte", f"{summary['val_bpb']:.4f}"))
        rows += [("Checkpoint", summary["checkpoint"]), ("Final weights", summary["final"]),
                 ("Metrics", f"{summary['run_dir']}/metrics.jsonl")]
        from scalelab.cli import print_table

        print_table(rows, title="Already complete (recorded figures)" if summary.get("already_complete")
                    else "Training finished")
    return summary["exit_code"]


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _check(cfg, args) -> int:
    """Validate what can be validated without training: data, vocab, batch arithmetic, length,
    parallelism, and whether the run fits in the device's free memory (as train checks it)."""
    from scalelab.counting import count_params, training_flops
    from scalelab.data.loader import TokenLoader
    from scalelab.errors import UserError
    from scalelab.train.config import grad_accum_steps, layout_of, total_steps
    from scalelab.train.parallel import pick_device
    from scalelab.train.parallel import ParallelDims
    from scalelab.train.trainer import free_memory, memory_problem, predicted_memory, resolved_dtype

    world = int(os.environ.get("WORLD_SIZE", "1"))
    t = cfg.train
    layout = layout_of(cfg, world)
    strategy = ParallelDims.strategy_of(layout)
    device = pick_device(t.device, int(os.environ.get("LOCAL_RANK", "0")))
    t.dtype = resolved_dtype(t.dtype, device)
    free = free_memory(device)
    ranks_sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    problem = memory_problem(cfg, strategy, world, free, ranks_sharing, layout, device.type)
    if problem is not None:
        raise UserError(problem)
    accum = grad_accum_steps(cfg, layout.dp)
    loader = TokenLoader(cfg.data.dir, cfg.data.train_split, seq_len=t.seq_len, micro_batch_size=t.micro_batch_size,
                         grad_accum_steps=accum, world_size=layout.dp)
    loader.check_vocab(cfg.model.vocab_size)
    if t.init_from:
        from scalelab.train.init_from import check_source

        check_source(t.init_from, cfg.model, loader.metadata)
    seqs = t.micro_batch_size * accum * layout.dp
    flops = training_flops(cfg.model, seqs, t.seq_len)
    steps = total_steps(cfg, seqs * t.seq_len, flops)
    info = {"model": cfg.model.name(), "params": count_params(cfg.model).total, "world_size": world,
            "grad_accum_steps": accum, "tokens_per_step": seqs * t.seq_len, "steps": steps,
            "tokens": steps * seqs * t.seq_len, "flops": steps * flops, "train_tokens_available": loader.num_tokens,
            "strategy": strategy, "dtype": t.dtype,
            "predicted_memory_bytes_per_device": predicted_memory(cfg, strategy, world, layout, device.type)["total"],
            "free_memory_bytes": None if free is None else free[0]}
    if args.json:
        print_json(info)
    else:
        from scalelab.cli import format_bytes, print_table

        def shown(k, v):
            if k.endswith("_bytes") or k.endswith("_bytes_per_device"):
                return "unknown" if v is None else format_bytes(v)
            return f"{v:,}" if isinstance(v, int) else (f"{v:.4g}" if isinstance(v, float) else str(v))

        print_table([(k, shown(k, v)) for k, v in info.items()], title=f"{args.config}: OK")
    return 0
