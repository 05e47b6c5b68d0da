"""Qwen3 against transformers' Qwen3ForCausalLM: head_dim independent of the width and an RMSNorm on
every query and key head. The presets' totals equal the reference model built from the official
config.json values on the meta device; a tiny random model's logits equal ours after import and export;
FlopCounterMode equals counting with n_head · head_dim != n_embd (the general matmul list)."""

import argparse

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from scalelab import counting, hf
from scalelab.errors import UserError
from scalelab.model import Transformer
from scalelab.presets import OFFICIAL_PARAMS, get_preset
from hf_checks import assert_exports_with_equal_logits
from test_hf import randomize as randomize_like_hf

transformers.logging.set_verbosity_error()
V = 101

# The official config.json values (huggingface.co/Qwen/Qwen3-*/blob/main/config.json), restated here so the
# test does not trust presets.py. Both have max_position_embeddings 40960, rope_theta 1e6, rms_norm_eps 1e-6,
# attention_bias false, use_sliding_window false.
OFFICIAL = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
}
COMMON = dict(max_position_embeddings=40960, rms_norm_eps=1e-6, attention_bias=False, use_sliding_window=False,
              sliding_window=None, max_window_layers=28, hidden_act="silu", model_type="qwen3",
              architectures=["Qwen3ForCausalLM"], rope_parameters={"rope_type": "default", "rope_theta": 1e6})


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_preset_totals_equal_transformers_qwen3(name):
    with torch.device("meta"):
        reference = Qwen3ForCausalLM(Qwen3Config(**OFFICIAL[name], rms_norm_eps=1e-6))
    total = sum(p.numel() for p in reference.parameters())  # a tied lm_head is the same Parameter: once
    cfg = get_preset(name)
    assert total == OFFICIAL_PARAMS[name] == counting.count_params(cfg).total
    with torch.device("meta"):
        assert sum(p.numel() for p in Transformer(cfg).parameters()) == total
    # the preset is exactly what importing the official config.json gives
    assert hf.config_from_hf({**COMMON, **OFFICIAL[name]}) == cfg


def tiny(**kw):
    # 4 heads of 24 on a 64-wide stream: q_proj 64 -> 96, o_proj 96 -> 64
    return Qwen3Config(**{**dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                 max_position_embeddings=64, rms_norm_eps=1e-6), **kw})


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind, config", [("untied", dict()), ("tied", dict(tie_word_embeddings=True))])
def test_logits_equal_transformers_both_ways(kind, config, idx, tmp_path):
    reference = randomize_like_hf(AutoModelForCausalLM.from_config(tiny(**config)), 0, scale=0.2)
    assert type(reference).__name__ == "Qwen3ForCausalLM"
    reference.save_pretrained(tmp_path / "hf")
    ours = hf.load(tmp_path / "hf")
    cfg = ours.config
    assert (cfg.family, cfg.head_dim, cfg.q_dim, cfg.qk_norm, cfg.norm_eps) == ("qwen3", 24, 96, True, 1e-6)
    with torch.no_grad():
        expected, got = reference(idx).logits, ours(idx)
    print(f"max |logit diff| qwen3 {kind} import: {(got - expected).abs().max().item():.3g}")
    assert expected.std() > 0.3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the q/k norms matter: with unit weights the logits differ clearly
    plain = {k: (torch.ones_like(v) if k.endswith(("q_norm.weight", "k_norm.weight")) else v)
             for k, v in ours.state_dict().items()}
    unnormed = Transformer(cfg)
    unnormed.load_state_dict(plain)
    with torch.no_grad():
        assert (unnormed(idx) - expected).abs().max() > 1e-2

    mine = randomize_like_hf(Transformer(cfg), 1, scale=0.2)
    assert_exports_with_equal_logits(mine, tmp_path / "export", "qwen3", idx, f"qwen3 {kind}")


def test_flop_counter_equals_counting_with_independent_head_dim():
    """counting sums the matmul list at the model's own widths: q_proj 64 -> 96, QKᵀ and AV at 4 x 24, o_proj
    96 -> 64 (the old count took n_embd for all of these)."""
    cfg = hf.config_from_hf(tiny().to_dict())
    model = Transformer(cfg, attention="math")
    B, S = 2, 24
    x = torch.randint(0, V, (B, S))
    with FlopCounterMode(display=False) as forward:
        model(x)
    assert forward.get_total_flops() == counting.forward_flops(cfg, B, S)
    with FlopCounterMode(display=False) as training:
        model(x, x)[1].backward()
    assert training.get_total_flops() == counting.training_flops(cfg, B, S) == 3 * counting.forward_flops(cfg, B, S)
    # written out: per token, 2 x (q 64x96, k and v 64x48, o 96x64, FFN 3 x 64x96) per layer, QKᵀ and AV
    # 2 x 2 x S x 96 per layer, lm_head 64 x V
    per_layer = 2 * (64 * 96 + 2 * 64 * 48 + 96 * 64 + 3 * 64 * 96) + 4 * S * 96
    assert counting.forward_flops_per_token(cfg, S) == 2 * per_layer + 2 * 64 * V
    # the vectorised count (the planner's) agrees with the scalar one
    arrays = counting.training_flops_per_token_arrays(*counting._shape_args(cfg), S, **counting._style_kwargs(cfg))
    assert arrays == counting.training_flops_per_token(cfg, S)


def test_export_refuses_what_qwen3_cannot_compute(tmp_path):
    qwen3 = Transformer(hf.config_from_hf(tiny().to_dict()))
    with pytest.raises(UserError, match="no q/k norms.*export as qwen3"):
        hf.save(qwen3, tmp_path / "a", arch="llama")
    llama = Transformer(qwen3.config.replace(qk_norm=False, family="llama3"))
    assert hf.default_architecture(llama.config) == "llama"
    with pytest.raises(UserError, match="qk_norm = false"):
        hf.save(llama, tmp_path / "b", arch="qwen3")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(UserError, match="attention_bias"):
        hf.config_from_hf(tiny(attention_bias=True).to_dict())


def test_cli_arch_choices_are_the_table():
    """export-hf's --arch choices are written out (the CLI must not import torch): they must be hf.ARCHS."""
    from scalelab.cli import hf as cli_hf

    parser = argparse.ArgumentParser()
    cli_hf.register(parser.add_subparsers())
    export = parser._subparsers._group_actions[0].choices["export-hf"]
    arch = next(a for a in export._actions if a.dest == "arch")
    assert tuple(arch.choices) == hf.ARCHITECTURES
