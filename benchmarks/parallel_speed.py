"""Training throughput of each parallel layout against one process, in the same run.

Every layout trains the same model on the same global batch with the real Trainer (`scalelab
train`'s build / train_step); its tokens/s is the global batch over the median step time, the first
step (warm-up) left out. The one-process baseline runs first; all the layouts of one world size run
in ONE torchrun launch (this file is also the worker), so each launch's start-up is paid once, and
the baseline is launched the same way (a world of 1, the same threads per process). The table gives each layout's tokens/s and its ratio to one process.

On a CPU the ranks share one host's cores and gloo moves every collective through memory, so the
ratio is below 1: the point there is that each layout runs and what it costs is recorded. On a
multi-GPU machine the same script measures the real thing, e.g. on 8 GPUs:

    python benchmarks/parallel_speed.py                                   # CPU: tiny LLaMA-3 GQA, 2 and 4 ranks
    python benchmarks/parallel_speed.py --device cuda --worlds 8 --preset llama3.1-8b \\
        --seq-len 4096 --micro-batch 1 --steps 10 --dtype bf16            # GPU: FSDP8, FSDP×TP, HSDP, TP8

LAYOUTS (world size -> name -> [parallel] overrides) is the table to extend. `--match pp` runs only
the layouts whose name contains "pp" (the pipeline ones), with the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

LAYOUTS: dict[int, dict[str, list[str]]] = {
    1: {"one process": []},
    2: {"ddp 2": ["parallel.strategy=ddp"], "fsdp 2": ["parallel.strategy=fsdp"],
        "tp 2 (sequence parallel)": ["parallel.tp=2"],
        "tp 2 (gathered, loss_parallel)": ["parallel.tp=2", "parallel.sequence_parallel=false",
                                           "parallel.loss_parallel=true"],
        "pp 2 (1F1B)": ["parallel.pp=2"],
        "pp 2 (Interleaved1F1B, 2 stages per rank)": ["parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B",
                                                      "parallel.pp_stages_per_rank=2"]},
    4: {"fsdp 4": ["parallel.strategy=fsdp"], "dp_shard 2 × tp 2": ["parallel.tp=2"],
        "hsdp 2 × 2": ["parallel.dp_replicate=2", "parallel.dp_shard=2"], "tp 4": ["parallel.tp=4"],
        "pp 2 × dp_shard 2": ["parallel.pp=2"], "pp 2 × tp 2": ["parallel.pp=2", "parallel.tp=2"]},
    8: {"fsdp 8": ["parallel.strategy=fsdp"], "dp_shard 4 × tp 2": ["parallel.tp=2"],
        "dp_shard 2 × tp 4": ["parallel.tp=4"], "tp 8": ["parallel.tp=8"],
        "hsdp 2 × 4": ["parallel.dp_replicate=2", "parallel.dp_shard=4"],
        "pp 2 × dp_shard 2 × tp 2": ["parallel.pp=2", "parallel.tp=2"], "pp 4 × dp_shard 2": ["parallel.pp=4"]},
}

CONFIG = """
[model]
{model}

[data]
dir = "{data}"

[train]
seq_len = {seq_len}
micro_batch_size = {micro_batch}
global_batch_tokens = {batch_tokens}
max_steps = {steps}
warmup = 1
dtype = "{dtype}"
device = "{device}"
check_memory = false

[eval]
every = 0
at_end = false

[checkpoint]
every = 0
on_signal = false

[logging]
every = 1
"""


def step_rate(run_dir: Path) -> float:
    """Median tokens/s over the steps after the first."""
    from scalelab.train.metrics import read_metrics

    rates = [r["tokens_per_second"] for r in read_metrics(run_dir) if r["kind"] == "train" and r["step"] > 1]
    return statistics.median(rates)


def train_layout(config: Path, run_dir: Path, overrides: list[str], d) -> float:
    """Train one layout inside the torchrun worker's process group `d`; its tokens/s."""
    from scalelab.train.config import load_config
    from scalelab.train.trainer import Trainer, resolved_dtype

    cfg = load_config(config, overrides)
    cfg.train.dtype = resolved_dtype(cfg.train.dtype, d.device)
    trainer = Trainer(cfg, run_dir, d, log=lambda m: None)
    try:
        trainer.build(resume=False)
        trainer.fit()
    finally:
        trainer.close()
    return step_rate(run_dir)


