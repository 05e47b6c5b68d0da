"""ModelConfig: validation, names, TOML round trips, overrides; presets against official specs."""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalelab.config import ModelConfig, apply_overrides, derive_d_ff, parse_value
from scalelab.errors import UserError
from scalelab.presets import PRESETS, get_preset, load_model_config, resolve_model_section, style_config


def test_names_show_attention_type():
    assert get_preset("llama3.1-8b").name() == "llama3-32L-4096H-32A-GQA8"
    assert get_preset("llama2-7b").name() == "llama2-32L-4096H-32A-MHA"
    assert get_preset("llama3.1-8b").replace(num_key_value_heads=1).name() == "llama3-32L-4096H-32A-MQA"
    rows = dict(get_preset("llama3.1-8b").summary())
    assert rows["Attention Type"].startswith("GQA (8 KV heads, 4:1")


def test_llama_ffn_rounding_reproduces_official_widths():
    # LLaMA 2: int(8/3 * dim) rounded up to a multiple of 256 gives the released widths.
    assert derive_d_ff(4096, 8 / 3, 256) == 11008  # Llama-2-7B
    assert derive_d_ff(5120, 8 / 3, 256) == 13824  # Llama-2-13B
    assert style_config("llama2", 32, 4096, 32).ffn_hidden == 11008
    assert style_config("llama3", 32, 4096, 32).ffn_hidden == 14336  # 3.5x, as LLaMA 3 8B
    assert style_config("gpt2", 12, 768, 12).ffn_hidden == 3072


@pytest.mark.parametrize("change, fragment", [
    (dict(num_key_value_heads=5), "divisible by num_key_value_heads"),
    (dict(n_head=7), "must be divisible by n_head"),
    (dict(n_layer=-2), "n_layer must be a positive integer"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(normalization="batchnorm"), "layernorm, rmsnorm"),
    (dict(ffn_type="relu"), "gelu, swiglu"),
    (dict(position_encoding="alibi"), "learned, rope"),
    (dict(norm_position="sandwich"), "pre, post"),
    (dict(rope_scaling={"type": "ntk", "factor": 2.0}), "linear, llama3, yarn"),
    (dict(rope_scaling={"type": "llama3", "factor": 8.0}), "original_max_position_embeddings"),
    (dict(rope_scaling={"type": "yarn", "factor": 1e300}), r"rope_scaling.factor must be at most 134,217,728"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1e30}),
     "original_max_position_embeddings must be at most"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128.5}),
     "whole number of positions"),
])
def test_validation_names_the_problem(change, fragment):
    with pytest.raises(UserError, match=fragment):
        ModelConfig(**{**get_preset("llama3.1-8b").to_dict(), **change})


def test_d_ff_and_ratio_conflict_unless_equal():
    base = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=100)
    assert ModelConfig(**base, d_ff=224, ffn_expansion_ratio=3.5).ffn_hidden == 224
    with pytest.raises(UserError, match="conflicts with ffn_expansion_ratio"):
        ModelConfig(**base, d_ff=200, ffn_expansion_ratio=3.5)
    # An override of one clears the other: the explicit value wins.
    cfg = style_config("llama3", 2, 256, 4)
    assert cfg.replace(d_ff=1000).ffn_hidden == 1000
    assert get_preset("llama2-7b").replace(ffn_expansion_ratio=4.0).ffn_hidden == 16384


def test_overrides_parse_types_and_reject_unknown_fields():
    cfg = get_preset("gpt2").with_overrides(["n_layer=24", "norm_eps=1e-6", "tie_embeddings=false"])
    assert (cfg.n_layer, cfg.norm_eps, cfg.tie_embeddings) == (24, 1e-6, False)
    with pytest.raises(UserError, match="did you mean 'n_layer'"):
        get_preset("gpt2").with_overrides(["n_layers=3"])
    with pytest.raises(UserError, match="must be an integer"):
        get_preset("gpt2").with_overrides(["n_head=twelve"])
    assert parse_value('{type = "linear", factor = 4.0}') == {"type": "linear", "factor": 4.0}
    assert apply_overrides({"train": {"lr": 1.0}}, ["train.lr=3e-4", "model.n_layer=2"]) == {
        "train": {"lr": 3e-4}, "model": {"n_layer": 2}}


def test_changing_heads_of_mha_model_stays_mha():
    assert get_preset("gpt2").with_overrides(["n_head=8"]).attention_type == "MHA"


@pytest.mark.parametrize("name", list(PRESETS))
def test_toml_round_trip_every_preset(name, tmp_path):
    cfg = PRESETS[name]
    path = tmp_path / "m.toml"
    path.write_text(cfg.to_toml())
    assert ModelConfig.from_toml(path) == cfg
    assert load_model_config(str(path)) == cfg


