"""The torch Transformer against independent truths: official parameter counts (via the
counting module, itself checked against the released checkpoints), FlopCounterMode, its own
explicit-math attention, and no-cache decoding. Hugging Face equality is in test_hf.py."""

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from scalelab import counting
from scalelab.config import ModelConfig
from scalelab.errors import UserError
from scalelab.model import KVCache, Transformer, sample_next_token
from scalelab.presets import PRESETS, style_config

V = 101  # a vocabulary no matrix dimension divides, so a transposed mapping cannot pass by accident

SMALL = {
    "llama2-mha": style_config("llama2", 2, 64, 4, vocab_size=V, block_size=64),
    "llama3-gqa": style_config("llama3", 2, 64, 8, num_key_value_heads=2, vocab_size=V, block_size=64),
    "mqa": style_config("llama3", 3, 48, 4, num_key_value_heads=1, vocab_size=V, block_size=64, d_ff=80),
    "llama3.2-tied": style_config("llama3", 2, 64, 4, num_key_value_heads=2, vocab_size=V, block_size=64,
                                  tie_embeddings=True,
                                  rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral-window": style_config("llama2", 2, 64, 4, num_key_value_heads=2, vocab_size=V, block_size=64,
                                   family="mistral", sliding_window=6),
    "qwen2-qkv-bias-tied": style_config("llama3", 2, 64, 4, num_key_value_heads=2, vocab_size=V, block_size=64,
                                        family="qwen2", qkv_bias=True, tie_embeddings=True, norm_eps=1e-6),
    "gpt2": style_config("gpt2", 2, 64, 4, vocab_size=V, block_size=64),
    "gpt2-untied": style_config("gpt2", 2, 64, 4, vocab_size=V, block_size=64, tie_embeddings=False),
    "post-norm-layernorm-nobias": ModelConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=V, block_size=64,
                                              normalization="layernorm", norm_position="post", bias=False,
                                              ffn_type="gelu", position_encoding="learned"),
}