def worker(spec_path: str) -> None:
    """Under torchrun: every layout of the spec, one after another in one process group."""
    from scalelab.train.config import load_config
    from scalelab.train.parallel import destroy_distributed, init_distributed

    spec = json.loads(Path(spec_path).read_text())
    cfg = load_config(spec["config"])
    d = init_distributed(cfg.train.device, cfg.parallel.backend)
    results = {}
    for name, overrides in spec["layouts"].items():
        run_dir = Path(spec["work"]) / f"w{d.world_size}-{len(results)}"
        results[name] = train_layout(Path(spec["config"]), run_dir, overrides, d)
    if d.is_main:
        Path(spec["out"]).write_text(json.dumps(results))
    destroy_distributed()


def model_section(args) -> str:
    if args.preset:
        return f'preset = "{args.preset}"'
    return (f'style = "llama3"\nn_layer = {args.n_layer}\nn_embd = {args.n_embd}\nn_head = {args.n_head}\n'
            f'num_key_value_heads = {args.kv_heads}\nvocab_size = {args.vocab_size}\nblock_size = {args.seq_len}')


def prepare_data(out: Path) -> Path:
    import random

    from scalelab.data.prepare import prepare

    rng = random.Random(0)
    words = "the a model trains on tokens and layers shard over ranks while gradients flow back".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(50, 200))) + ".\n" for _ in range(2000)]
    prepare([(t, True) for t in texts], "byte", out, val_fraction=0.05, progress=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="world sizes to launch (keys of LAYOUTS)")
    ap.add_argument("--preset", default=None, help="an official model (default: a small LLaMA-3 GQA model)")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--match", default="", help="only the layouts whose name contains this (e.g. pp)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the one-process run (a model too big for one device)")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return

    work = Path(tempfile.mkdtemp(prefix="parallel_speed_"))  # data, config and run directories; removed at the end
    data = prepare_data(work / "data")
    dp_max = max(args.worlds)  # the same global batch for every layout: one micro-batch per rank at the widest dp
    config = work / "config.toml"
    config.write_text(CONFIG.format(model=model_section(args), data=data, seq_len=args.seq_len,
                                    micro_batch=args.micro_batch, batch_tokens=args.micro_batch * args.seq_len * dp_max,
                                    steps=args.steps, dtype=args.dtype, device=args.device))
    results: dict[str, tuple[int, float]] = {}
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for world in ([] if args.no_baseline else [1]) + args.worlds:  # the baseline launched like the rest
        spec = work / f"spec{world}.json"
        out = work / f"out{world}.json"
        layouts = {name: o for name, o in LAYOUTS[world].items() if world == 1 or args.match in name}
        if not layouts:
            continue
        spec.write_text(json.dumps({"config": str(config), "layouts": layouts, "work": str(work), "out": str(out)}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               __file__, "--worker", str(spec)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"world {world}: torchrun failed (exit {r.returncode})")
        results.update({name: (world, rate) for name, rate in json.loads(out.read_text()).items()})
    base = results.get("one process", (1, None))[1]
    print(f"{'layout':34} {'ranks':>5} {'tokens/s':>10} {'vs 1 process':>13}")
    for name, (world, rate) in results.items():
        ratio = f"{rate / base:.2f}x" if base else "n/a"
        print(f"{name:34} {world:5d} {rate:10.0f} {ratio:>13}")
    print(f"(global batch {args.micro_batch * args.seq_len * dp_max:,} tokens per step, median of steps 2..{args.steps};"
          f" device {args.device}, OMP_NUM_THREADS={env['OMP_NUM_THREADS']})")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
