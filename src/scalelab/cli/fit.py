"""`scalelab fit INPUT...`: fit a loss law L(N, D) = E + A/N^alpha + B/D^beta to training runs.

INPUT is a CSV or JSONL table (columns N, D, loss; aliases params, tokens; or N, C, loss with
--tokens-from-flops), a run directory written by `scalelab train` (metrics.jsonl + config.toml
or model.toml), or a directory of run directories.

Approach 3 (default) minimises the Huber loss (delta 1e-3) between log L and
log-sum-exp(a - alpha log N, b - beta log D, e) as Hoffmann et al. 2022 and Epoch AI's
replication do: a projected (alpha, beta) grid solves E, A, B in closed form per cell, then the
best cells are polished jointly (see scalelab/scaling/fit.py). `--method grid` runs the classic
4500-start L-BFGS grid instead (minutes). `--method isoflop` is Approach 2: a parabola in log N
per compute budget, power laws N_opt(C), D_opt(C).
"""

from __future__ import annotations

import argparse
import math
import sys

from scalelab.cli import (HelpFormatter, jsonable, add_common_flags, format_count, parse_quantity, print_json,
                          print_table)
from scalelab.errors import UserError

EXAMPLES = """examples:
  scalelab fit runs.csv                                  # columns N, D, loss
  scalelab fit runs/ladder/ --out law.json --plot fit.png  # run directories from scalelab train
  scalelab fit tests/data/chinchilla_fig4.csv --tokens-from-flops --drop-highest-loss 5 \\
      --bootstrap 100 --budget 5.76e23 --json
  scalelab fit runs/ --method isoflop --plot isoflop.png
  scalelab plan 1e21 --law-file law.json                 # plan with the fitted law
"""


# Each resample is a full fit (~40 ms for 15 runs on one core, measured): 100,000 take about an
# hour; a K past that is a typo that would run for days.
MAX_BOOTSTRAP = 100_000


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit a scaling law L(N, D) to training runs (Approach 3 or IsoFLOP)",
                       description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="CSV/JSONL file, run directory, or directory of runs")
    p.add_argument("--method", choices=("approach3", "isoflop", "grid"), default="approach3",
                   help="approach3: projected grid + joint polish; grid: the classic 4500-start L-BFGS "
                   "grid (slow, for reference); isoflop: Approach 2")
    p.add_argument("--budget", default=None, help="compute budget C for N_opt, D_opt and tokens per parameter; "
                   "None: the largest C among the runs")
    p.add_argument("--bootstrap", type=int, default=0, metavar="K",
                   help="refit K resamples for standard errors and 95%% intervals (approach3)")
    p.add_argument("--seed", type=int, default=0, help="random seed for --bootstrap")
    p.add_argument("--huber-delta", type=float, default=1e-3, help="Huber loss threshold on log-loss residuals")
    p.add_argument("--tokens-from-flops", action="store_true", help="D = C / (6N) for tables giving C (FLOPs) not D")
    p.add_argument("--drop-highest-loss", type=int, default=0, metavar="K",
                   help="drop the K highest-loss runs first (Epoch AI drop 5 of Chinchilla's Figure 4)")
    p.add_argument("--pick", choices=("final", "best"), default="final",
                   help="run directories: the final or the lowest evaluation loss")
    p.add_argument("--non-embedding", action="store_true",
                   help="run directories: N = non-embedding parameters (Kaplan's convention) instead of the "
                   "total (Chinchilla's)")
    p.add_argument("--budgets", default=None, help="isoflop: comma-separated budgets to group runs by, e.g. 1e18,3e18,1e19 "
                   "(default: cluster runs whose FLOPs agree within --flop-tolerance)")
    p.add_argument("--flop-tolerance", type=float, default=0.1, help="isoflop: grouping tolerance in log10(C) (dex)")
    p.add_argument("--out", default=None, metavar="LAW.json", help="write the fitted law (for `scalelab plan --law-file`)")
    p.add_argument("--plot", default=None, metavar="PATH.png", help="write a PNG of the data and the fit")
    add_common_flags(p, set_flag=False)
    p.set_defaults(func=run)


