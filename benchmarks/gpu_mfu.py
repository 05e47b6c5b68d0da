"""The trainer's MFU and peak memory on one GPU, against the counting module's predictions.

Runs `scalelab train` itself (not a stripped-down loop) on synthetic byte-level data for each
model below, with bf16 and per-block torch.compile, and reads the steady-state records of its
metrics.jsonl: tokens/s, achieved TFLOP/s and MFU (the counting module's exact FLOPs over the
hardware table's dense bf16 peak), and torch.cuda.max_memory_allocated beside
counting.training_memory's prediction for the same shape, precision and micro-batch, and the MFU
scalelab.steptime predicts for the detected GPU (it models eager PyTorch: compare it with a
`--no-compile` run; per-block compile fuses the memory-bound ops it counts).

    python benchmarks/gpu_mfu.py                      # gpt2-124m and llama3.2-1b on one GPU
    python benchmarks/gpu_mfu.py --no-compile         # eager, as scalelab.steptime predicts it
    python benchmarks/gpu_mfu.py --tiny --device cpu  # a smoke test of the script itself
Prints a markdown table for benchmarks/RESULTS.md and writes OUT/gpu_mfu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

# name, [model] section, seq_len, micro-batch (one micro-batch per step: global = micro × seq)
MODELS = [
    ("gpt2-124m", {"preset": "gpt2"}, 1024, 16),
    ("llama3.2-1b", {"preset": "llama3.2-1b"}, 2048, 8),
]
TINY = [("tiny-llama", {"style": "llama3", "n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 512,
                        "block_size": 128}, 128, 4)]


def synthetic_data(out: Path) -> Path:
    """~8 MB of word-like text, prepared with the byte tokenizer (content does not matter for speed)."""
    data = out / "data"
    if (data / "meta.json").is_file():
        return data
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    text = out / "synthetic.txt"
    with open(text, "w") as f:
        for _ in range(2000):
            f.write(" ".join(rng.choice(words) for _ in range(700)) + "\n\n")
    subprocess.run([sys.executable, "-m", "scalelab", "prepare", "--input", str(text), "--tokenizer", "byte",
                    "--out", str(data), "--val-fraction", "0.01"], check=True)
    return data


def toml_section(name: str, values: dict) -> str:
    lines = [f"[{name}]"]
    for k, v in values.items():
        lines.append(f"{k} = {json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}")
    return "\n".join(lines) + "\n"


def run_one(out: Path, data: Path, name: str, model: dict, seq_len: int, micro: int, device: str, dtype: str,
            compile: bool, steps: int) -> dict:
    from scalelab import counting
    from scalelab.train.config import load_config
    from scalelab.train.metrics import read_metrics
    from scalelab.train.trainer import predicted_memory

    cfg_path = out / f"{name}.toml"
    cfg_path.write_text("\n".join([
        toml_section("model", {**model, "block_size": max(seq_len, model.get("block_size", 0))}),
        toml_section("data", {"dir": str(data.resolve())}),
        toml_section("train", {"seq_len": seq_len, "micro_batch_size": micro, "global_batch_tokens": micro * seq_len,
                               "max_steps": steps, "warmup": 2, "dtype": dtype, "compile": compile, "device": device}),
        toml_section("eval", {"every": 10 ** 9, "at_end": False}),
        toml_section("checkpoint", {"every": 10 ** 9, "keep": 1}),
        toml_section("logging", {"every": 5}),
    ]))
    run_dir = out / "runs" / name
    started = time.time()
    subprocess.run([sys.executable, "-m", "scalelab", "train", str(cfg_path), "--run-dir", str(run_dir)], check=True)
    steady = [r for r in read_metrics(run_dir) if "tokens_per_second" in r][2:]  # past compilation and warm-up
    cfg = load_config(cfg_path)
    cfg.train.dtype = dtype  # what the trainer resolves "auto" to, for the prediction
    predicted = predicted_memory(cfg, "none", 1)
    mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
    return {
        "predicted_mfu": predicted_mfu(cfg, seq_len, micro, device),
        "model": name, "params": counting.count_params(cfg.model).total, "seq_len": seq_len, "micro_batch": micro,
        "dtype": cfg.train.dtype, "compile": compile,
        "tokens_per_second": statistics.median(r["tokens_per_second"] for r in steady),
        "tflops_per_second": statistics.median(r["tflops_per_second"] for r in steady),
        "mfu": statistics.median(mfu) if mfu else None,
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in steady),
        # max_memory_allocated is the allocated peak: counting's "peak" (its "total" adds the CUDA
        # context and allocator reserve, which max_memory_allocated does not see)
        "predicted_memory_bytes": predicted["peak"], "predicted": predicted,
        "wall_seconds": time.time() - started,
    }


def predicted_mfu(cfg, seq_len: int, micro: int, device: str) -> float | None:
    """scalelab.steptime's MFU for one process on this GPU (None off CUDA or on a GPU not in hardware.py)."""
    if device != "cuda":
        return None
    import torch

    from scalelab.hardware import detect_accelerator
    from scalelab.layout import Layout
    from scalelab.steptime import step_time

    acc = detect_accelerator(torch.cuda.get_device_name())
    if acc is None:
        return None
    layout = Layout(dp_shard=1).validate(cfg.model, 1)
    return step_time(cfg.model, acc, layout, micro_batch=micro, seq_len=seq_len, precision="bf16-mixed").mfu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_mfu"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a tiny model only (checks the script on a CPU)")
    ap.add_argument("--only", default=None, help="comma-separated model names")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = synthetic_data(out)
    dtype = "bf16" if args.device == "cuda" else "fp32"
    models = TINY if args.tiny else MODELS
    if args.only:
        models = [m for m in models if m[0] in args.only.split(",")]
    results = []
    for name, model, seq_len, micro in models:
        results.append(run_one(out, data, name, model, seq_len, micro, args.device, dtype,
                               compile=not args.no_compile and args.device == "cuda", steps=args.steps))
        (out / "gpu_mfu.json").write_text(json.dumps(results, indent=2) + "\n")
    gpu = "cpu"
    if args.device == "cuda":
        import torch

        gpu = torch.cuda.get_device_name()
    print(f"\n{time.strftime('%Y-%m-%d')}, {gpu}, `python benchmarks/gpu_mfu.py`\n")
    print("| model | params | batch | tokens/s | TFLOP/s | MFU | predicted MFU (steptime, eager) | peak memory | "
          "predicted | peak / predicted |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        predicted = f"{100 * r['predicted_mfu']:.1f}%" if r["predicted_mfu"] is not None else "n/a"
        print(f"| {r['model']} | {r['params'] / 1e6:,.0f}M | {r['micro_batch']} × {r['seq_len']} | "
              f"{r['tokens_per_second']:,.0f} | {r['tflops_per_second']:.1f} | {mfu} | {predicted} | "
              f"{r['peak_memory_bytes'] / 2**30:.2f} GiB | {r['predicted_memory_bytes'] / 2**30:.2f} GiB | "
              f"{r['peak_memory_bytes'] / r['predicted_memory_bytes']:.2f} |")


if __name__ == "__main__":
    main()
