"""The sweep fit's report: OUT_DIR/report.md and its PNGs (matplotlib, Agg), readable in a minute.

  isoflop[-VARIANT].png   Approach 2: loss against N per budget with its parabola; N_opt, D_opt against C
  surface[-VARIANT].png   Approach 3: the fitted law's iso-loss contours over (N, D) with the runs
  frontier.png            the best predicted loss against C (planner's shapes under each fitted law, 95%
                          bootstrap band), the runs, and the target's prediction with its interval; with
                          --compare, both variants' frontiers on one plot
  residuals.png           measured / predicted loss of every run against N and D
  curves.png              each run's training loss and learning rate against tokens (colour = budget)
  learning-rates.png      with learning-rate x batch grids: final loss against lr per grid, fitted eta_opt
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.units import format_count

FRONTIER_POINTS = 9
COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:gray",
          "tab:olive", "tab:cyan")  # one per variant, cycled


def slug(label: str) -> str:
    return "-" + re.sub(r"[^A-Za-z0-9._]+", "-", label).strip("-") if label else ""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Write `fig` to `path` atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    from scalelab.files import atomic_path

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)


def frontier(law, laws, design: dict[str, Any], label: str, budgets: np.ndarray, models=()) -> dict[str, np.ndarray]:
    """The planner's best predicted loss at each budget under `law` (exact FLOPs), and the bootstrap laws'
    2.5/97.5 percentiles at the same shapes."""
    from scalelab.scaling.search import search
    from scalelab.sweep.fit import search_space

    space, _ = search_space(design, label, models)
    N, D, L = [], [], []
    for c in budgets:
        best = search(float(c), law, space, top=1).best
        N.append(best["N"]), D.append(best["D"]), L.append(best["loss"])
    out = {"C": budgets, "N": np.array(N, float), "D": np.array(D, float), "loss": np.array(L)}
    if len(laws) >= 2:
        samples = np.array([[float(x.loss(n, d)) for n, d in zip(out["N"], out["D"])] for x in laws])
        out["lo"], out["hi"] = np.percentile(samples, [2.5, 97.5], axis=0)
    return out


def plot_frontier(result: dict[str, Any], design: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    target = result["budget"]
    budgets = np.geomspace(min(design["budgets"]) / 1.5, target * 1.5, FRONTIER_POINTS)
    for (label, r), col in zip(result["_results"].items(), itertools.cycle(COLORS)):
        fr = frontier(r["_law"], r["_laws"], design, label, budgets, r["_models"])
        name = label or "fitted law"
        ax.plot(fr["C"], fr["loss"], color=col, lw=2, label=f"{name}: best predicted loss (planner's shapes)")
        if "lo" in fr:
            ax.fill_between(fr["C"], fr["lo"], fr["hi"], color=col, alpha=0.18, lw=0, label=f"{name}: 95% bootstrap band")
        runs = r["_runs"]
        ax.scatter(runs.C, runs.loss, color=col, s=16, edgecolors="k", linewidths=0.3, alpha=0.8, zorder=3,
                   label=f"{name}: runs ({len(runs)})")
        rec = r["recommendation"]
        iv = rec.get("loss_interval_95")
        yerr = None if iv is None else [[rec["loss"] - iv[0]], [iv[1] - rec["loss"]]]
        ax.errorbar([rec["flops"]], [rec["loss"]], yerr=yerr, fmt="*", ms=14, color=col, mec="k", capsize=4,
                    zorder=4, label=f"{name}: C = {target:.3g}, {rec['name']}, loss {rec['loss']:.3f}")
    ax.set(xscale="log", xlabel="training compute C (exact FLOPs)", ylabel="loss (nats)",
           title="compute-optimal frontier and the extrapolated recommendation")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_residuals(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for (label, r), col in zip(result["_results"].items(), itertools.cycle(COLORS)):
        runs, law = r["_runs"], r["_law"]
        ratio = runs.loss / law.loss(runs.N, runs.D) - 1
        for ax, x, name in ((axes[0], runs.N, "parameters N"), (axes[1], runs.D, "tokens D")):
            ax.scatter(x, 100 * ratio, color=col, s=18, edgecolors="k", linewidths=0.3, label=label or None)
            ax.set(xscale="log", xlabel=name)
    for ax in axes:
        ax.axhline(0, color="0.4", lw=1)
        ax.grid(True, alpha=0.25)
    axes[0].set_ylabel("measured / predicted loss - 1 (%)")
    if len(result["_results"]) > 1:
        axes[0].legend(fontsize=8)
    fig.suptitle("Approach 3 residuals")
    fig.tight_layout()
    _save(fig, path)


def plot_curves(curves: dict[str, dict[str, Any]], path: Path) -> bool:
    """Training loss and learning rate against tokens for every run; False when no run logged a curve."""
    curves = {k: v for k, v in curves.items() if v["tokens"]}
    if not curves:
        return False
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    budgets = [v["budget"] for v in curves.values() if v.get("budget")]
    norm = LogNorm(min(budgets), max(budgets) * 1.0001) if budgets else None
    cmap = plt.get_cmap("viridis")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for v in curves.values():
        col = cmap(norm(v["budget"])) if norm is not None and v.get("budget") else "0.4"
        a1.plot(v["tokens"], v["loss"], color=col, lw=0.9, alpha=0.8)
        a2.plot(v["tokens"], v["lr"], color=col, lw=0.9, alpha=0.8)
    a1.set(xscale="log", xlabel="tokens", ylabel="training loss", title="training curves")
    a2.set(xscale="log", yscale="log", xlabel="tokens", ylabel="learning rate", title="learning-rate schedules")
    for ax in (a1, a2):
        ax.grid(True, which="both", alpha=0.25)
    if norm is not None:
        sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
        fig.colorbar(sm, ax=[a1, a2], label="budget C (FLOPs)", pad=0.01)
    _save(fig, path)
    return True


def plot_learning_rates(result: dict[str, Any], path: Path) -> bool:
    """Final loss against peak learning rate in each learning-rate x batch grid (the best batch at each lr),
    with the fitted eta_opt(C) marked; False when the sweep had no grids."""
    grids = [(label, g, r["_hp_law"]) for label, r in result["_results"].items() for g in r["_grids"]]
    if not grids:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(grids)))
    for (label, g, law), col in zip(grids, colors):
        lrs = np.unique(g.lr)
        best = [g.loss[g.lr == lr].min() for lr in lrs]
        c = float(np.exp(np.log(g.C).mean()))
        ax.plot(lrs, best, "o-", color=col, ms=4, label=f"{label + ', ' if label else ''}C = {c:.3g}")
        ax.axvline(law.lr(c), color=col, ls="--", lw=1)
    ax.set(xscale="log", xlabel="peak learning rate", ylabel="final loss (best batch at each lr)",
           title="learning-rate curves of the grids (dashed: fitted eta_opt(C))")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return True


def write_plots(out_dir: Path, result: dict[str, Any], design: dict[str, Any]) -> list[str]:
    """Every PNG of the report into OUT_DIR; their file names."""
    from scalelab.scaling import fit as F

    names = []
    for label, r in result["_results"].items():
        runs = r["_runs"]
        if "_isoflop" in r:
            name = f"isoflop{slug(label)}.png"
            F.plot_isoflop(runs, r["_isoflop"], out_dir / name)
            names.append(name)
        name = f"surface{slug(label)}.png"
        F.plot_approach3(runs, r["_fit3"], out_dir / name, budget=result["budget"])
        names.append(name)
    plot_frontier(result, design, out_dir / "frontier.png")
    plot_residuals(result, out_dir / "residuals.png")
    names += ["frontier.png", "residuals.png"]
    if plot_curves(result["_curves"], out_dir / "curves.png"):
        names.append("curves.png")
    if plot_learning_rates(result, out_dir / "learning-rates.png"):
        names.append("learning-rates.png")
    return names


def _interval(values) -> str:
    return "n/a (no bootstrap)" if values is None else f"{values[0]:.4f} .. {values[1]:.4f}"


def _pm(a3: dict[str, Any], key: str, fmt: str) -> str:
    text = format(a3[key], fmt)
    se = a3.get("bootstrap", {}).get("stderr", {}).get(key)
    return text + (f" ± {format(se, fmt)}" if se is not None else "")


def report_markdown(result: dict[str, Any], design: dict[str, Any], images: list[str]) -> str:
    target = result["budget"]
    lines = [f"# Sweep fit: {design.get('method', '?')} sweep, budgets "
             f"{', '.join(f'{b:.3g}' for b in result['budgets'])} FLOPs", ""]
    rec = result["recommendation"]
    hp = rec["hyperparameters"]
    lines += ["## Recommendation", "",
              f"At **C = {target:.3g} FLOPs** ({target / result['largest_budget']:.3g}x the largest budget): "
              f"**{rec['name']}** ({rec['n_layer']} layer{'s' if rec['n_layer'] > 1 else ''} x {rec['n_embd']} wide, {rec['n_head']} heads, "
              f"{rec['num_key_value_heads']} KV heads), N = {format_count(rec['N'])} parameters, "
              f"D = {format_count(rec['D'])} tokens ({rec['tokens_per_param']:.1f} tokens/param), "
              f"predicted loss **{rec['loss']:.4f}** (95% prediction interval {_interval(rec.get('loss_interval_95'))}).",
              "",
              f"Hyperparameters ({hp['law']}, C in its `{hp['compute_convention']}` convention): peak lr "
              f"{hp['peak_lr']:.3g}, min lr {hp['min_lr']:.3g}, batch {hp['batch_tokens']:,} tokens, warmup "
              f"{hp['warmup']:g} steps, {hp['schedule']} schedule, {rec['steps']:,} steps.", ""]
    if "comparison" in result:
        c = result["comparison"]
        lines += ["## A/B", "", f"**{c['verdict']}**", "",
                  "| variant | predicted loss at the target | 95% interval (law) |", "|---|---|---|"]
        for label in c["variants"]:
            r = result["variants"][label]["recommendation"]
            lines.append(f"| {label} | {r['loss']:.4f} | {_interval(r.get('law_loss_interval_95'))} |")
        lines.append("")
    lines += ["## Fits", ""]
    for label, v in result["variants"].items():
        a3, a2 = v["approach3"], v["approach2"]
        head = f"### {label}" if label else "### Laws"
        lines += [head, "",
                  f"Approach 3 on {v['runs']} runs: L = {_pm(a3, 'E', '.3f')} + {_pm(a3, 'A', '.4g')} / N^"
                  f"{_pm(a3, 'alpha', '.3f')} + {_pm(a3, 'B', '.4g')} / D^{_pm(a3, 'beta', '.3f')}; "
                  f"N_opt ∝ C^{_pm(a3, 'N_opt_exponent', '.3f')}, D_opt ∝ C^{_pm(a3, 'D_opt_exponent', '.3f')}; "
                  f"residual rms {100 * a3['residual_rms']:.2f}%.", ""]
        if "error" in a2:
            lines += [f"Approach 2: not fitted ({a2['error']}).", ""]
        else:
            def se(x):
                return f" ± {x['exponent_stderr']:.3f}" if x.get("exponent_stderr") is not None else ""
            at = a2["at_budget"]
            lines += [f"Approach 2 ({len(a2['budgets'])} budgets): N_opt ∝ C^{a2['N_opt']['exponent']:.3f}"
                      f"{se(a2['N_opt'])}, D_opt ∝ C^{a2['D_opt']['exponent']:.3f}{se(a2['D_opt'])}; at the target "
                      f"N_opt {format_count(at['N_opt'])}, D_opt {format_count(at['D_opt'])} "
                      f"(Approach 3's planner: N {format_count(v['recommendation']['N'])}, "
                      f"D {format_count(v['recommendation']['D'])})."]
            lines += [f"Approach 2 skipped C = {p['C']:.3g} ({p['runs']} runs): {p['why']}." for p in a2["skipped"]]
            lines.append("")
        h = v["hyperparameter_law"]
        origin = "fitted to the learning-rate x batch grids" if h["fitted"] else "the design's, not fitted"
        lr = (f"lr = {h['base_lr']:g} x {h['base_width']} / n_embd" if h.get("kind") == "width" else
              f"eta_opt = {h['lr']['coef']:.4g} C^{h['lr']['exponent']:.4f}")
        lines += [f"Hyperparameter law ({origin}; C = {h['compute']} FLOPs): {lr}, "
                  f"B_opt = {h['batch_tokens']['coef']:.4g} C^{h['batch_tokens']['exponent']:.4f} tokens.", ""]
    lines += ["## Warnings", ""]
    lines += [f"- {w}" for w in result["warnings"]] or ["- none"]
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, result: dict[str, Any], design: dict[str, Any]) -> list[str]:
    """The PNGs and OUT_DIR/report.md; the files written."""
    from scalelab.files import atomic_write_text
    from scalelab.sweep.fit import REPORT_FILE

    images = write_plots(out_dir, result, design)
    atomic_write_text(out_dir / REPORT_FILE, report_markdown(result, design, images))
    return [*images, REPORT_FILE]