@settings(max_examples=40, deadline=None)
@given(n_layer=st.integers(1, 64), heads=st.sampled_from([(8, 8), (8, 2), (8, 1), (12, 4), (16, 8)]),
       head_dim=st.sampled_from([16, 64, 128]), vocab=st.integers(1, 200_000),
       style=st.sampled_from(["gpt2", "llama2", "llama3"]))
def test_toml_round_trip_property(n_layer, heads, head_dim, vocab, style, tmp_path_factory):
    n_head, kv = heads
    cfg = style_config(style, n_layer, n_head * head_dim, n_head, num_key_value_heads=kv, vocab_size=vocab)
    path = tmp_path_factory.mktemp("toml") / "m.toml"
    path.write_text(cfg.to_toml())
    assert ModelConfig.from_toml(path) == cfg


def test_training_config_model_section_forms():
    assert resolve_model_section({"preset": "llama3.2-1b", "n_layer": 4}).n_layer == 4
    cfg = resolve_model_section({"style": "llama3", "n_layer": 4, "n_embd": 256, "n_head": 8})
    assert (cfg.num_key_value_heads, cfg.rope_theta, cfg.vocab_size) == (8, 500000.0, 128256)
    with pytest.raises(UserError, match="needs n_head"):
        resolve_model_section({"style": "llama3", "n_layer": 4, "n_embd": 256})


def test_malformed_toml_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("n_layer = = 3\n")
    with pytest.raises(UserError, match="malformed TOML"):
        ModelConfig.from_toml(bad)


NUMERIC_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)
                  if f.type in ("int", "float", "int | None", "float | None")]


DENSE_NUMERIC_FIELDS = {"n_layer", "n_head", "n_embd", "vocab_size", "block_size", "num_key_value_heads", "d_ff",
                        "ffn_expansion_ratio", "multiple_of", "norm_eps", "rope_theta", "sliding_window", "head_dim"}
# A tiny model with every MLA and MoE field set (DeepSeek-V3's kind), for the fields a dense model refuses.
MLA_MOE = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=100, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
               qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
               moe_intermediate_size=32, first_k_dense_replace=1, scoring_func="sigmoid", topk_method="noaux_tc",
               n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, router_aux_loss_coef=0.001)
ZERO_MEANS_NONE = {"n_routed_experts", "n_shared_experts", "first_k_dense_replace", "router_aux_loss_coef"}


def test_numeric_fields_are_all_known():
    assert set(NUMERIC_FIELDS) == DENSE_NUMERIC_FIELDS | {k for k, v in MLA_MOE.items()
                                                          if type(v) in (int, float) and k not in (
                                                              "n_layer", "n_head", "n_embd", "vocab_size")}


@pytest.mark.parametrize("value", ["1e30", "-1", "0", "inf", "nan", "99999999999999999999"])
@pytest.mark.parametrize("name", NUMERIC_FIELDS)
def test_every_numeric_field_refuses_absurd_values(name, value):
    """`--set n_layer=1e30` was an OverflowError in the int64 counts; every numeric field is bounded."""
    if value == "0" and name in ZERO_MEANS_NONE:
        return
    base = get_preset("llama3.1-8b") if name in DENSE_NUMERIC_FIELDS else ModelConfig(**MLA_MOE)
    with pytest.raises(UserError, match=name) as e:
        cfg = base.with_overrides([f"{name}={value}"])
        from scalelab.counting import count_params, training_memory
        count_params(cfg), training_memory(cfg)  # noqa: B018 (only reached if validation let it through)
    assert "\n" not in str(e.value)


def test_sizes_at_the_bounds_count_without_overflow():
    from scalelab.config import INT_LIMITS
    from scalelab.counting import count_params

    cfg = ModelConfig(n_layer=INT_LIMITS["n_layer"], n_head=16, n_embd=INT_LIMITS["n_embd"],
                      d_ff=INT_LIMITS["d_ff"], vocab_size=INT_LIMITS["vocab_size"], block_size=INT_LIMITS["block_size"],
                      position_encoding="learned")
    L, H, F, V, S = (INT_LIMITS[k] for k in ("n_layer", "n_embd", "d_ff", "vocab_size", "block_size"))
    # python ints cannot overflow: the int64 count must equal the exact sum
    assert count_params(cfg).total == L * (4 * H * H + 3 * H * F + 2 * H) + H + 2 * V * H + S * H


