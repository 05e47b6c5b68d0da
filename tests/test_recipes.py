"""The 70B and 405B recipes: each loads with the trainer's own loader, resolves to the layout its
comments describe, and carries a memory and time table that `scalelab count` computes (this test
recomputes it and fails when it goes stale). Regenerate with `python tests/test_recipes.py`."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# recipe -> the setups its table shows (GPUs, accelerator)
RECIPES = {
    "llama3.1-70b.toml": [(64, "H100"), (256, "H100"), (1024, "H100")],
    "llama3.1-405b.toml": [(8192, "H100"), (16384, "H100")],
}


def recipe_rows(path: Path) -> list[str]:
    """The comment block between BEGIN COUNT and END COUNT: per setup, the config as written and
    the same without activation checkpointing, by count_report (what `scalelab count FILE --gpus N
    --gpu-type H100 --mfu auto --tokens D` prints)."""
    from scalelab.cli.count import count_report
    from scalelab.train.config import layout_of, load_config
    from scalelab.units import format_bytes, format_count

    cfg = load_config(path)
    t = cfg.train
    tokens = float(t.max_tokens)
    lines = [f"N = {format_count(_params(cfg.model))} parameters, trained on {format_count(tokens)} tokens at "
             f"sequence {t.seq_len}, {t.global_batch_tokens:,} tokens per step "
             "(step time and MFU: scalelab.steptime)",
             f"{'setup':<18}| {'layout':<36}| {'checkpointing':<14}| {'memory/GPU':<24}| {'step':>7} | "
             f"{'tokens/s/GPU':>12} | {'MFU':>5} | time"]
    for gpus, gpu_type in RECIPES[path.name]:
        layout = layout_of(cfg, gpus)
        for ac in (t.activation_checkpointing, False):
            r = count_report(cfg.model, seq_len=t.seq_len, micro_batch=t.micro_batch_size, gpus=gpus,
                             gpu_type=gpu_type, mfu="auto", tokens=tokens, layout=layout,
                             activation_checkpointing=ac, global_batch_tokens=t.global_batch_tokens,
                             loss_chunk_tokens=t.loss_chunk_tokens)
            m, p, time = r["memory"], r["time"]["predicted"], r["time"]
            fits = "fits" if m["fits"] else "NO FIT"
            memory = f"{format_bytes(m['total'])} of {r['accelerator']['memory_bytes'] / 2**30:g} {fits}"
            mode = ("full" if ac else "none") + (" (config)" if ac == t.activation_checkpointing else "")
            lines.append(f"{gpus:>6} x {r['accelerator']['name']:<9}| {r['layout']['describe']:<36}| {mode:<14}| "
                         f"{memory:<24}| {p['step_seconds']:>6.1f}s | {p['tokens_per_second_per_device']:>12,.0f} | "
                         f"{p['mfu']:>5.1%} | {time['days']:,.0f} days")
    return lines


def _params(model_cfg) -> int:
    from scalelab.counting import count_params

    return count_params(model_cfg).total


def block_in(path: Path) -> list[str]:
    text = path.read_text()
    m = re.search(r"# BEGIN COUNT\n(.*?)# END COUNT\n", text, re.S)
    assert m, f"{path} has no BEGIN COUNT / END COUNT block"
    return [line[2:] for line in m.group(1).splitlines()]


def write_block(path: Path) -> None:
    text = path.read_text()
    block = "".join(f"# {line}\n" for line in recipe_rows(path))
    path.write_text(re.sub(r"# BEGIN COUNT\n.*?# END COUNT\n", lambda _: f"# BEGIN COUNT\n{block}# END COUNT\n",
                           text, flags=re.S))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_tables_are_what_count_computes(name):
    path = ROOT / "configs" / name
    assert block_in(path) == recipe_rows(path), f"stale table in {path}: run `python tests/test_recipes.py`"


def test_recipes_are_the_layouts_they_describe():
    from scalelab.train.config import layout_of, load_config

    big = load_config(ROOT / "configs" / "llama3.1-70b.toml")
    assert (big.model.n_layer, big.model.n_embd) == (80, 8192)
    lay = layout_of(big, 64)
    assert (lay.tp, lay.dp_shard, lay.pp) == (8, 8, 1)
    huge = load_config(ROOT / "configs" / "llama3.1-405b.toml")
    lay = layout_of(huge, 16384)
    assert (lay.tp, lay.pp, lay.dp) == (8, 16, 128)  # the Llama 3 paper's TP 8 x PP 16 x DP 128
    assert (huge.train.seq_len, huge.train.global_batch_tokens) == (8192, 16 * 2**20)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    for recipe in RECIPES:
        write_block(ROOT / "configs" / recipe)
        print(f"wrote the table of configs/{recipe}")


def test_count_reads_the_recipes_layout_batch_and_checkpointing(cli):
    """`scalelab count FILE` takes [parallel]'s layout keys, [train] global_batch_tokens, micro-batch and
    checkpointing from the recipe: the same figures as its table's first row."""
    import json

    path = ROOT / "configs" / "llama3.1-405b.toml"
    out = json.loads(cli("count", str(path), "--gpus", "16384", "--gpu-type", "H100", "--mfu", "auto", "--json").stdout)
    lay = out["layout"]
    assert (lay["tp"], lay["pp"], lay["dp_shard"], lay["pp_microbatches"], lay["global_batch_tokens"]) == (
        8, 16, 128, 16, 16 * 2**20)
    row = next(line for line in block_in(path) if line.lstrip().startswith("16384") and "(config)" in line)
    assert f"{out['time']['predicted']['mfu']:.1%}" in row and row.count("fits") == 1
