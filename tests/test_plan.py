"""The planner (`scalelab plan`, scaling/search.py) against independent truths: a plain Python
loop over ModelConfigs with the scalar counting functions, the counting module's FLOPs, the 6ND
closed form bounded by the FLOPs convention, and the CLI's contracts."""

from __future__ import annotations

import json
import math
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import heavy_modules_loaded

from scalelab import counting
from scalelab.config import ModelConfig
from scalelab.errors import UserError
from scalelab.hardware import get_accelerator
from scalelab.presets import STYLES, resolve_model_section, style_config
from scalelab.scaling.laws import LAWS
from scalelab.scaling.search import SearchSpace, search

CHIN = LAWS["chinchilla"]


def brute_force(C, law, sp: SearchSpace):
    """The search written as the obvious loop: build every ModelConfig, count it, solve D, score."""
    style = STYLES[sp.style]
    ratio = sp.ffn_ratio or style.get("ffn_expansion_ratio")
    vocab = sp.vocab_size or style["vocab_size"]
    kvs = [None] if sp.mha else (sp.kv_heads or [style.get("num_key_value_heads")])
    best, skipped = None, 0
    for h in sorted(set(sp.hidden)):
        for n_layer in sorted(set(sp.layers)):
            for hd in sorted(set(sp.head_dims)):
                for kv in sorted(set(kvs), key=lambda k: k or 0):
                    if h % hd:
                        skipped += 1
                        continue
                    n_head = h // hd
                    try:
                        cfg = style_config(sp.style, n_layer, h, n_head, num_key_value_heads=kv or n_head,
                                           ffn_expansion_ratio=ratio, vocab_size=vocab, block_size=sp.seq_len)
                    except UserError:
                        skipped += 1
                        continue
                    N = counting.count_params(cfg).total
                    D = C / counting.training_flops_per_token(cfg, sp.seq_len)
                    ok = D >= sp.seq_len
                    if sp.aspect is not None:
                        ok &= sp.aspect[0] <= h / n_layer <= sp.aspect[1]
                    if sp.max_tokens is not None:
                        ok &= D <= sp.max_tokens
                    if sp.max_params is not None:
                        ok &= N <= sp.max_params
                    if sp.enforce_chinchilla:
                        r = sp.tokens_per_param
                        ok &= r * (1 - sp.tolerance) <= D / N <= r * (1 + sp.tolerance)
                    if sp.accelerator is not None:
                        # FSDP over several GPUs; one GPU trains unsharded (under autocast)
                        mem = counting.training_memory(cfg, micro_batch=1, seq_len=sp.seq_len, num_devices=sp.gpus,
                                                       sharding="fsdp" if sp.gpus > 1 else "none",
                                                       activation_checkpointing=True)["total"]
                        ok &= mem <= sp.accelerator.memory_bytes
                    if not ok:
                        continue
                    loss = law.E + law.A / N ** law.alpha + law.B / D ** law.beta
                    if best is None or loss < best[0]:
                        best = (loss, n_layer, h, n_head, cfg.num_key_value_heads, N, D)
    return best, skipped


SMALL = dict(hidden=tuple(range(512, 4096 + 1, 128)), layers=tuple(range(4, 40 + 1, 2)))
SPACES = [
    SearchSpace(**SMALL),
    SearchSpace(**SMALL, mha=True, style="llama2"),
    SearchSpace(**SMALL, style="gpt2", head_dims=(64, 80, 128), seq_len=1024, aspect=None),
    SearchSpace(**SMALL, kv_heads=(1, 2, 4, 8), head_dims=(64, 96, 128), max_tokens=3e10, max_params=1.5e9),
    SearchSpace(**SMALL, enforce_chinchilla=True, tolerance=0.3, ffn_ratio=3.0, vocab_size=50000),
    SearchSpace(**SMALL, accelerator=get_accelerator("A6000"), gpus=1, aspect=(20, 300)),
]


# Three budgets per space, each one the space can spend (the "limits" space tops out near 2.7e20
# FLOPs: 1.5e9 parameters on at most 3e10 tokens; the Chinchilla band near 1.1e22), so every case
# compares two answers; budgets past a space's limits are tested below.
BUDGETS = {"llama3": (3e19, 1e21, 2e22), "llama2-mha": (3e19, 1e21, 2e22), "gpt2": (3e19, 1e21, 2e22),
           "limits": (3e19, 1e20, 2.5e20), "chinchilla": (3e19, 1e21, 1e22), "memory": (3e19, 1e21, 2e22)}
CASES = [(space, C, name) for space, name in zip(SPACES, BUDGETS) for C in BUDGETS[name]]


