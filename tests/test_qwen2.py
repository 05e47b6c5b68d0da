"""Qwen2 / Qwen2.5 against transformers' Qwen2ForCausalLM: the presets' parameter totals equal
the reference model built from the official config.json values (on the meta device, tied
embeddings counted once), and a tiny random model's logits equal ours after import and export."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from scalelab import counting, hf
from scalelab.errors import UserError
from scalelab.model import Transformer
from scalelab.presets import OFFICIAL_PARAMS, get_preset, style_config
from test_hf import randomize as randomize_like_hf

transformers.logging.set_verbosity_error()
V = 101

# The official config.json values (huggingface.co/Qwen/Qwen2.5-*/blob/main/config.json), restated
# here so the test does not trust presets.py, and the totals on the model cards (0.49B, 1.54B, 7.61B).
OFFICIAL = {
    "qwen2.5-0.5b": (dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                          tie_word_embeddings=True), 494_032_768),
    "qwen2.5-1.5b": (dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                          num_key_value_heads=2, vocab_size=151936, max_position_embeddings=131072,
                          tie_word_embeddings=True), 1_543_714_304),
    "qwen2.5-7b": (dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072,
                        tie_word_embeddings=False), 7_615_616_512),
}
COMMON = dict(rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False, sliding_window=131072,
              max_window_layers=21, hidden_act="silu", model_type="qwen2", architectures=["Qwen2ForCausalLM"])


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_preset_totals_equal_transformers_qwen2(name):
    fields, card_total = OFFICIAL[name]
    with torch.device("meta"):
        reference = Qwen2ForCausalLM(Qwen2Config(**fields, rms_norm_eps=1e-6,
                                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    total = sum(p.numel() for p in reference.parameters())  # a tied lm_head is the same Parameter: once
    cfg = get_preset(name)
    assert total == card_total == OFFICIAL_PARAMS[name] == counting.count_params(cfg).total
    with torch.device("meta"):
        assert sum(p.numel() for p in Transformer(cfg).parameters()) == total
    # the preset is exactly what importing the official config.json gives
    assert hf.config_from_hf({**COMMON, **fields}) == cfg


def tiny(**kw):
    return Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, **kw)


def randomize(model, seed=0):
    return randomize_like_hf(model, seed, scale=0.2)


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind, config", [
    ("untied", dict()),
    ("tied", dict(tie_word_embeddings=True)),
    ("all-layers-sliding", dict(use_sliding_window=True, sliding_window=5, max_window_layers=0)),
])
def test_logits_equal_transformers_both_ways(kind, config, idx, tmp_path):
    reference = randomize(AutoModelForCausalLM.from_config(tiny(**config)))
    assert type(reference).__name__ == "Qwen2ForCausalLM"
    assert reference.model.layers[0].self_attn.k_proj.bias is not None
    assert reference.model.layers[0].self_attn.o_proj.bias is None
    reference.save_pretrained(tmp_path / "hf")
    ours = hf.load(tmp_path / "hf")
    cfg = ours.config
    assert (cfg.family, cfg.qkv_bias, cfg.bias, cfg.norm_eps) == ("qwen2", True, False, 1e-6)
    assert cfg.sliding_window == config.get("sliding_window")
    with torch.no_grad():
        expected, got = reference(idx).logits, ours(idx)
    print(f"max |logit diff| qwen2 {kind} import: {(got - expected).abs().max().item():.3g}")
    assert expected.std() > 0.3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the biases matter: without them the logits differ clearly
    unbiased = Transformer(cfg.replace(qkv_bias=False))
    unbiased.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.endswith("proj.bias")})
    with torch.no_grad():
        assert (unbiased(idx) - expected).abs().max() > 1e-2

    mine = randomize(Transformer(cfg), seed=1)
    assert hf.save(mine, tmp_path / "export") == "qwen2"
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(exported).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        expected, got = exported(idx).logits, mine(idx)
    print(f"max |logit diff| qwen2 {kind} export: {(got - expected).abs().max().item():.3g}")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    back = hf.load(tmp_path / "export")
    assert back.config == mine.config
    for key, tensor in mine.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key


def test_window_on_some_layers_only_is_refused():
    with pytest.raises(UserError, match="on 1 of 2 layers"):
        hf.config_from_hf(tiny(use_sliding_window=True, sliding_window=5, max_window_layers=1).to_dict())
    # use_sliding_window false: the window (always present in Qwen2.5's config.json) is not used
    assert hf.config_from_hf(tiny(sliding_window=5).to_dict()).sliding_window is None


def test_qkv_bias_parameters_and_counting():
    cfg = style_config("llama3", 2, 64, 4, num_key_value_heads=2, vocab_size=V, qkv_bias=True)
    model = Transformer(cfg)
    attn = model.layers[0].attn
    assert attn.q_proj.bias.shape == (64,) and attn.k_proj.bias.shape == attn.v_proj.bias.shape == (2 * 16,)
    assert attn.o_proj.bias is None and model.layers[0].ffn.down.bias is None
    assert sum(p.numel() for p in model.parameters()) == counting.count_params(cfg).total
    assert counting.count_params(cfg).total - counting.count_params(cfg.replace(qkv_bias=False)).total == 2 * (64 + 64)
    # bias = true already has them: qkv_bias adds nothing
    assert counting.count_params(cfg.replace(bias=True)).total == counting.count_params(
        cfg.replace(bias=True, qkv_bias=False)).total
    # the planner's vectorised counts take it as a keyword (default False: old calls unchanged)
    shapes = [(2, 64, 4, 2, 224), (24, 896, 14, 2, 4864)]
    arr = list(zip(*shapes))
    totals = counting.param_breakdown_arrays(*arr, V, qkv_bias=True)["total"]
    for i, (l, h, a, kv, f) in enumerate(shapes):
        c = style_config("llama3", l, h, a, num_key_value_heads=kv, d_ff=f, vocab_size=V, qkv_bias=True)
        assert totals[i] == counting.count_params(c).total
    assert dict(cfg.summary())["Bias"] == "q, k, v projections only"


def test_export_refuses_mismatched_biases(tmp_path):
    qkv_only = Transformer(style_config("llama3", 2, 32, 4, vocab_size=V, qkv_bias=True))
    assert hf.default_architecture(qkv_only.config) == "qwen2"
    with pytest.raises(UserError, match="export as qwen2"):
        hf.save(qkv_only, tmp_path / "a", arch="llama")
    with pytest.raises(UserError, match="q, k and v only"):
        hf.save(Transformer(style_config("llama3", 2, 32, 4, vocab_size=V)), tmp_path / "b", arch="qwen2")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