def randomize(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Weights big enough that logits are O(1), and norm weights/biases that are not 1/0, so a
    wrong mapping or a missing term shows up."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + std * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model


@pytest.mark.parametrize("name", list(PRESETS))
def test_meta_model_parameter_count_equals_counting(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == counting.count_params(cfg).total


def test_parameter_structure_follows_config():
    gpt2 = Transformer(SMALL["gpt2"])
    assert gpt2.lm_head.weight is gpt2.tok_embeddings.weight and gpt2.lm_head.bias is None
    assert gpt2.layers[0].attn_norm.bias is not None and gpt2.pos_embeddings is not None
    post = Transformer(SMALL["post-norm-layernorm-nobias"])
    assert post.norm is None and post.layers[0].attn_norm.bias is None  # post-norm: no final norm
    llama = Transformer(SMALL["llama3-gqa"])
    assert isinstance(llama.norm, torch.nn.RMSNorm) and llama.pos_embeddings is None
    assert llama.layers[1].attn.kv_proj.weight.shape == (2 * 2 * 8, 64)  # 2 KV heads of dim 8, K and V
    assert isinstance(llama.layers, torch.nn.ModuleList) and len(llama.layers) == 2


@pytest.mark.parametrize("name", list(SMALL))
def test_flop_counter_equals_counting(name):
    cfg = SMALL[name]
    model = Transformer(cfg, attention="math")
    B, S = 2, 24
    idx = torch.randint(0, V, (B, S))
    with FlopCounterMode(display=False) as forward:
        model(idx)
    assert forward.get_total_flops() == counting.forward_flops(cfg, B, S)
    with FlopCounterMode(display=False) as training:
        _, loss = model(idx, idx)
        loss.backward()
    assert training.get_total_flops() == counting.training_flops(cfg, B, S)


@pytest.mark.parametrize("name", ["llama3-gqa", "mqa", "llama2-mha", "gpt2", "mistral-window"])
def test_sdpa_equals_math_attention(name):
    cfg = SMALL[name]
    math_model = randomize(Transformer(cfg, attention="math"))
    sdpa_model = Transformer(cfg, attention="sdpa")
    sdpa_model.load_state_dict(math_model.state_dict())
    idx = torch.randint(0, V, (3, 40))
    torch.testing.assert_close(sdpa_model(idx), math_model(idx), atol=1e-5, rtol=0)


def test_attention_is_causal():
    model = randomize(Transformer(SMALL["llama3-gqa"]))
    idx = torch.randint(0, V, (1, 20))
    changed = idx.clone()
    changed[0, 15:] = (changed[0, 15:] + 1) % V
    torch.testing.assert_close(model(idx)[:, :15], model(changed)[:, :15], atol=1e-6, rtol=0)
    assert not torch.allclose(model(idx)[:, 15:], model(changed)[:, 15:])


@pytest.mark.parametrize("loss_chunk_tokens", [0, 3])
def test_loss_is_mean_cross_entropy_over_targets_not_minus_one(loss_chunk_tokens):
    model = randomize(Transformer(SMALL["gpt2"], loss_chunk_tokens=loss_chunk_tokens))
    idx = torch.randint(0, V, (2, 10))
    targets = torch.randint(0, V, (2, 10))
    targets[0, :4] = -1
    logits, loss = model(idx, targets)
    logp = torch.log_softmax(model(idx).double(), dim=-1)
    keep = targets != -1
    expected = -logp[keep].gather(-1, targets[keep][:, None]).mean()
    if loss_chunk_tokens:  # the chunked loss never forms the logits
        assert logits is None
    else:
        assert logits.shape == (2, 10, V)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["llama3-gqa", "mqa", "gpt2", "llama3.2-tied", "mistral-window"])
@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_kv_cache_chunks_equal_full_forward(name, attention):
    """Prefill, a 5-token chunk and single tokens through the cache = one full forward."""
    model = randomize(Transformer(SMALL[name], attention=attention))
    idx = torch.randint(0, V, (2, 20))
    full = model(idx)
    cache = KVCache(model.config.n_layer, 20)
    parts = [model(idx[:, :12], kv_cache=cache), model(idx[:, 12:17], kv_cache=cache)]
    parts += [model(idx[:, i:i + 1], kv_cache=cache) for i in range(17, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    # only the KV heads are stored
    assert cache.k[0].shape == (2, SMALL[name].num_key_value_heads, 20, SMALL[name].head_dim)


@pytest.mark.parametrize("name", ["llama3-gqa", "gpt2", "mistral-window"])
def test_greedy_generation_with_cache_equals_without(name):
    model = randomize(Transformer(SMALL[name]), std=0.3)  # peaked logits: argmax ties are unlikely
    prompt = torch.randint(0, V, (2, 7))
    cached = model.generate(prompt, 25, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 25, temperature=0, use_cache=False)
    assert cached.shape == (2, 32) and torch.equal(cached[:, :7], prompt)
    assert torch.equal(cached, uncached)



@pytest.mark.parametrize("name", ["llama3-gqa", "gpt2"])
def test_greedy_generation_past_block_size_slides_the_window(name):
    """Past block_size (64) generate() turns the cache off and re-reads the last 64 tokens each
    step; equal to a brute-force loop of full forwards over the sliding window."""
    model = randomize(Transformer(SMALL[name]), std=0.3)
    prompt = torch.randint(0, V, (2, 7))
    out = model.generate(prompt, 70, temperature=0, use_cache=True)
    expected = prompt
    with torch.no_grad():
        for _ in range(70):
            logits = model(expected[:, -64:])
            expected = torch.cat((expected, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert out.shape == (2, 77) and torch.equal(out, expected)


def test_sampling_controls():
    torch.manual_seed(0)
    logits = torch.randn(4, V) * 3
    greedy = logits.argmax(-1, keepdim=True)
    assert torch.equal(sample_next_token(logits, 0.0), greedy)
    assert torch.equal(sample_next_token(logits, 1.0, top_k=1), greedy)
    assert torch.equal(sample_next_token(logits, 1.0, top_p=1e-6), greedy)
    top5 = logits.topk(5).indices
    for _ in range(20):
        tok = sample_next_token(logits, 1.5, top_k=5)
        assert (tok == top5).any(dim=-1).all()
    # top_p keeps the smallest prefix of sorted tokens whose mass reaches p
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(descending=True)
    need = (sorted_probs.cumsum(-1) < 0.7).sum(-1) + 1
    for _ in range(20):
        tok = sample_next_token(logits, 1.0, top_p=0.7)
        rank = (order == tok).float().argmax(-1)
        assert (rank < need).all()
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(UserError):
            sample_next_token(logits, **bad)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    model = randomize(Transformer(SMALL["mqa"]))
    prompt = torch.randint(0, V, (1, 3))
    assert torch.equal(model.generate(prompt, 10, top_k=20, top_p=0.9, generator=g1),
                       model.generate(prompt, 10, top_k=20, top_p=0.9, generator=g2))


def test_init_weights_gpt2_style_and_meta_materialisation():
    cfg = style_config("llama3", 4, 256, 4, vocab_size=V, block_size=64, tie_embeddings=True)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.tok_embeddings.weight  # tying survives to_empty
    for p in model.parameters():
        assert p.device.type == "cpu" and torch.isfinite(p).all()
    residual = torch.cat([torch.cat([b.attn.o_proj.weight.flatten(), b.ffn.down.weight.flatten()])
                          for b in model.layers])
    other = torch.cat([b.attn.q_proj.weight.flatten() for b in model.layers])
    assert residual.std().item() == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.02)
    assert other.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert torch.equal(model.norm.weight, torch.ones(256))
    idx, targets = torch.randint(0, V, (2, 16)), torch.randint(0, V, (2, 16))
    _, loss = model(idx, targets)
    assert loss.item() == pytest.approx(math.log(V), rel=0.05)  # small init: near-uniform predictions


def test_rope_frequencies_survive_dtype_cast():
    """A bf16 round trip of the module must not round the RoPE frequencies (a buffer would be)."""
    model = randomize(Transformer(SMALL["llama3-gqa"]))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())  # weights survive the round trip exactly
    idx = torch.randint(0, V, (1, 60))
    reference = model(idx)
    model.to(torch.bfloat16).to(torch.float32)
    assert model._rope[0].dtype == torch.float32
    torch.testing.assert_close(model(idx), reference, atol=0.0, rtol=0.0)


def test_bad_attention_implementation():
    with pytest.raises(UserError, match="attention must be one of"):
        Transformer(SMALL["gpt2"], attention="flash")


def test_learned_positions_limit():
    model = Transformer(SMALL["gpt2"])
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_lazy_public_import_does_not_load_torch_until_needed():
    code = ("import sys, scalelab; assert 'torch' not in sys.modules; "
            "from scalelab import Transformer; assert 'torch' in sys.modules; print(Transformer.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "scalelab.model"


@st.composite
def small_configs(draw):
    n_kv = draw(st.sampled_from([1, 2, 4]))
    n_head = n_kv * draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    return ModelConfig(
        n_layer=draw(st.integers(1, 3)), n_head=n_head, num_key_value_heads=n_kv, n_embd=n_head * head_dim,
        vocab_size=draw(st.integers(2, 50)), block_size=16, d_ff=draw(st.integers(1, 40)),
        normalization=draw(st.sampled_from(["layernorm", "rmsnorm"])),
        position_encoding=draw(st.sampled_from(["learned", "rope"])),
        ffn_type=draw(st.sampled_from(["gelu", "swiglu"])), norm_position=draw(st.sampled_from(["pre", "post"])),
        bias=draw(st.booleans()), qkv_bias=draw(st.booleans()), tie_embeddings=draw(st.booleans()),
        sliding_window=draw(st.sampled_from([None, 1, 3])))


@settings(max_examples=15, deadline=None)
@given(cfg=small_configs(), batch=st.integers(1, 2), seq=st.integers(1, 16))
def test_any_config_counts_and_flops_match(cfg, batch, seq):
    model = Transformer(cfg, attention="math")
    assert sum(p.numel() for p in model.parameters()) == counting.count_params(cfg).total
    idx = torch.randint(0, cfg.vocab_size, (batch, seq))
    with FlopCounterMode(display=False) as training:
        _, loss = model(idx, idx)
        loss.backward()
    assert training.get_total_flops() == counting.training_flops(cfg, batch, seq)


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -0.5])
def test_sampling_refuses_temperatures_that_are_not_finite_and_non_negative(temperature):
    from scalelab.errors import UserError
    from scalelab.model import sample_next_token

    with pytest.raises(UserError, match="temperature"):
        sample_next_token(torch.zeros(1, 5), temperature)