@pytest.mark.parametrize("space, C", [(sp, C) for sp, C, _ in CASES], ids=[f"{n}-{C:g}" for _, C, n in CASES])
def test_search_equals_brute_force(space, C):
    law = LAWS["epoch"] if space.style == "gpt2" else CHIN
    result = search(C, law, space, top=5)
    (loss, n_layer, h, n_head, kv, N, D), skipped = brute_force(C, law, space)
    b = result.best
    assert (b["n_layer"], b["n_embd"], b["n_head"], b["num_key_value_heads"]) == (n_layer, h, n_head, kv)
    assert b["loss"] == pytest.approx(loss, rel=1e-12)
    assert b["N"] == N and b["D"] == pytest.approx(D, rel=1e-12)
    assert result.search["skipped_total"] == skipped
    losses = [r["loss"] for r in result.top]
    assert losses == sorted(losses)


@pytest.mark.parametrize("space, C", [(SPACES[3], 1e21), (SPACES[3], 2e22), (SPACES[4], 2e22)],
                         ids=["limits-1e21", "limits-2e22", "chinchilla-2e22"])
def test_budget_past_the_limits_names_the_largest_that_works(space, C):
    """Past what the space can spend, the search refuses and names the largest budget that has a shape:
    the brute-force loop finds a shape just below that budget and none just above it."""
    with pytest.raises(UserError, match="the largest budget that has one is") as e:
        search(C, CHIN, space)
    largest = float(str(e.value).split("the largest budget that has one is ")[1].split()[0])
    assert brute_force(largest * 0.99, CHIN, space)[0] is not None  # printed to 3 digits
    assert brute_force(largest * 1.01, CHIN, space)[0] is None


@pytest.mark.parametrize("C", [1e20, 1.36e21, 7.7e22])
def test_best_spends_exactly_C(C):
    b = search(C, CHIN).best
    cfg = ModelConfig.from_dict(b["config"])
    assert counting.count_params(cfg).total == b["N"]
    per_token = counting.training_flops_per_token(cfg, b["seq_len"])
    assert abs(per_token * b["D"] - C) <= 1e-6 * C
    # rounded to whole sequences: never over budget, short by less than one sequence
    spent = counting.training_flops(cfg, b["sequences"], b["seq_len"])
    assert b["D_rounded"] == b["sequences"] * b["seq_len"]
    assert C - per_token * b["seq_len"] < spent <= C


def test_head_rule_never_emits_invalid_shapes():
    sp = SearchSpace(hidden=tuple(range(1024, 4096 + 1, 256)), layers=(16, 24), kv_heads=(3, 8))
    result = search(1e21, CHIN, sp, top=50)
    for r in result.top:
        assert r["n_head"] * r["head_dim"] == r["n_embd"] and r["n_head"] % r["num_key_value_heads"] == 0
    # the seed's 1792 x 14 heads with 8 KV heads is exactly the kind of shape that is skipped
    assert all(not (r["n_embd"] == 1792 and r["num_key_value_heads"] == 8) for r in result.top)
    assert result.search["skipped_total"] == brute_force(1e21, CHIN, sp)[1]


# ---- grid vs closed form ------------------------------------------------------------------
# Every shape costs k·N training FLOPs per token with k = fpt/N (counting module, per shape).
# Spending C at k·N per token is the 6ND problem at budget 6C/k, so for ANY shape
#     loss(N, C/(k·N)) >= closed_form(6C/k).loss >= closed_form(6C/k_min).loss,
# with k_min the smallest k in the space. The grid may beat the 6ND closed form only by what
# k < 6 buys (the embedding lookup is no matmul), never more. A search that mis-solved D (6N,
# forward-only FLOPs, a wrong seq_len, a dropped attention term) breaks these bounds. Where k is
# nearly flat in N (C >= 3e21 here) the grid also comes within 1e-3 of closed_form(6C/k_best):
# what is left is discreteness. Below that, k falls with N (embeddings dominate) and the grid
# rightly picks smaller models than any fixed-k closed form.
DENSE = SearchSpace(hidden=tuple(range(256, 8192 + 1, 128)), layers=tuple(range(2, 80 + 1, 1)),
                    head_dims=(64,), kv_heads=(1, 2, 4), aspect=(40, 130))


