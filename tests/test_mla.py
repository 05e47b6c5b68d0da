"""Multi-head Latent Attention (scalelab.mla) with DeepSeek's MoE against transformers'
DeepseekV3ForCausalLM and DeepseekV2ForCausalLM: logits equal after import and after export (tiny random
models, fp32; low-rank and full-rank queries, group-limited routing, YaRN with DeepSeek's mscale), KV-cache
generation (the cache holds the latent and the RoPE key) equal to generation without it and to
transformers' (FlopCounterMode against counting: tests/test_block_flops.py)."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config

from scalelab import hf
from scalelab.errors import UserError
from scalelab.model import KVCache, Transformer
from hf_checks import assert_exports_with_equal_logits
from test_hf import randomize as randomize_like_hf

transformers.logging.set_verbosity_error()
V = 101
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}


def deepseek(version: int, **kw):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=12, kv_lora_rank=12, qk_nope_head_dim=6,
                qk_rope_head_dim=4, v_head_dim=5, max_position_embeddings=64, rms_norm_eps=1e-6)
    if version == 3:
        return DeepseekV3Config(**{**base, "routed_scaling_factor": 2.5, "n_group": 4, "topk_group": 2,
                                   "norm_topk_prob": True, **kw})
    return DeepseekV2Config(**{**base, **kw})


CASES = {
    "v3": (3, {}),
    "v3-full-rank-q-yarn": (3, dict(q_lora_rank=None, rope_parameters=YARN)),
    "v2-lite": (2, dict(q_lora_rank=None, topk_method="greedy", rope_parameters=YARN)),
    "v2-groups": (2, dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5)),
}


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))


def randomized(config, seed):
    model = randomize_like_hf(AutoModelForCausalLM.from_config(config), seed, scale=0.2)
    with torch.no_grad():  # the routing bias (a buffer) away from 0, so its mapping matters
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=torch.Generator().manual_seed(seed)))
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers_both_ways(case, idx, tmp_path):
    version, kw = CASES[case]
    reference = randomized(deepseek(version, **kw), 0)
    arch = f"deepseek_v{version}"
    reference.save_pretrained(tmp_path / "hf")
    ours = hf.load(tmp_path / "hf")
    cfg = ours.config
    assert cfg.is_mla and cfg.head_dim == 10 and cfg.n_moe_layers == 2
    with torch.no_grad():
        expected, got = reference(idx).logits, ours(idx)
    print(f"max |logit diff| {case} import: {(got - expected).abs().max().item():.3g}")
    assert expected.std() > 0.3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    mine = randomize_like_hf(Transformer(cfg), 1, scale=0.2)
    assert_exports_with_equal_logits(mine, tmp_path / "export", arch, idx, case)


def test_interleaved_rope_rows_are_reordered(idx, tmp_path):
    """Without the reordering of DeepSeek's interleaved RoPE rows the logits differ (the test above
    would catch a missing permutation only if RoPE mattered; here it visibly does)."""
    reference = randomized(deepseek(3), 0)
    reference.save_pretrained(tmp_path / "hf")
    ours = hf.load(tmp_path / "hf")
    raw = hf.read_safetensors(tmp_path / "hf")
    plain = dict(ours.state_dict())
    for i in range(3):
        plain[f"layers.{i}.attn.q_b_proj.weight"] = raw[f"model.layers.{i}.self_attn.q_b_proj.weight"]
        plain[f"layers.{i}.attn.kv_a_proj.weight"] = raw[f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight"]
    unpermuted = Transformer(ours.config)
    unpermuted.load_state_dict(plain)
    with torch.no_grad():
        assert (unpermuted(idx) - reference(idx).logits).abs().max() > 1e-3


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_kv_cache_holds_the_latent_and_generation_equals_no_cache(attention, tmp_path):
    reference = randomized(deepseek(3, rope_parameters=YARN), 0)
    reference.save_pretrained(tmp_path / "hf")
    model = hf.load(tmp_path / "hf", attention=attention)
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1))
    cached = model.generate(prompt, 12, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 12, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, 5:].tolist())) > 2  # not a constant continuation
    # transformers' own greedy continuation
    expected = reference.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert torch.equal(cached, expected)
    # what the cache holds per layer: the normalised latent (kv_lora_rank) and the rotated RoPE key
    cache = KVCache(model.config.n_layer, 8)
    with torch.no_grad():
        model(prompt, kv_cache=cache)
    assert cache.k[0].shape == (2, 1, 8, 12) and cache.v[0].shape == (2, 1, 8, 4)


def test_export_and_import_refuse_what_they_cannot_compute(tmp_path):
    v3 = Transformer(hf.config_from_hf(deepseek(3).to_dict()))
    with pytest.raises(UserError, match="DeepseekV2ForCausalLM routes with softmax"):
        hf.save(v3, tmp_path / "a", arch="deepseek_v2")
    with pytest.raises(UserError, match="cannot be exported as mixtral"):
        hf.save(v3, tmp_path / "b", arch="mixtral")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(UserError, match="rope_interleave = false"):
        hf.config_from_hf(deepseek(3, rope_interleave=False).to_dict())
    with pytest.raises(UserError, match="quantized .*convert it to bf16 first"):
        hf.config_from_hf({**deepseek(3).to_dict(), "quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(UserError, match="moe_layer_freq"):
        hf.config_from_hf({**deepseek(2).to_dict(), "moe_layer_freq": 2})


def test_import_skips_deepseek_v3_multi_token_prediction_layer(idx, tmp_path):
    """The released DeepSeek-V3 holds one more layer (index n_layer) for multi-token prediction, outside
    the main model: the import ignores its tensors, as transformers does, and refuses any other stray one."""
    from safetensors.torch import save_file

    reference = randomized(deepseek(3), 0)
    reference.save_pretrained(tmp_path / "hf")
    tensors = hf.read_safetensors(tmp_path / "hf")
    mtp = {k.replace("model.layers.2.", "model.layers.3."): v.clone() for k, v in tensors.items() if ".layers.2." in k}
    save_file({**tensors, **mtp, "model.layers.3.eh_proj.weight": torch.zeros(32, 64)},
              tmp_path / "hf" / "model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(hf.load(tmp_path / "hf")(idx), reference(idx).logits, atol=1e-5, rtol=0)
    save_file({**tensors, "model.embed_extra.weight": torch.zeros(2)}, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(UserError, match="does not use, e.g. 'model.embed_extra.weight'"):
        hf.load(tmp_path / "hf")


def test_dense_mla_model_round_trips_as_deepseek_v3(idx, tmp_path):
    """An MLA model without experts exports as DeepseekV3ForCausalLM with every layer dense
    (first_k_dense_replace = n_layer; transformers' config still wants integer MoE fields) and imports
    back as the same dense model."""
    from scalelab.config import ModelConfig

    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=V, block_size=64, d_ff=48, kv_lora_rank=12,
                      qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5, family="deepseek_v3")
    mine = randomize_like_hf(Transformer(cfg), 3, scale=0.2)
    assert hf.save(mine, tmp_path / "export") == "deepseek_v3"
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(mine(idx), exported(idx).logits, atol=1e-5, rtol=0)
    assert hf.load(tmp_path / "export").config == cfg