def test_head_dim_is_independent_of_n_embd_and_derived_when_unset():
    """Qwen3-0.6B: 16 heads of 128 on a 1024-wide stream (n_head · head_dim = 2048 != n_embd)."""
    cfg = ModelConfig(n_layer=2, n_head=16, n_embd=1024, num_key_value_heads=8, head_dim=128, vocab_size=100)
    assert (cfg.head_dim, cfg.q_dim, cfg.kv_dim) == (128, 2048, 1024)
    assert cfg.replace(n_embd=512).head_dim == 128  # explicit: kept
    derived = ModelConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=100)
    assert derived.head_dim == 16 and "head_dim" not in derived.to_dict()
    assert derived.replace(n_head=8).head_dim == 8  # derived: follows n_embd / n_head, as before
    assert all("head_dim" not in cfg.to_dict() for cfg in PRESETS.values() if cfg.head_dim == cfg.n_embd // cfg.n_head)
    assert ModelConfig(**MLA_MOE).head_dim == 8 + 4  # MLA: qk_nope_head_dim + qk_rope_head_dim


def test_new_fields_show_in_name_and_summary():
    cfg = ModelConfig(**MLA_MOE, family="tiny")
    assert cfg.name() == "tiny-2L-64H-4A-MLA-E8k2+1s"
    rows = dict(cfg.summary())
    assert rows["Attention Type"] == "MLA (latent KV 16 + shared RoPE key 4)"
    assert rows["MoE"] == "1 layers: 2 of 8 routed experts + 1 shared, width 32"
    assert rows["Router"] == "sigmoid, noaux_tc, 2 of 4 groups, renormalised, x2.5, aux loss 0.001"
    qk = ModelConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=100, head_dim=32, qk_norm=True)
    assert dict(qk.summary())["Head dim"] == "32, q/k RMSNorm"


@pytest.mark.parametrize("change, fragment", [
    (dict(num_experts_per_tok=9), r"num_experts_per_tok \(9\) must be at most n_routed_experts \(8\)"),
    (dict(num_experts_per_tok=None), "needs num_experts_per_tok"),
    (dict(kv_lora_rank=None), "q_lora_rank applies only to MLA models; set kv_lora_rank too"),
    (dict(kv_lora_rank=None, q_lora_rank=None), "qk_nope_head_dim applies only to MLA models"),
    (dict(v_head_dim=None), "MLA .kv_lora_rank set. needs v_head_dim"),
    (dict(qk_rope_head_dim=5), "RoPE needs an even qk_rope_head_dim, got 5"),
    (dict(head_dim=64), r"under MLA head_dim is qk_nope_head_dim \+ qk_rope_head_dim"),
    (dict(num_key_value_heads=2), "MLA .kv_lora_rank. does not support num_key_value_heads"),
    (dict(qk_norm=True), "does not support qk_norm"),
    (dict(position_encoding="learned"), "does not support learned positions"),
    (dict(n_routed_experts=0), "num_experts_per_tok applies only to MoE models; set n_routed_experts"),
    (dict(ffn_type="gelu"), "MoE experts are SwiGLU"),
    (dict(first_k_dense_replace=2), r"first_k_dense_replace \(2\) must be below n_layer"),
    (dict(n_group=3), r"n_group \(3\) must divide n_routed_experts \(8\)"),
    (dict(topk_group=5), r"topk_group \(5\) must be at most n_group \(4\)"),
    (dict(topk_group=1, num_experts_per_tok=3), r"must be at most topk_group x experts per group \(1 x 2\)"),
    (dict(n_group=8, topk_group=8), "noaux_tc scores a group by its two best experts"),
    (dict(topk_method="greedy"), "n_group needs topk_method"),
    (dict(scoring_func="relu"), "scoring_func must be one of softmax, sigmoid"),
    (dict(topk_method="best"), "topk_method must be one of greedy, group_limited_greedy, noaux_tc"),
    (dict(n_group=None), "topk_group needs n_group"),
    (dict(router_aux_loss_coef=2.0), "router_aux_loss_coef must be a number from 0 to 1"),
])
def test_bad_mla_and_moe_combinations_name_the_problem(change, fragment):
    with pytest.raises(UserError, match=fragment) as e:
        ModelConfig(**{**MLA_MOE, **change})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("change, fragment", [
    (dict(head_dim=0), "head_dim must be a positive integer"),
    (dict(head_dim=-4), "head_dim must be a positive integer"),
    (dict(head_dim=7), "RoPE needs an even head_dim, got 7$"),
    (dict(n_embd=4097), r"n_embd \(4097\) must be divisible by n_head \(32\).*or set head_dim"),
    (dict(n_head=512, head_dim=2**16), "n_head x head_dim .512 x 65536. must be at most"),
    (dict(n_shared_experts=1), "n_shared_experts applies only to MoE models"),
    (dict(norm_topk_prob=True), "norm_topk_prob applies only to MoE models"),
])
def test_bad_head_dim_and_dense_misuse_name_the_problem(change, fragment):
    with pytest.raises(UserError, match=fragment):
        ModelConfig(**{**get_preset("llama3.1-8b").to_dict(), **change})
    # an explicit head_dim lifts the divisibility rule
    assert ModelConfig(**{**get_preset("llama3.1-8b").to_dict(), "n_embd": 4097, "head_dim": 128}).q_dim == 4096


def test_set_none_resets_an_optional_field():
    cfg = ModelConfig(**MLA_MOE).with_overrides(["q_lora_rank=none"])
    assert cfg.q_lora_rank is None