def _k_min(sp):
    """Smallest fpt/N over every aspect-allowed shape, from ModelConfig + scalar counting."""
    k_min = math.inf
    for h in sp.hidden:
        for n_layer in sp.layers:
            if not sp.aspect[0] <= h / n_layer <= sp.aspect[1]:
                continue
            for kv in sp.kv_heads:
                if (h // 64) % kv:
                    continue
                cfg = style_config("llama3", n_layer, h, h // 64, num_key_value_heads=kv, block_size=sp.seq_len)
                k = counting.training_flops_per_token(cfg, sp.seq_len) / counting.count_params(cfg).total
                k_min = min(k_min, k)
    return k_min


K_MIN_DENSE = _k_min(DENSE)


@settings(max_examples=30, deadline=None)
@given(log_c=st.floats(19.0, 24.0), law=st.sampled_from(["chinchilla", "epoch"]))
def test_grid_is_bounded_by_the_closed_form(log_c, law):
    law = LAWS[law]
    C = 10.0 ** log_c
    b = search(C, law, DENSE).best
    k = b["flops_per_param_per_token"]
    assert k >= K_MIN_DENSE
    assert law.loss(b["N"], b["D"]) == pytest.approx(b["loss"], rel=1e-12)
    assert b["loss"] >= law.closed_form(6 * C / K_MIN_DENSE)["loss"] - 1e-12
    at_own_k = law.closed_form(6 * C / k)["loss"]
    assert b["loss"] >= at_own_k - 1e-12
    if 10 ** 21.5 <= C <= 1e23:  # k flat in N here (observed gap <= 1e-4)
        assert b["loss"] <= at_own_k + 1e-3


def test_closed_form_gap_is_explained_by_k_at_the_example():
    """At 1.36e21 on the default llama3 space the grid beats 6ND because k < 6 (the 128K-vocabulary
    input embedding is parameters without matmul FLOPs), and by no more than k_min allows."""
    C = 1.36e21
    result = search(C, CHIN)
    b, cf = result.best, result.closed_form
    cfg = ModelConfig.from_dict(b["config"])
    k = counting.training_flops_per_token(cfg, 2048) / counting.count_params(cfg).total
    assert k == pytest.approx(b["flops_per_param_per_token"], rel=1e-12) and k < 6
    assert b["loss"] < cf["loss"]
    k_space = C / (result.curve["D"] * result.curve["N"])
    assert CHIN.closed_form(6 * C / k_space.min())["loss"] <= b["loss"]
    assert cf["adjusted_for_k"]["loss"] <= b["loss"] < cf["adjusted_for_k"]["loss"] + 1e-3


def test_larger_budget_gives_larger_model_and_more_tokens():
    sp = SearchSpace(hidden=tuple(range(256, 8192 + 1, 128)), layers=tuple(range(4, 80 + 1, 2)))
    bests = [search(c, CHIN, sp).best for c in (1e19, 1e20, 1e21, 1e22, 1e23)]
    for a, b in zip(bests, bests[1:]):
        assert b["N"] > a["N"] and b["D"] > a["D"]


# ---- the CLI ------------------------------------------------------------------------------


def plan_json(cli, *args):
    r = cli("plan", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_json_shape_and_default_gqa(cli):
    out = plan_json(cli, "1.36e21", "--top", "4")
    assert set(out) == {"best", "top", "closed_form", "search"}
    keys = {"n_layer", "n_embd", "n_head", "num_key_value_heads", "d_ff", "vocab_size", "seq_len", "N", "D", "C",
            "loss"}
    assert len(out["top"]) == 4
    for row in [out["best"], *out["top"]]:
        assert keys <= set(row)
        assert row["num_key_value_heads"] == 8 and row["vocab_size"] == 128256 and row["seq_len"] == 2048
        assert row["d_ff"] == 3.5 * row["n_embd"]
    assert out["best"]["n_layer"] == out["top"][0]["n_layer"]
    assert out["closed_form"]["N"] == pytest.approx(CHIN.closed_form(1.36e21)["N"])
    assert out["search"]["skipped_total"] > 0 and out["search"]["feasible"] > 0


def test_no_gqa_gives_mha(cli):
    out = plan_json(cli, "1e21", "--no-gqa", "--top", "20")
    assert all(r["num_key_value_heads"] == r["n_head"] for r in out["top"])


def test_enforce_chinchilla_ratio(cli):
    out = plan_json(cli, "1e22", "--enforce-chinchilla", "--top", "20")
    assert all(10 <= r["tokens_per_param"] <= 30 for r in out["top"])
    out = plan_json(cli, "1e22", "--enforce-chinchilla", "--tokens-per-param", "40", "--tolerance", "0.1")
    assert all(36 <= r["tokens_per_param"] <= 44 for r in out["top"])
    free = plan_json(cli, "1e22")["best"]
    assert not 36 <= free["tokens_per_param"] <= 44  # so the constraint did something


def test_hardware_budget_and_wall_clock(cli):
    out = plan_json(cli, "--gpus", "8", "--gpu-type", "H100", "--hours", "24", "--mfu", "0.4")
    C = 8 * 989e12 * 0.4 * 24 * 3600
    assert out["search"]["C"] == pytest.approx(C, rel=1e-12)
    # the plan spends the budget at the same MFU, so it takes the hours we gave (less the rounding)
    assert out["best"]["wall_clock"]["hours"] == pytest.approx(24, rel=1e-6)


def test_memory_filter_changes_the_answer_only_by_excluding_what_does_not_fit(cli):
    """One A6000 (48 GiB) at 1e22: the unfiltered best needs more than 48 GiB when counted on its own
    (counting.training_memory of its ModelConfig, one GPU, micro-batch 1, activation checkpointing, and
    the gradient accumulation of the emitted global batch: thousands of micro-batches, whose accumulated
    gradients are live through every later one); the filtered best fits, by the same count, and is the
    unfiltered ranking's best shape that fits."""
    free = plan_json(cli, "1e22", "--top", "200")
    fit = plan_json(cli, "1e22", "--gpus", "1", "--gpu-type", "A6000")["best"]
    assert fit["grad_accum_steps"] > 1

    def memory(row):
        cfg = style_config("llama3", row["n_layer"], row["n_embd"], row["n_head"],
                           num_key_value_heads=row["num_key_value_heads"], block_size=2048)
        return counting.training_memory(cfg, micro_batch=1, seq_len=2048, num_devices=1, sharding="none",
                                        activation_checkpointing=True, grad_accum_steps=fit["grad_accum_steps"])["total"]

    assert memory(free["best"]) > 48 * 2**30
    assert memory(fit) <= 48 * 2**30 and memory(fit) == fit["memory_per_gpu_bytes"]
    first_that_fits = next(r for r in free["top"] if memory(r) <= 48 * 2**30)
    assert (fit["n_layer"], fit["n_embd"], fit["n_head"]) == \
        (first_that_fits["n_layer"], first_that_fits["n_embd"], first_that_fits["n_head"])


def test_layout_auto_keeps_a_shape_that_only_tensor_or_pipeline_parallelism_fits(cli, tmp_path):
    """8 x A100-40GB, 2e23 FLOPs at 4096 tokens. The compute-optimal shape that fits in some layout,
    42L x 5120H, needs more than 40 GiB under FSDP over all 8 GPUs at micro-batch 1 with full
    checkpointing and the emitted batch's gradient accumulation (counting.training_memory, the plan's
    filter without --layout auto), so the filter that assumed FSDP dropped it and the plan settled for
    40L x 5120H. With --layout auto the plan keeps it, with a layout that has tp or pp, and the config
    it writes counts (`scalelab count FILE`) to the plan's figure, within the card. Without --layout
    auto the plan is what it was."""
    gib40 = get_accelerator("A100-40GB").memory_bytes
    args = ["2e23", "--gpus", "8", "--gpu-type", "A100-40GB", "--seq-len", "4096"]

    def fsdp_over_all(row, accum):
        cfg = style_config("llama3", row["n_layer"], row["n_embd"], row["n_head"],
                           num_key_value_heads=row["num_key_value_heads"], block_size=4096)
        return counting.training_memory(cfg, micro_batch=1, seq_len=4096, num_devices=8, sharding="fsdp",
                                        activation_checkpointing=True, grad_accum_steps=accum)["total"]

    plain = plan_json(cli, *args)["best"]
    assert (plain["n_layer"], plain["n_embd"]) == (40, 5120) and plain["grad_accum_steps"] > 1
    assert plain["memory_per_gpu_bytes"] == fsdp_over_all(plain, plain["grad_accum_steps"]) <= gib40
    path = tmp_path / "plan.toml"
    auto = plan_json(cli, *args, "--layout", "auto", "--emit-config", str(path))["best"]
    assert (auto["n_layer"], auto["n_embd"]) == (42, 5120) and auto["loss"] < plain["loss"]
    assert fsdp_over_all(auto, plain["grad_accum_steps"]) > gib40
    chosen = auto["layout"]["layout"]
    assert chosen["tp"] > 1 or chosen["pp"] > 1
    r = cli("count", str(path), "--gpus", "8", "--gpu-type", "A100-40GB", "--json")
    assert r.returncode == 0, r.stderr
    counted = json.loads(r.stdout)["memory"]
    assert counted["total"] == auto["memory_per_gpu_bytes"] <= gib40


@pytest.mark.parametrize("gpus", [8, 64])
def test_layout_memory_floor_is_below_every_layout_the_search_considers(gpus):
    """The cheap filter of --layout auto never drops a shape some layout fits: its floor is at most the
    memory of every (layout, micro-batch, checkpointing) the layout search costs, by brute force."""
    from scalelab import layout_search
    from scalelab.scaling.search import layout_global_batch, layout_memory_floor

    acc = get_accelerator("H100")
    for n_layer, n_embd, n_head in ((16, 2048, 16), (40, 5120, 40)):
        cfg = style_config("llama3", n_layer, n_embd, n_head, num_key_value_heads=8, block_size=2048)
        floor = layout_memory_floor(counting.count_params(cfg).total, "bf16-mixed", gpus)
        least = min(layout_search.device_memory(cfg, layout, micro_batch=b, seq_len=2048, precision="bf16-mixed",
                                                activation_checkpointing=mode, selective_ac_option=option)["total"]
                    for layout, b, _ in layout_search.resolved_candidates(
                        cfg, acc, gpus, seq_len=2048, global_batch_tokens=layout_global_batch(gpus, 2048))
                    for mode, option in layout_search.CHECKPOINTING)
        assert floor <= least


def test_emit_config_loads_with_right_counts(cli, tmp_path):
    path = tmp_path / "plan.toml"
    out = plan_json(cli, "3e20", "--emit-config", str(path), "--set", "train.lr=1e-4")
    b = out["best"]
    data = tomllib.loads(path.read_text())
    cfg = resolve_model_section(data["model"])
    assert counting.count_params(cfg).total == b["N"]
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.num_key_value_heads, cfg.ffn_hidden) == \
        (b["n_layer"], b["n_embd"], b["n_head"], b["num_key_value_heads"], b["d_ff"])
    assert data["train"]["seq_len"] == 2048 and data["train"]["max_tokens"] == b["D_rounded"]
    assert data["train"]["lr"] == 1e-4 and data["data"]["dir"] == "data/shakespeare"
    spent = counting.training_flops_per_token(cfg, 2048) * data["train"]["max_tokens"]
    assert 0 <= 3e20 - spent < counting.training_flops_per_token(cfg, 2048) * 2048


def test_plot_writes_png(cli, tmp_path):
    path = tmp_path / "iso.png"
    r = cli("plan", "1e21", "--plot", str(path))
    assert r.returncode == 0, r.stderr
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_does_not_import_torch():
    assert heavy_modules_loaded(["plan", "1e21", "--json"]) == []


def test_too_small_budget_names_the_smallest_that_works(cli):
    r = cli("plan", "1e6")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    smallest = float(r.stderr.split("smallest budget that has one is ")[1].split()[0])
    assert cli("plan", repr(smallest * 1.001)).returncode == 0
    assert cli("plan", repr(smallest * 0.999)).returncode == 2


@pytest.mark.parametrize("args, fragment", [
    (["0"], "positive"),
    (["-5e20"], "positive"),
    (["lots"], "must be a number"),
    (["nan"], "finite"),
    ([], "give the budget C"),
    (["1e21", "--hidden", "4096:1024:256"], "empty"),
    (["1e21", "--layers", "16:x"], "--layers takes MIN:MAX:STEP"),
    (["1e21", "--hidden", "1024:2048:0"], "STEP must be positive"),
    (["1e21", "--law", "kaplan"], "unknown law"),
    (["1e21", "--law-file", "LAWFILE"], "must be a finite number"),
    (["1e21", "--law-file", "/no/such/law.json"], "law file not found"),
    (["1e21", "--aspect", "130:40"], "--aspect"),
    (["1e21", "--seq-len", "abc"], "invalid int"),
    (["1e21", "--hours", "5"], "not both"),
    (["1e24", "--max-tokens", "1e11"], "the largest budget that has one is"),
    (["1e21", "--max-params", "1e6"], "max-params excludes"),
    # an empty token range: used to format --max-tokens even when only the Chinchilla band emptied it
    (["1e21", "--enforce-chinchilla", "--tokens-per-param", "1e-9"], "the Chinchilla band (--tokens-per-param 1e-09"),
    (["1e21", "--max-tokens", "100"], "--max-tokens 100 leaves no token count"),
    # law parameters that are finite and positive but put the optimum outside any model
    (["1e21", "--B", "1e308", "--beta", "0.0001"], "N=0 parameters"),
    (["1e21", "--A", "1e308", "--alpha", "0.0001"], "N=inf parameters"),
    (["1e21", "--B", "1e-300"], "which no model can be"),
    (["1e21", "--A", "1e308", "--alpha", "1e-300", "--B", "1e308", "--beta", "1e-300"], "with a loss of inf"),
])
def test_bad_input_exits_2_with_one_line(cli, tmp_path, args, fragment):
    law = tmp_path / "law.json"
    law.write_text('{"E": 1.7, "A": 400, "B": "x", "alpha": 0.3, "beta": 0.3}')
    r = cli("plan", *[str(law) if a == "LAWFILE" else a for a in args])
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert fragment in lines[0]
    assert r.stdout == ""


@pytest.mark.parametrize("max_tokens", [1035175879.3969849, 1055276381.9095477, 1065326633.1658292])
def test_budget_on_the_edge_of_a_shapes_interval_is_feasible(max_tokens):
    """C = fpt·max_tokens is the largest budget this one shape can spend; D = C/fpt rounded past
    max_tokens used to exclude it while the explanation's interval held C (TypeError on None)."""
    sp = SearchSpace(hidden=(1024,), layers=(16,), head_dims=(64,), aspect=None, max_tokens=max_tokens)
    cfg = style_config("llama3", 16, 1024, 16, num_key_value_heads=8, block_size=2048)
    C = counting.training_flops_per_token(cfg, 2048) * max_tokens
    b = search(C, CHIN, sp).best
    assert (b["n_layer"], b["n_embd"]) == (16, 1024) and b["D"] == pytest.approx(max_tokens, rel=1e-12)
    with pytest.raises(UserError, match="too large for any shape"):
        search(C * (1 + 1e-9), CHIN, sp)


def test_no_shape_between_two_budgets_names_both_neighbours():
    # two shapes in a tight Chinchilla band: each spends one narrow range of budgets, with a gap between
    sp = SearchSpace(hidden=(1024, 2048), layers=(16,), head_dims=(64,), aspect=None, enforce_chinchilla=True,
                     tolerance=0.01)
    c = {}
    for h in (1024, 2048):
        cfg = style_config("llama3", 16, h, h // 64, num_key_value_heads=8, block_size=2048)
        c[h] = counting.training_flops_per_token(cfg, 2048) * 20 * counting.count_params(cfg).total
    gap = math.sqrt(c[1024] * c[2048])
    with pytest.raises(UserError, match=r"nearest budgets that have one: \S+ and \S+ FLOPs") as e:
        search(gap, CHIN, sp)
    assert "None" not in str(e.value)


@pytest.mark.parametrize("law", [LAWS["chinchilla"], LAWS["epoch"], LAWS["shakespeare-cpu"]])
@pytest.mark.parametrize("C", [1e13, 1e21, 1e27])
def test_closed_form_in_logs_equals_the_textbook_formula(law, C):
    """closed_form works in logarithms (so extreme laws cannot overflow); for ordinary ones it is
    Hoffmann et al.'s G·(C/6)^a, written out here, and its N·D spends C/6."""
    G = (law.alpha * law.A / (law.beta * law.B)) ** (1 / (law.alpha + law.beta))
    N = G * (C / 6) ** (law.beta / (law.alpha + law.beta))
    D = (C / 6) ** (law.alpha / (law.alpha + law.beta)) / G
    cf = law.closed_form(C)
    assert cf["N"] == pytest.approx(N, rel=1e-12) and cf["D"] == pytest.approx(D, rel=1e-12)
    assert 6 * cf["N"] * cf["D"] == pytest.approx(C, rel=1e-12)
    assert cf["loss"] == pytest.approx(law.E + law.A / N ** law.alpha + law.B / D ** law.beta, rel=1e-12)


TINY = ["1e13", "--law", "shakespeare-cpu", "--hidden", "64:512:32", "--layers", "2:12:1", "--head-dims", "32",
        "--kv-heads", "2", "--vocab", "2048", "--seq-len", "128", "--max-tokens", "1e6"]


def test_human_output_uses_units_that_fit_the_numbers(cli):
    """The demo's plan printed 'N 0.001B, D 0.0B': N and D now carry K/M/B/T as their size needs."""
    best = plan_json(cli, *TINY)["best"]
    out = cli("plan", *TINY).stdout
    rows = dict(line.strip().split(":", 1) for line in out.splitlines() if line.startswith("  N (params)")
                or line.startswith("  D (tokens)"))
    assert rows["N (params)"].split()[0] == f"{best['N'] / 1e6:.3g}M"
    assert rows["D (tokens)"].split()[0] == f"{best['D'] / 1e3:.3g}K"
    assert "0.0B" not in out and "0.00" not in out.split("TOP")[1]


def test_ffn_row_says_why_it_is_not_the_styles_ratio(cli):
    # llama3's 3.5x of a 192-wide model is 672, which the style rounds up to a multiple of 128: 768 = 4x
    out = cli("plan", *TINY, "--hidden", "192", "--layers", "3").stdout
    assert "FFN:          768 (4x n_embd): the style's 3.5x gives 672, rounded up to a multiple of 128" in out
    # where the rounding changes nothing, nothing is explained
    assert "rounded up" not in cli("plan", "1e21", "--hidden", "4096", "--layers", "32").stdout


@pytest.mark.parametrize("flag, name", [("--plot", "iso.txt"), ("--emit-config", "plan.txt"), ("--plot", "."),
                                        ("--emit-config", "sub.toml/x.toml")])
def test_output_paths_refused_before_any_work(cli, tmp_path, flag, name):
    (tmp_path / "sub.toml").write_text("keep")
    r = cli("plan", "1e21", flag, str(tmp_path / name))
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert flag in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.toml"] and (tmp_path / "sub.toml").read_text() == "keep"


@pytest.mark.parametrize("hardware", [["--gpus", "8", "--gpu-type", "H100", "--hours", "24"],
                                      ["1e21", "--gpus", "1", "--gpu-type", "A6000"]])
def test_emitted_config_carries_every_memory_assumption(cli, tmp_path, hardware):
    """The config the plan writes, loaded by the trainer's own loader and predicted by the trainer's own
    memory function, gives exactly the plan's per-GPU figure; so does `scalelab count` of the file."""
    from scalelab.train.config import load_config
    from scalelab.train.parallel import resolve_strategy
    from scalelab.train.trainer import predicted_memory

    path = tmp_path / "plan.toml"
    best = plan_json(cli, *hardware, "--emit-config", str(path))["best"]
    gpus = int(hardware[hardware.index("--gpus") + 1])
    cfg = load_config(path)
    assert (cfg.train.micro_batch_size, cfg.train.activation_checkpointing, cfg.train.dtype, cfg.train.attention,
            cfg.parallel.strategy) == (1, "full", "bf16", "sdpa", "fsdp" if gpus > 1 else "none")
    strategy = resolve_strategy(cfg.parallel.strategy, gpus)
    assert predicted_memory(cfg, strategy, gpus)["total"] == best["memory_per_gpu_bytes"]
    gpu_type = hardware[hardware.index("--gpu-type") + 1]
    counted = json.loads(cli("count", str(path), "--gpus", str(gpus), "--gpu-type", gpu_type, "--json").stdout)
    assert counted["memory"]["total"] == best["memory_per_gpu_bytes"]


def test_emit_config_is_validated_by_the_trainers_loader(cli, tmp_path):
    path = tmp_path / "plan.toml"
    path.write_text("# mine\n")
    for bad, fragment in ((["--set", "train.lr=abc"], "train.lr must be a number"),
                          (["--set", "train.warmup=-1"], "train.warmup"),
                          (["--set", "eval.bogus=1"], "unknown key 'eval.bogus'"),
                          (["--set", "train.max_steps=10"], "the plan writes train.max_steps itself"),
                          (["--gpus", "2", "--gpu-type", "H100", "--set", "parallel.strategy=ddp"],
                           "the plan writes parallel.strategy itself")):
        r = cli("plan", "1e21", *bad, "--emit-config", str(path))
        assert r.returncode == 2 and r.stdout == "", (bad, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and fragment in r.stderr, r.stderr
        assert path.read_text() == "# mine\n"
    assert heavy_modules_loaded(["plan", "1e21", "--emit-config", str(path), "--set", "train.lr=1e-4"]) == []
    assert "lr = 0.0001" in path.read_text()


# ---- the default space grows with the budget; a binding edge is named -----------------------


def test_default_space_grows_to_the_closed_form_at_1e25(cli):
    """The old fixed default (64 layers x 8192 wide, 57B) put the 1e25 plan 2x below the 6ND closed
    form's N; grown with the budget, the plan's N is within 25% of it (measured: 0.98x) and its loss
    within 1e-3 of the closed form at the plan's own FLOPs per parameter (6C/k)."""
    out = plan_json(cli, "1e25")
    b, cf = out["best"], out["closed_form"]
    assert 0.8 <= b["N"] / cf["N"] <= 1.25
    assert b["loss"] < cf["adjusted_for_k"]["loss"] + 1e-3
    assert out["search"]["grown"]["hidden"]["from"] == "1024:8192:256" and out["search"]["binding"] is None
    assert b["n_embd"] > 8192 or b["n_layer"] > 64  # beyond the old default's edge


def test_a_binding_edge_names_every_flag_that_binds(cli):
    """Given the old default ranges explicitly, they are not grown, and at 1e25 both bind: the warning
    and the headline name --hidden AND --layers, and the better shape they name is better when counted
    on its own."""
    r = cli("plan", "1e25", "--hidden", "1024:8192:256", "--layers", "16:64:2", "--json")
    out = json.loads(r.stdout)
    assert "grown" not in out["search"] and out["best"]["N"] < 6e10
    binding = out["search"]["binding"]
    assert binding["axes"] == {"hidden": "up", "layers": "up"}
    assert "--hidden MIN:MAX:STEP and --layers MIN:MAX:STEP" in r.stderr
    h, n_layer = binding["n_embd"], binding["n_layer"]
    assert h > 8192 and n_layer > 64 and 40 <= h / n_layer <= 130
    cfg = style_config("llama3", n_layer, h, binding["n_head"], num_key_value_heads=binding["num_key_value_heads"],
                       block_size=2048)
    N = counting.count_params(cfg).total
    D = 1e25 / counting.training_flops_per_token(cfg, 2048)
    assert CHIN.loss(N, D) == pytest.approx(binding["loss"], rel=1e-9) and binding["loss"] < out["best"]["loss"]
    human = cli("plan", "1e25", "--hidden", "1024:8192:256", "--layers", "16:64:2").stdout
    assert "LIMITED BY THE SEARCH SPACE (--hidden and --layers)" in human.split("BEST CONFIG")[0]


def test_one_binding_edge_names_only_that_flag():
    sp = SearchSpace(hidden=tuple(range(1024, 4096 + 1, 256)), layers=tuple(range(8, 80 + 1, 2)), aspect=None)
    result = search(1e23, CHIN, sp)
    assert result.search["binding"]["axes"] == {"hidden": "up"}
    assert any("(--hidden MIN:MAX:STEP)" in w and "--layers" not in w for w in result.search["warnings"])


def test_interior_best_has_no_binding_edge():
    result = search(1.36e21, CHIN)  # the default space, which the 1.36e21 optimum sits inside
    assert result.search["binding"] is None and "grown" not in result.search
    assert not any("binds (--" in w for w in result.search["warnings"])


@pytest.mark.parametrize("args, fragment", [
    (["--vocab", str(10**30)], "--vocab values must be at most"),
    (["--ffn-ratio", "1e300"], "--ffn-ratio must be at most"),
    (["--kv-heads", str(10**30)], "--kv-heads values must be at most"),
    (["--head-dims", str(10**30)], "--head-dims values must be at most"),
    (["--hidden", str(10**30)], "--hidden values must be at most"),
    (["--layers", f"1:{10**30}"], "--layers: MAX 1e+30 is beyond any model's size"),
    (["--hidden", f"1:{2**40}:{2**30}"], "--hidden: MAX"),
    (["--enforce-chinchilla", "--tokens-per-param", "inf"], "both finite"),
])
def test_absurd_search_numbers_exit_2_with_one_line(cli, args, fragment):
    """Siblings of `count --set n_layer=1e30`: every size the planner builds is bounded like a ModelConfig."""
    r = cli("plan", "1e21", *args)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr


@pytest.mark.parametrize("args", [["--max-tokens", "1e300"], ["--enforce-chinchilla", "--tolerance", "1e300"]])
def test_huge_but_finite_limits_plan_without_numpy_warnings(cli, args):
    r = cli("plan", "1e21", *args, "--json")
    assert r.returncode == 0 and "RuntimeWarning" not in r.stderr
    assert json.loads(r.stdout)["best"]["N"] == plan_json(cli, "1e21")["best"]["N"]  # a limit that never binds


def test_emit_config_fills_hyperparameters_from_the_default_law_labelled(cli, tmp_path):
    """No law file hyperparameters: DeepSeek LLM's laws at the plan's C in their convention (non-embedding
    FLOPs: 72 L d^2 + 6 L d S per token for these blocks, computed here by hand), labelled as the default."""
    from scalelab.train.config import load_config

    path = tmp_path / "plan.toml"
    plan_json(cli, "1e21", "--emit-config", str(path))
    text = path.read_text()
    assert "DEFAULT hyperparameter laws" in text and "2401.02954" in text
    cfg = load_config(path)
    m, t = cfg.model, cfg.train
    L, d, S = m.n_layer, m.n_embd, t.seq_len
    gemm = 2 * d * d + 2 * d * m.kv_dim + 3 * d * m.ffn_hidden  # Q, O, K, V and the SwiGLU FFN
    c_deepseek = (6 * L * gemm + 6 * L * d * S) * t.max_tokens
    assert t.lr == pytest.approx(0.3118 * c_deepseek ** -0.125, rel=1e-9)
    assert t.global_batch_tokens == pytest.approx(0.2920 * c_deepseek ** 0.3271, rel=8 * S / t.global_batch_tokens)
    assert t.global_batch_tokens % (S * t.micro_batch_size) == 0
    assert t.min_lr == pytest.approx(0.1 * t.lr) and t.schedule == "cosine" and t.warmup == 2000


def test_emit_config_uses_the_law_files_fitted_hyperparameters(cli, tmp_path):
    from scalelab.scaling import hparams
    from scalelab.train.config import load_config

    law_path = tmp_path / "law.json"
    law = hparams.HyperparameterLaw(lr_coef=2.0, lr_exponent=-0.1, batch_coef=1.0, batch_exponent=0.3,
                                    compute="training", min_lr_ratio=0.05)
    law_path.write_text(json.dumps(dict(LAWS["chinchilla"].to_dict(), hyperparameters=law.to_dict())))
    path = tmp_path / "plan.toml"
    plan_json(cli, "1e21", "--law-file", str(law_path), "--emit-config", str(path))
    assert f"fitted in {law_path}" in path.read_text()
    cfg = load_config(path)
    C = counting.training_flops_per_token(cfg.model, cfg.train.seq_len) * cfg.train.max_tokens
    assert cfg.train.lr == pytest.approx(2.0 * C ** -0.1, rel=1e-9) and cfg.train.min_lr == pytest.approx(0.05 * cfg.train.lr)
