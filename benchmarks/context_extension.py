"""Context extension on a CPU: does RoPE scaling let a model trained at 128 tokens use 512?

1. `scalelab prepare` Shakespeare with the byte tokenizer; `scalelab train` configs/demo.toml's
   model at S = 128 (RoPE theta 10,000);
2. evaluate it at S' = 512 on the val split, loss by position bucket (0-127, 128-255, 256-511):
   (a) unchanged: RoPE extrapolated to positions it never saw;
   (b) linear interpolation (PI) and YaRN, factor 4, applied without any training;
   (c) fine-tuned briefly at 512 (configs/extend-demo.toml: `train.init_from`, a new optimizer and
       schedule) with linear and with YaRN, and, as the control, with no scaling at all;
3. print the table and write a PNG of loss against position.

    python benchmarks/context_extension.py                    # ~10 min on a busy 2-core CPU
    python benchmarks/context_extension.py --out runs/context --png docs/img/context-extension.png
Runs go to --out; finished runs are skipped (scalelab train reports them complete).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
S, S_NEW, FACTOR = 128, 512, 4.0
BUCKETS = [(0, 128), (128, 256), (256, 512)]
BASE = ["model.block_size=128", "model.rope_theta=10000", "train.seq_len=128", "train.micro_batch_size=32",
        "eval.every=0", "checkpoint.every=0", "logging.every=50"]
SCALINGS = {"linear": {"type": "linear", "factor": FACTOR},
            "yarn": {"type": "yarn", "factor": FACTOR, "original_max_position_embeddings": S}}


def scalelab(*args: str) -> None:
    print("$ scalelab " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "scalelab", *args], check=True)


def toml_table(d: dict) -> str:
    return "{" + ", ".join(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}" for k, v in d.items()) + "}"


def loss_by_position(model: torch.nn.Module, data_dir: Path, seq_len: int, windows: int):
    """scalelab eval's measurement: the first `windows` windows of the val split (the same tokens
    for every model), loss by position bucket and at each position."""
    from scalelab.evaluate import evaluate

    edges = [a for a, _ in BUCKETS if 0 < a < seq_len]
    return evaluate(model, data_dir, split="val", seq_len=seq_len, max_tokens=windows * seq_len, buckets=edges,
                    progress=False)


def with_rope(model, cfg):
    """A copy of `model` whose positions follow `cfg` (same weights; block_size S' also tells
    scalelab.evaluate that reading S' positions without scaling is meant)."""
    from scalelab.model import Transformer

    other = Transformer(cfg)
    other.load_state_dict(model.state_dict())
    return other.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/context", help="data and run directories")
    ap.add_argument("--png", default="docs/img/context-extension.png", help="loss-by-position plot")
    ap.add_argument("--steps", type=int, default=300, help="steps of the model at S = 128")
    ap.add_argument("--finetune-steps", type=int, default=60, help="steps of each fine-tune at S' = 512")
    ap.add_argument("--windows", type=int, default=128, help="val windows of 512 tokens evaluated")
    args = ap.parse_args()

    from scalelab.files import check_output_file
    from scalelab.train.checkpoint import load_model_for_inference

    png = check_output_file(args.png, flag="--png", suffixes=(".png",))
    out = Path(args.out)
    data = out / "shakespeare-byte"
    start = time.perf_counter()
    if not (data / "meta.json").is_file():
        scalelab("prepare", "--dataset", "shakespeare", "--tokenizer", "byte", "--out", str(data))
    common = ["--set", f"data.dir={data}"]
    base = out / "base-128"
    scalelab("train", str(ROOT / "configs" / "demo.toml"), "--run-dir", str(base), *common,
             "--set", f"train.max_steps={args.steps}", *[x for kv in BASE for x in ("--set", kv)])
    runs = {}
    for name, scaling in [("none", None), *SCALINGS.items()]:
        run = out / f"extend-{name}"
        scaling_set = ["--set", f"model.rope_scaling={toml_table(scaling)}"] if scaling else \
            ["--set", "model.rope_scaling=none"]
        scalelab("train", str(ROOT / "configs" / "extend-demo.toml"), "--run-dir", str(run), *common,
                 "--set", f"train.init_from={base}", "--set", f"train.max_steps={args.finetune_steps}", *scaling_set)
        runs[name] = run
    train_seconds = time.perf_counter() - start

    torch.set_num_threads(2)
    model = load_model_for_inference(base / "final")
    cfg = model.config.replace(block_size=S_NEW)
    rows = {
        "trained at 128, evaluated at 128": loss_by_position(model, data, S, args.windows * 4),
        "(a) unchanged (RoPE extrapolated)": loss_by_position(with_rope(model, cfg), data, S_NEW, args.windows),
    }
    for name, scaling in SCALINGS.items():
        rows[f"(b) {name}, no fine-tune"] = loss_by_position(with_rope(model, cfg.replace(rope_scaling=scaling)),
                                                             data, S_NEW, args.windows)
    for name in ("none", *SCALINGS):
        label = "(c) no scaling" if name == "none" else f"(c) {name}"
        tuned = load_model_for_inference(runs[name] / "final")
        rows[f"{label}, fine-tuned {args.finetune_steps} steps at 512"] = loss_by_position(tuned, data, S_NEW,
                                                                                           args.windows)

    header = f"| model | {' | '.join(f'{a}-{b - 1}' for a, b in BUCKETS)} | all |"
    lines = [header, "|---" * (len(BUCKETS) + 2) + "|"]
    table = {}
    for label, r in rows.items():
        by_start = {b.start: b.loss for b in r.buckets}
        means = [by_start.get(a) for a, _ in BUCKETS]
        table[label] = {"buckets": means, "loss": r.loss, "tokens": r.tokens}
        lines.append(f"| {label} | " + " | ".join("—" if m is None else f"{m:.3f}" for m in means)
                     + f" | {r.loss:.3f} |")
    print("\n".join(lines))
    print(json.dumps({"loss_by_bucket_nats": table, "windows": args.windows, "base_steps": args.steps,
                      "finetune_steps": args.finetune_steps, "train_seconds": round(train_seconds, 1),
                      "total_seconds": round(time.perf_counter() - start, 1)}, indent=2))
    plot(rows, png)


def plot(rows: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scalelab.files import atomic_path

    fig, ax = plt.subplots(figsize=(8, 4.5))
    bin_size = 16
    for label, r in rows.items():
        if r.seq_len != S_NEW:
            continue
        smooth = torch.tensor(r.position_loss).view(-1, bin_size).mean(1)
        ax.plot(torch.arange(len(smooth)) * bin_size + bin_size / 2, smooth, label=label,
                linestyle="--" if label.startswith("(b)") else "-")
    ax.axvline(S, color="grey", linewidth=0.8)
    ax.set_xlabel(f"position (mean over bins of {bin_size})")
    ax.set_ylabel("val loss (nats)")
    ax.set_title(f"Trained at {S}, evaluated at {S_NEW}: RoPE extrapolation vs linear / YaRN")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    print(f"wrote {png}", file=sys.stderr)


if __name__ == "__main__":
    main()
