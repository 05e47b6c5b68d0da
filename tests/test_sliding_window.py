"""Sliding-window attention (Mistral-7B-v0.1) against transformers' MistralForCausalLM and its
own masking definition: a tiny random model (2 layers, 64 wide, window 4) on sequences four times
the window, both attention paths, the KV cache and greedy generation past the window."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, MistralConfig
from transformers.masking_utils import sliding_window_causal_mask_function

from scalelab import hf
from scalelab.config import ModelConfig
from scalelab.errors import UserError
from scalelab.model import KVCache, Transformer, attention_mask
from scalelab.presets import get_preset, style_config
from test_hf import randomize as randomize_like_hf

V, WINDOW, S = 101, 4, 16
transformers.logging.set_verbosity_error()


def mistral_config(window=WINDOW, **kw):
    return MistralConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         sliding_window=window, **kw)


def randomize(model, seed=0):
    return randomize_like_hf(model, seed, scale=0.3)


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random MistralForCausalLM with window 4, saved as transformers writes it."""
    path = tmp_path_factory.mktemp("mistral")
    model = randomize(AutoModelForCausalLM.from_config(mistral_config()))
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("s_q, s_k, window", [(6, 6, 3), (16, 16, 4), (1, 9, 4), (3, 9, 4), (5, 5, 5),
                                              (2, 7, 1), (4, 4, 8)])
def test_mask_is_transformers_definition(s_q, s_k, window):
    """Query row r is position s_k - s_q + r; transformers says kv <= q and kv > q - window."""
    allowed = sliding_window_causal_mask_function(window)
    t = torch.tensor
    expected = torch.tensor([[bool(allowed(t(0), t(0), t(s_k - s_q + r), t(j))) for j in range(s_k)]
                             for r in range(s_q)])
    mask = attention_mask(s_q, s_k, window, torch.device("cpu"))
    if mask is None:  # the unmasked fast paths: plain causal, or one query that sees every key
        assert expected.equal(torch.ones(s_q, s_k, dtype=torch.bool).tril(s_k - s_q))
    else:
        assert torch.equal(mask, expected)


@pytest.mark.parametrize("attention", ["sdpa", "math"])
@pytest.mark.parametrize("hf_attention", ["sdpa", "eager"])
def test_import_logits_equal_transformers(reference, idx, attention, hf_attention):
    model, path = reference
    model.config._attn_implementation = hf_attention
    ours = hf.load(path, attention=attention)
    assert ours.config.sliding_window == WINDOW and ours.config.family == "mistral"
    with torch.no_grad():
        expected, got = model(idx).logits, ours(idx)
    model.config._attn_implementation = "sdpa"
    diff = (got - expected).abs().max().item()
    print(f"max |logit diff| import {attention}/{hf_attention}: {diff:.3g}")
    assert expected.std() > 0.3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the window matters: full causal attention gives clearly different logits after WINDOW tokens
    full = Transformer(ours.config.replace(sliding_window=None), attention=attention)
    full.load_state_dict(ours.state_dict())
    with torch.no_grad():
        unwindowed = full(idx)
    torch.testing.assert_close(unwindowed[:, :WINDOW], got[:, :WINDOW], atol=1e-5, rtol=0)
    assert (unwindowed[:, WINDOW:] - got[:, WINDOW:]).abs().max() > 1e-2


def test_export_logits_equal_transformers(idx, tmp_path):
    mine = randomize(Transformer(hf.config_from_hf(mistral_config().to_dict())), seed=1)
    assert hf.save(mine, tmp_path) == "mistral"
    exported = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(exported).__name__ == "MistralForCausalLM" and exported.config.sliding_window == WINDOW
    with torch.no_grad():
        expected, got = exported(idx).logits, mine(idx)
    print(f"max |logit diff| export: {(got - expected).abs().max().item():.3g}")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert hf.load(tmp_path).config == mine.config


def test_sdpa_equals_math_with_window(idx):
    cfg = style_config("llama3", 2, 64, 8, num_key_value_heads=2, vocab_size=V, block_size=64, sliding_window=5)
    math_model = randomize(Transformer(cfg, attention="math"))
    sdpa_model = Transformer(cfg, attention="sdpa")
    sdpa_model.load_state_dict(math_model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(sdpa_model(idx), math_model(idx), atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_kv_cache_chunks_equal_full_forward_with_window(idx, attention):
    """Positions offset by the cache: prefill, a chunk and single tokens = one full forward."""
    cfg = hf.config_from_hf(mistral_config().to_dict())
    model = randomize(Transformer(cfg, attention=attention))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(cfg.n_layer, S)
        parts = [model(idx[:, :6], kv_cache=cache), model(idx[:, 6:9], kv_cache=cache)]
        parts += [model(idx[:, i:i + 1], kv_cache=cache) for i in range(9, S)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=0)  # logits are O(10) here


def test_greedy_generation_past_the_window(reference):
    model, path = reference
    ours = hf.load(path)
    prompt = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(5))
    cached = ours.generate(prompt, 20, temperature=0, use_cache=True)
    uncached = ours.generate(prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    expected = model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    assert torch.equal(cached, expected)


def test_config_field():
    cfg = get_preset("mistral-7b")
    assert cfg.sliding_window == 4096 and cfg.name() == "mistral-32L-4096H-32A-GQA8"
    assert dict(cfg.summary())["Attention window"] == "sliding, 4096 tokens"
    assert dict(get_preset("llama3.1-8b").summary())["Attention window"] == "full causal"
    assert get_preset("llama3.1-8b").sliding_window is None
    assert cfg.with_overrides(["sliding_window=none"]).sliding_window is None
    assert cfg.with_overrides(["sliding_window=1024"]).sliding_window == 1024
    for bad in (0, -4):
        with pytest.raises(UserError, match="sliding_window must be a positive integer"):
            cfg.replace(sliding_window=bad)
    with pytest.raises(UserError, match="sliding_window must be an integer"):
        cfg.with_overrides(["sliding_window=wide"])
    assert ModelConfig.from_dict({**cfg.to_dict()}) == cfg


def test_no_window_is_unchanged(idx):
    """No window, or a window no shorter than the sequence, is plain causal attention, bit for bit."""
    base = style_config("llama3", 2, 64, 4, num_key_value_heads=2, vocab_size=V, block_size=64)
    model = randomize(Transformer(base))
    wide = Transformer(base.replace(sliding_window=S))
    wide.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(wide(idx), model(idx))
    assert hf.config_from_hf(mistral_config(window=None).to_dict()).sliding_window is None
    assert hf.config_to_hf(base)["model_type"] == "llama"


def test_llama_export_refuses_a_window(tmp_path):
    model = Transformer(style_config("llama3", 2, 32, 4, vocab_size=V, sliding_window=8))
    assert hf.default_architecture(model.config) == "mistral"
    with pytest.raises(UserError, match="no sliding window"):
        hf.save(model, tmp_path / "x", arch="llama")
    assert not (tmp_path / "x").exists()