def _progress(label: str):
    """Progress on stderr: an updating line on a terminal, ten plain lines otherwise."""
    tty = sys.stderr.isatty()

    def report(i: int, n: int, *rest) -> None:
        if tty:
            print(f"\r{label}: {i}/{n}", end="\n" if i == n else "", file=sys.stderr, flush=True)
        elif i == n or i % max(n // 10, 1) == 0:
            print(f"{label}: {i}/{n}", file=sys.stderr, flush=True)
    return report


def _check_flags(args: argparse.Namespace) -> tuple[float | None, list[float] | None]:
    """Every numeric flag and output path, before any work: (--budget, --budgets) parsed."""
    from scalelab.files import check_output_file

    if not (math.isfinite(args.huber_delta) and args.huber_delta > 0):
        raise UserError(f"--huber-delta must be a positive number, got {args.huber_delta}")
    if args.bootstrap < 0 or args.bootstrap == 1 or args.bootstrap > MAX_BOOTSTRAP:
        raise UserError(f"--bootstrap needs 0 (off) or at least 2 resamples (at most {MAX_BOOTSTRAP:,}), "
                        f"got {args.bootstrap}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.drop_highest_loss < 0:
        raise UserError(f"--drop-highest-loss must be >= 0, got {args.drop_highest_loss}")
    if not (math.isfinite(args.flop_tolerance) and args.flop_tolerance > 0):
        raise UserError(f"--flop-tolerance must be a positive number of dex (e.g. 0.1), got {args.flop_tolerance}")
    budget = None
    if args.budget is not None:
        budget = parse_quantity(args.budget, name="--budget")
        if budget <= 0:
            raise UserError(f"--budget must be positive, got {args.budget}")
    budgets = None
    if args.budgets is not None:
        if args.method != "isoflop":
            raise UserError("--budgets groups runs for --method isoflop; drop it or add --method isoflop")
        budgets = [parse_quantity(b, name="--budgets") for b in args.budgets.split(",") if b.strip()]
        if not budgets or min(budgets) <= 0:
            raise UserError(f"--budgets must be positive FLOP counts separated by commas (e.g. 1e18,3e18,1e19), "
                            f"got '{args.budgets}'")
    if args.method == "isoflop":
        if args.out:
            raise UserError("--out writes a loss law (E, A, B, alpha, beta), which --method isoflop does not fit; "
                            "use --method approach3")
        if args.bootstrap:
            raise UserError("--bootstrap is for --method approach3; isoflop reports exponent standard errors")
    if args.out:
        check_output_file(args.out, flag="--out", suffixes=(".json",))
    if args.plot:
        check_output_file(args.plot, flag="--plot", suffixes=(".png",))
    return budget, budgets


def _warn(message: str) -> None:
    print(f"scalelab fit: warning: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from scalelab.scaling import fit as F

    budget, budgets = _check_flags(args)
    runs = F.load_runs(args.inputs, tokens_from_flops=args.tokens_from_flops, pick=args.pick,
                       non_embedding=args.non_embedding)
    runs = F.drop_highest_loss(runs, args.drop_highest_loss)
    grids = F.hyperparameter_grids(runs)
    hyper, hyper_warnings = F.fit_hyperparameters(runs, grids)
    runs = F.best_of_grids(runs, grids)
    if budget is None:
        budget = float(runs.C.max())

    if args.method == "isoflop":
        result = F.fit_isoflop(runs, budgets=budgets, tolerance_dex=args.flop_tolerance)
        for message in result["warnings"]:
            _warn(message)
        result["at_budget"] = F.isoflop_at(result, budget)
        if args.plot:
            F.plot_isoflop(runs, result, args.plot)
        if args.json:
            out = dict(result)
            out["budgets"] = [{k: v for k, v in p.items() if k != "index"} for p in result["budgets"]]
            print_json(out)
        else:
            _print_isoflop(result, args)
        return 0

    if args.method == "grid":
        fit = F.fit_classic_grid(runs, delta=args.huber_delta, progress=_progress("classic grid starts"))
    else:
        fit = F.fit_approach3(runs, delta=args.huber_delta)
    summary = F.summarize(fit, budget, runs)  # NoOptimum (exit 2) when a term vanished
    for message in hyper_warnings:
        _warn(message)
    if hyper is not None:
        summary["hyperparameters"] = {"law": hyper["law"].to_dict(), "budgets": hyper["budgets"],
                                      "lr_exponent_stderr": hyper["lr"]["exponent_stderr"],
                                      "batch_exponent_stderr": hyper["batch_tokens"]["exponent_stderr"]}
    for bound in summary["at_bounds"]:
        term = "N" if bound.startswith("alpha") else "D"
        _warn(f"{bound} is at its bound: the loss does not fall as a power of {term} "
              f"across these runs (the fit makes the {term} term a step that only the smallest-{term} runs feel); "
              f"widen the ladder in {term}, or check that its largest runs trained well, before trusting "
              f"N_opt and D_opt")
    if args.bootstrap:
        boot = F.bootstrap(runs, fit, budget, args.bootstrap, seed=args.seed, delta=args.huber_delta,
                           progress=_progress("bootstrap resamples"))
        summary["bootstrap"] = {k: boot[k] for k in ("resamples", "seed", "valid", "degenerate", "no_interval")
                                if k in boot}
        for key in ("stderr", "interval_95"):
            if key in boot:
                summary[key] = boot[key]
    if args.out:
        from scalelab.scaling.laws import save_law

        extra = {k: summary[k] for k in ("objective", "huber_delta", "n_points", "method", "at_bounds")}
        extra["inputs"] = [str(i) for i in args.inputs]
        for key in ("stderr", "bootstrap"):
            if key in summary:
                extra[key] = summary[key]
        if hyper is not None:
            extra["hyperparameters"] = hyper["law"].to_dict()
        save_law(fit.law, args.out, jsonable(extra))  # atomic: an existing law file changes only now
    if args.plot:
        F.plot_approach3(runs, fit, args.plot, budget=budget)
    if args.json:
        print_json(summary)
        return 0
    _print_approach3(summary, args)
    return 0


def _pm(summary, key: str, fmt: str) -> str:
    value = format(summary[key], fmt)
    if "stderr" in summary:
        lo, hi = summary["interval_95"][key]
        value += f" ± {format(summary['stderr'][key], fmt)}   (95%: {format(lo, fmt)} .. {format(hi, fmt)})"
    return value


def _bootstrap_line(boot: dict) -> str:
    """How many resamples the intervals come from, and why the others gave no law to use."""
    line = f"{boot['valid']} of {boot['resamples']} resamples (seed {boot['seed']})"
    if boot["degenerate"]:
        reasons = "; ".join(f"{n}: {why}" for why, n in sorted(boot["degenerate"].items(), key=lambda kv: -kv[1]))
        line += f"; {boot['resamples'] - boot['valid']} left out ({reasons})"
    if "no_interval" in boot:
        line += f". {boot['no_interval']}"
    elif boot["degenerate"]:
        line += f"; the intervals are from the {boot['valid']} others"
    return line


def _print_approach3(s, args) -> None:
    title = (f"L(N, D) = E + A/N^alpha + B/D^beta, {s['n_points']} runs, Huber delta {s['huber_delta']:g}"
             f" ({'classic grid' if s['method'] == 'grid' else 'approach 3'})")
    rows = [(k, _pm(s, k, ".4f" if k != "A" and k != "B" else ".5g")) for k in ("E", "A", "B", "alpha", "beta")]
    rows.append(("objective", f"{s['objective']:.10g}"))
    rows.append(("N_opt ∝ C^a", _pm(s, "N_opt_exponent", ".4f")))
    rows.append(("D_opt ∝ C^b", _pm(s, "D_opt_exponent", ".4f")))
    if "bootstrap" in s:
        rows.append(("bootstrap", _bootstrap_line(s["bootstrap"])))
    print_table(rows, title)
    budget_label = "" if args.budget is not None else " (largest in the data; set --budget)"
    rows = [("budget C", f"{s['budget']:.4g} FLOPs{budget_label}"),
            ("N_opt", _pm(s, "N_opt", ".4g") + f"  [{format_count(s['N_opt'])}]"),
            ("D_opt", _pm(s, "D_opt", ".4g") + f"  [{format_count(s['D_opt'])}]"),
            ("tokens per param", _pm(s, "tokens_per_param", ".2f")),
            ("predicted loss", f"{s['loss_at_budget']:.4f}")]
    print_table(rows, "compute-optimal at the budget (C = 6ND)")
    if "hyperparameters" in s:
        law, h = s["hyperparameters"]["law"], s["hyperparameters"]
        print_table([
            ("eta_opt", f"{law['lr']['coef']:.4g} · C^{law['lr']['exponent']:.4f}"),
            ("B_opt (tokens)", f"{law['batch_tokens']['coef']:.4g} · C^{law['batch_tokens']['exponent']:.4f}"),
            ("from", f"{len(h['budgets'])} learning-rate x batch grids (C = training FLOPs; the loss law uses "
                     "each grid's best run)"),
        ], "hyperparameter laws (DeepSeek LLM's method)")
    if args.out:
        print(f"wrote {args.out} (use: scalelab plan C --law-file {args.out})")
    if args.plot:
        print(f"wrote {args.plot}")


def _print_isoflop(r, args) -> None:
    rows = []
    for p in r["budgets"]:
        flag = "" if p["in_range"] else "  (minimum outside the sampled N: extrapolated)"
        rows.append((f"C = {p['C']:.3g}", f"{p['runs']} runs, N_opt {format_count(p['N_opt'])}, "
                     f"D_opt {format_count(p['D_opt'])}, loss {p['loss_opt']:.4f}{flag}"))
    for s in r["skipped"]:
        rows.append((f"C = {s['C']:.3g}", f"skipped: {s['runs']} run{'s' if s['runs'] != 1 else ''}, {s['why']}"))
    print_table(rows, f"IsoFLOP profiles (Approach 2), {r['n_points']} runs")
    n, d, at = r["N_opt"], r["D_opt"], r["at_budget"]
    print_table([
        ("N_opt", f"{n['coefficient']:.4g} · C^{n['exponent']:.4f} {_stderr(n)}"),
        ("D_opt", f"{d['coefficient']:.4g} · C^{d['exponent']:.4f} {_stderr(d)}"),
        (f"at C = {at['budget']:.4g}", f"N_opt {format_count(at['N_opt'])}, D_opt {format_count(at['D_opt'])}, "
         f"{at['tokens_per_param']:.4g} tokens/param"),
    ], "power laws across budgets")
    if args.plot:
        print(f"wrote {args.plot}")


def _stderr(law: dict) -> str:
    se = law["exponent_stderr"]
    return f"(± {se:.4f})" if se is not None else f"(± n/a: {law['exponent_stderr_why']})"
