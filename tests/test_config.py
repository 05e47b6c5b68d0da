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


def test_numeric_fields_are_all_known():
    assert set(NUMERIC_FIELDS) == {"n_layer", "n_head", "n_embd", "vocab_size", "block_size", "num_key_value_heads",
                                   "d_ff", "ffn_expansion_ratio", "multiple_of", "norm_eps", "rope_theta",
                                   "sliding_window"}


@pytest.mark.parametrize("value", ["1e30", "-1", "0", "inf", "nan", "99999999999999999999"])
@pytest.mark.parametrize("name", NUMERIC_FIELDS)
def test_every_numeric_field_refuses_absurd_values(name, value):
    """`--set n_layer=1e30` was an OverflowError in the int64 counts; every numeric field is bounded."""
    with pytest.raises(UserError, match=name) as e:
        cfg = get_preset("llama3.1-8b").with_overrides([f"{name}={value}"])
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
