"""How fast is the planner's vectorised search against a plain Python loop over the same space?

The loop is the obvious implementation: for each shape build a ModelConfig, count its parameters
and exact training FLOPs per token with the scalar counting functions, solve D = C / FLOPs, score
the law, keep the best. Both must find the same best shape (checked). Prints times and the ratio.

    .venv/bin/python benchmarks/plan_speed.py            # default space, 50K and 1M-shape spaces
    .venv/bin/python benchmarks/plan_speed.py --quick    # default space only

For the 1M-shape space the loop is timed on a random sample of shapes and extrapolated (the full
loop would take minutes); that row says so.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time

from scalelab import counting
from scalelab.errors import UserError
from scalelab.presets import STYLES, style_config
from scalelab.scaling.laws import LAWS
from scalelab.scaling.search import DEFAULT_HIDDEN, DEFAULT_LAYERS, SearchSpace, search


def shapes_of(sp: SearchSpace):
    kvs = [None] if sp.mha else list(sp.kv_heads or [STYLES[sp.style].get("num_key_value_heads")])
    for h in sorted(set(sp.hidden)):
        for n_layer in sorted(set(sp.layers)):
            for hd in sorted(set(sp.head_dims)):
                for kv in kvs:
                    yield h, n_layer, hd, kv


def python_loop(C, law, sp: SearchSpace, shapes):
    best = None
    ratio = sp.ffn_ratio or STYLES[sp.style]["ffn_expansion_ratio"]
    for h, n_layer, hd, kv in shapes:
        if h % hd:
            continue
        n_head = h // hd
        try:
            cfg = style_config(sp.style, n_layer, h, n_head, num_key_value_heads=kv or n_head,
                               ffn_expansion_ratio=ratio, block_size=sp.seq_len)
        except UserError:
            continue
        if sp.aspect and not sp.aspect[0] <= h / n_layer <= sp.aspect[1]:
            continue
        N = counting.count_params(cfg).total
        D = C / counting.training_flops_per_token(cfg, sp.seq_len)
        if D < sp.seq_len:
            continue
        loss = law.E + law.A / N ** law.alpha + law.B / D ** law.beta
        if best is None or loss < best[0]:
            best = (loss, n_layer, h, n_head)
    return best


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    C, law = 1.36e21, LAWS["chinchilla"]
    # the default ranges given explicitly: at this budget they do not grow, and the loop needs them
    spaces = [("default (llama3, GQA8)", SearchSpace(hidden=DEFAULT_HIDDEN, layers=DEFAULT_LAYERS), None)]
    if not args.quick:
        spaces.append(("50K shapes (MHA)", SearchSpace(hidden=tuple(range(256, 16384 + 1, 128)),
                                                        layers=tuple(range(1, 200 + 1)), head_dims=(64, 128),
                                                        mha=True, aspect=None), None))
        spaces.append(("1M shapes (MHA)", SearchSpace(hidden=tuple(range(128, 65536 + 1, 128)),
                                                       layers=tuple(range(1, 1000 + 1)), head_dims=(64, 128),
                                                       mha=True, aspect=None), 20_000))
    print(f"C = {C:g}, law chinchilla; times are the best of 3 for the search, 1 for the loop")
    print(f"{'space':<24} {'shapes':>10} {'vectorised':>11} {'python loop':>13} {'ratio':>8}  same best")
    for name, sp, sample in spaces:
        t_vec, result = timed(lambda: search(C, law, sp), repeat=3)
        shapes = list(shapes_of(sp))
        if sample:
            rng = random.Random(0)
            subset = rng.sample(shapes, sample)
            t_sub, _ = timed(lambda: python_loop(C, law, sp, subset))
            t_loop, same, note = t_sub * len(shapes) / sample, "n/a", f" (extrapolated from {sample:,})"
        else:
            t_loop, best = timed(lambda: python_loop(C, law, sp, shapes))
            b = result.best
            same = "yes" if best[1:] == (b["n_layer"], b["n_embd"], b["n_head"]) else f"NO: {best} vs {b['name']}"
            note = ""
        print(f"{name:<24} {len(shapes):>10,} {t_vec * 1e3:>9.1f}ms {t_loop:>12.2f}s {t_loop / t_vec:>7.0f}x  "
              f"{same}{note}")
    cmd = [sys.executable, "-m", "scalelab", "plan", "1.36e21"]
    t_cli, _ = timed(lambda: subprocess.run(cmd, capture_output=True, check=True), repeat=3)
    print(f"\n`scalelab plan 1.36e21` end to end (process start-up, imports, search, print): {t_cli:.2f} s")


if __name__ == "__main__":
    main()
