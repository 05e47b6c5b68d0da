"""`scalelab sweep fit OUT_DIR [--budget C]`: fit a sweep's runs (Approach 3 with bootstrap intervals, and
Approach 2), fit hyperparameter laws from learning-rate x batch grids, extrapolate the compute-optimal run to
the target budget, compare --compare variants, and write OUT_DIR/fit.json, OUT_DIR/report.md and its PNGs.

Not a verb module of its own: `scalelab sweep` (cli/sweep.py) calls register(its subparsers).
"""

from __future__ import annotations

import argparse
import sys

from scalelab.cli import HelpFormatter, add_common_flags, format_count, parse_quantity, print_json
from scalelab.errors import UserError

EXAMPLES = """examples:
  scalelab sweep fit runs/study                     # target: 10x the largest budget
  scalelab sweep fit runs/study --budget 1e16 --bootstrap 500
  scalelab sweep fit runs/ab --json                 # a --compare design: which variant wins
"""
MAX_BOOTSTRAP = 100_000


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("fit", help="fit the sweep's runs, extrapolate to a target budget, write fit.json and a report",
                       description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("out_dir", metavar="OUT_DIR", help="a sweep directory made by `scalelab sweep design`")
    p.add_argument("--budget", default=None, metavar="C",
                   help="target compute in FLOPs for the recommendation (default: 10x the largest budget)")
    p.add_argument("--bootstrap", type=int, default=200, metavar="K",
                   help="bootstrap resamples for the intervals (0: none; each is one Approach 3 fit)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the bootstrap")
    p.add_argument("--no-plots", action="store_true", help="write fit.json and report.md without PNGs")
    add_common_flags(p, set_flag=False)
    p.set_defaults(func=run)
    return p


def _check(args: argparse.Namespace) -> float | None:
    if args.bootstrap < 0 or args.bootstrap == 1 or args.bootstrap > MAX_BOOTSTRAP:
        raise UserError(f"--bootstrap needs 0 (off) or 2 to {MAX_BOOTSTRAP:,} resamples, got {args.bootstrap}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.budget is None:
        return None
    budget = parse_quantity(args.budget, name="--budget")
    if not budget > 0:
        raise UserError(f"--budget must be a positive number of FLOPs, got {args.budget}")
    return budget


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from scalelab.cli import jsonable
    from scalelab.files import atomic_write_text
    from scalelab.sweep.design import read_sweep
    from scalelab.sweep.fit import FIT_FILE, fit_sweep, public

    budget = _check(args)
    out_dir = Path(args.out_dir)
    if not out_dir.is_dir():
        what = "is a file, not a sweep directory" if out_dir.exists() else "no such sweep directory"
        raise UserError(f"{out_dir}: {what}; give a directory made by `scalelab sweep design OUT_DIR --budgets ...`")
    doc = read_sweep(out_dir)
    result = fit_sweep(out_dir, doc, budget=budget, bootstrap=args.bootstrap, seed=args.seed)
    for w in result["warnings"]:
        print(f"scalelab sweep fit: warning: {w}", file=sys.stderr)
    written = []
    if args.no_plots:
        from scalelab.sweep.fit import REPORT_FILE
        from scalelab.sweep.report import report_markdown

        atomic_write_text(out_dir / REPORT_FILE, report_markdown(result, doc["design"], []))
        written.append(REPORT_FILE)
    else:
        from scalelab.sweep.report import write_report

        written += write_report(out_dir, result, doc["design"])
    written += _write_laws(out_dir, result)
    content = jsonable(public(result))
    atomic_write_text(out_dir / FIT_FILE, json.dumps(content, indent=2) + "\n")
    written.append(FIT_FILE)
    if args.json:
        print_json(content)
        return 0
    _print(result, out_dir, written)
    return 0


def _write_laws(out_dir, result) -> list[str]:
    """Each variant's fitted loss law, with its fitted hyperparameter law when grids gave one, as a law file
    (OUT_DIR/law[-VARIANT].json) for `scalelab plan --law-file` and `sweep design --law-file`."""
    from scalelab.scaling.laws import save_law
    from scalelab.sweep.report import slug

    names = []
    for label, r in result["_results"].items():
        name = f"law{slug(label)}.json"
        extra = {"source": f"scalelab sweep fit ({r['runs']} runs of sweep {result['fingerprint']}"
                           f"{', ' + label if label else ''})", "at_bounds": r["approach3"]["at_bounds"]}
        if "bootstrap" in r["approach3"] and "stderr" in r["approach3"]["bootstrap"]:
            extra["stderr"] = r["approach3"]["bootstrap"]["stderr"]
        h = r["hyperparameter_law"]
        if h["fitted"]:
            extra["hyperparameters"] = {k: v for k, v in h.items() if k not in ("fitted", "budgets")}
        save_law(r["_law"], out_dir / name, extra)
        names.append(name)
    return names


def _print(result, out_dir, written) -> None:
    rec = result["recommendation"]
    iv = rec.get("loss_interval_95")
    interval = f" (95%: {iv[0]:.4f} .. {iv[1]:.4f})" if iv else ""
    for label, v in result["variants"].items():
        a3 = v["approach3"]
        head = f"[{label}] " if label else ""
        a2 = v["approach2"]
        a2_text = ("not fitted" if "error" in a2 else
                   f"N_opt ∝ C^{a2['N_opt']['exponent']:.3f}, D_opt ∝ C^{a2['D_opt']['exponent']:.3f}")
        print(f"{head}{v['runs']} runs. Approach 3: L = {a3['E']:.3f} + {a3['A']:.4g}/N^{a3['alpha']:.3f} + "
              f"{a3['B']:.4g}/D^{a3['beta']:.3f} (N_opt ∝ C^{a3['N_opt_exponent']:.3f}). Approach 2: {a2_text}")
    hp = rec["hyperparameters"]
    print(f"at C = {result['budget']:.3g} FLOPs: {rec['name']}, N {format_count(rec['N'])}, D {format_count(rec['D'])}, "
          f"predicted loss {rec['loss']:.4f}{interval}; lr {hp['peak_lr']:.3g}, batch {hp['batch_tokens']:,} tokens, "
          f"{rec['steps']:,} steps")
    if "comparison" in result:
        print(result["comparison"]["verdict"])
    print(f"wrote {', '.join(str(out_dir / w) for w in written)}")
