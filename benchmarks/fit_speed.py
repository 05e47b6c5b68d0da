"""Wall time of `fit_approach3` vs the classic 4500-start L-BFGS grid on Chinchilla's Figure 4
data (Epoch AI's digitisation; drop the 5 highest-loss runs, D = C/6N, Huber delta 1e-3), in
the same run, with both objective values and the ratio.

The classic grid (alpha, beta ∈ {0, .5, .., 2}, e ∈ {-1, -.5, .., 1}, a, b ∈ {0, 5, .., 25})
runs L-BFGS-B with finite-difference gradients and scipy's default tolerances from every start,
as Epoch AI's replication does; --workers splits the starts over processes (default: all cores).

    .venv/bin/python benchmarks/fit_speed.py                # full grid, minutes
    .venv/bin/python benchmarks/fit_speed.py --every 10     # every 10th start, a quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# one BLAS thread per process: with --workers processes, threaded BLAS oversubscribes the
# cores (spinning threads made the grid 10x slower on 2 cores)
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from scalelab.scaling import fit as F  # noqa: E402

DATA = ROOT / "tests" / "data" / "chinchilla_fig4.csv"


def load() -> F.Runs:
    return F.drop_highest_loss(F.read_table(DATA, tokens_from_flops=True), 5)


def _grid_chunk(starts: np.ndarray) -> tuple[float, list[float], float]:
    t0 = time.process_time()
    f = F.fit_classic_grid(load(), starts=starts)
    return f.objective, f.x.tolist(), time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=int, default=1, help="use every k-th classic start (1 = all 4500)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for the classic grid")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats of our fit (best is reported)")
    args = ap.parse_args()

    runs = load()
    F.fit_approach3(runs)  # warm-up: scipy's lazy imports, numpy caches
    times, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        ours = F.fit_approach3(runs)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    t_ours, cpu_ours = min(times), min(cpu)

    starts = F.classic_grid_starts()[:: args.every]
    chunks = np.array_split(starts, max(args.workers, 1) * 8)
    t0 = time.perf_counter()
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            results = list(pool.map(_grid_chunk, chunks))
    else:
        results = [_grid_chunk(c) for c in chunks]
    t_grid = time.perf_counter() - t0
    grid_obj, grid_x, _ = min(results, key=lambda r: r[0])
    cpu_grid = sum(r[2] for r in results)
    grid = F.law_from_x(grid_x)

    print(f"data: {DATA.name}, {len(runs)} runs (5 highest-loss dropped), Huber delta {F.HUBER_DELTA}")
    print(f"{'':14s} {'wall (s)':>10s} {'CPU (s)':>9s} {'objective':>22s} {'E':>8s} {'A':>9s} {'B':>9s} {'alpha':>7s} {'beta':>7s}")
    for name, t, c, obj, law in (("approach3", t_ours, cpu_ours, ours.objective, ours.law),
                                 ("classic grid", t_grid, cpu_grid, grid_obj, grid)):
        print(f"{name:14s} {t:10.3f} {c:9.3f} {obj:22.15g} {law.E:8.4f} {law.A:9.2f} {law.B:9.2f} "
              f"{law.alpha:7.4f} {law.beta:7.4f}")
    print(f"classic grid: {len(starts)} starts on {args.workers} worker(s); approach3: 1 process, best of "
          f"{args.repeats}")
    print(f"speed ratio (classic / approach3): wall {t_grid / t_ours:.0f}x, CPU {cpu_grid / cpu_ours:.0f}x "
          f"(CPU time is the steadier number on a shared machine)")
    print(f"objective difference (approach3 - classic): {ours.objective - grid_obj:+.3e} "
          f"({'approach3 no worse' if ours.objective <= grid_obj + 1e-15 else 'CLASSIC BETTER'})")


if __name__ == "__main__":
    main()
