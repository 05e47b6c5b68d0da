"""`scalelab plot RUN_DIR [RUN_DIR ...] --out PNG`: training curves from metrics.jsonl.

Two panels: loss against tokens seen and against training FLOPs (scalelab.counting's exact
convention), train loss as lines and eval loss as markers, one colour per run.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from scalelab.cli import HelpFormatter
from scalelab.errors import UserError

EXAMPLES = """examples:
  scalelab plot runs/demo/run --out demo.png
  scalelab plot runs/a runs/b runs/c --out compare.png --log
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="plot loss vs tokens and vs FLOPs for one or more runs", description=__doc__,
                       epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (with metrics.jsonl)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--log", action="store_true", help="log-scale x axes")
    p.set_defaults(func=run)


def _points(records: list, kind: str, loss_key: str) -> dict[str, list[tuple[float, float]]]:
    """(x, loss) pairs of one kind of record for each x axis, skipping records that lack a finite
    number for that axis or the loss (a torn, hand-edited or older metrics.jsonl)."""
    def number(v):
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    out: dict[str, list[tuple[float, float]]] = {"tokens": [], "flops": []}
    for r in records:
        if not isinstance(r, dict) or r.get("kind") != kind or number(r.get(loss_key)) is None:
            continue
        for axis in out:
            if number(r.get(axis)) is not None:
                out[axis].append((number(r[axis]), number(r[loss_key])))
    return out


def run(args: argparse.Namespace) -> int:
    from scalelab.files import check_output_file
    from scalelab.train.metrics import read_metrics

    out = check_output_file(args.out, flag="--out", suffixes=(".png",))
    runs = []
    for r in args.runs:
        if not (Path(r) / "metrics.jsonl").is_file():
            raise UserError(f"{r}: no metrics.jsonl (is it a run directory of `scalelab train`?)")
        records = read_metrics(r)
        train, evals = _points(records, "train", "loss"), _points(records, "eval", "val_loss")
        if not (train["tokens"] or evals["tokens"]):
            raise UserError(f"{Path(r) / 'metrics.jsonl'}: no train or eval record with numeric 'tokens' and loss "
                            "to plot")
        runs.append((Path(r).name or str(r), train, evals))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scalelab.files import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, train, evals) in enumerate(runs):
        color = f"C{i % 10}"
        for ax, key in zip(axes, ("tokens", "flops")):
            if train[key]:
                ax.plot(*zip(*train[key]), color=color, lw=1.2, label=f"{name} train")
            if evals[key]:
                ax.plot(*zip(*evals[key]), "o", color=color, ms=4, label=f"{name} val")
    for ax, label in zip(axes, ("tokens seen", "training FLOPs (exact, 3 × forward)")):
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        if args.log:
            ax.set_xscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    print(f"wrote {out}")
    return 0
