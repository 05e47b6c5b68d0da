"""`scalelab plot RUN_DIR [RUN_DIR ...] --out PNG`: training curves from metrics.jsonl.

Two panels: loss against tokens seen and against training FLOPs (scalelab.counting's exact
convention), train loss as lines and eval loss as markers, one colour per run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scalelab.cli import HelpFormatter
from scalelab.errors import UserError

EXAMPLES = """examples:
  scalelab plot runs/demo --out demo.png
  scalelab plot runs/a runs/b runs/c --out compare.png --log
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="plot loss vs tokens and vs FLOPs for one or more runs", description=__doc__,
                       epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (with metrics.jsonl)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--log", action="store_true", help="log-scale x axes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scalelab.train.metrics import read_metrics

    runs = []
    for r in args.runs:
        records = read_metrics(r)
        if not records:
            raise UserError(f"{r}: no metrics.jsonl records (is it a run directory of `scalelab train`?)")
        runs.append((Path(r).name or str(r), records))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scalelab.files import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, records) in enumerate(runs):
        color = f"C{i % 10}"
        train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
        evals = [r for r in records if r.get("kind") == "eval" and r.get("val_loss") is not None]
        for ax, key in zip(axes, ("tokens", "flops")):
            ax.plot([r[key] for r in train], [r["loss"] for r in train], color=color, lw=1.2, label=f"{name} train")
            if evals:
                ax.plot([r[key] for r in evals], [r["val_loss"] for r in evals], "o", color=color, ms=4,
                        label=f"{name} val")
    for ax, label in zip(axes, ("tokens seen", "training FLOPs (exact, 3 × forward)")):
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        if args.log:
            ax.set_xscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    print(f"wrote {out}")
    return 0
