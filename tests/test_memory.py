"""counting.training_memory's activations are what autograd really keeps.

Independent truth: `torch.autograd.graph.saved_tensors_hooks` sees every tensor saved for backward
during a training forward; we sum their distinct storages (parameters excluded) and compare to
the counting module's prediction for the same shape, precision and trainer regime, to the byte.

Known differences, computed here explicitly rather than hidden in a tolerance:
- tensors that do not grow with the batch: RoPE's cos/sin tables (in the model's dtype), learned-position ids, the
  math path's causal mask;
- `weight_copies` (autocast's bf16 copy of each matmul weight) is its own component;
- the loss (counting.loss_bytes counts what it holds at its peak, not what it saves): unchunked, it
  saves the targets, the fp32 log-probabilities and a scalar, but not the two fp32 gradients live
  at its backward; chunked, it saves nothing per vocabulary entry, but saves lm_head's weight
  gradient (which training_memory counts in `gradients`), and autocast's bf16 copy of the lm_head
  weight is only a transient of its forward;
- on the CPU, PyTorch runs RMSNorm as a composite that saves its input in fp32 (a copy, for a
  bf16 input) and the fp32 normalised input; counting's device="cpu" counts that
  (counting.cpu_rms_norm_extra_bytes), and CUDA runs the fused kernel its default describes.
"""

from __future__ import annotations

import pytest
import torch

from scalelab import counting
from scalelab.config import ModelConfig
from scalelab.model import Transformer

B, S = 2, 48

LLAMA = dict(n_layer=2, n_embd=96, n_head=6, num_key_value_heads=2, d_ff=256, vocab_size=384, block_size=S)
GPT2 = dict(n_layer=2, n_embd=96, n_head=4, d_ff=384, vocab_size=320, block_size=S, ffn_type="gelu",
            normalization="layernorm", position_encoding="learned", bias=True, tie_embeddings=True)


def saved_bytes(model: torch.nn.Module, precision: str) -> int:
    """Bytes of distinct non-parameter storages saved for backward by one forward + loss, measured
    when the forward has returned (FSDP2 has then freed the gathered weights it resharded)."""
    params = {(p.to_local() if hasattr(p, "to_local") else p).untyped_storage().data_ptr()
              for p in model.parameters()}
    storages: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params and not isinstance(t, torch.nn.Parameter):
            storages[s.data_ptr()] = s
        return t

    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    idx, targets = (torch.randint(0, vocab, (B, S), generator=g) for _ in range(2))
    targets[0, :5] = -1  # ignored targets change nothing saved
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        _, loss = model(idx, targets)
    assert loss.requires_grad
    return sum(s.nbytes() for s in storages.values())


def fixed_bytes(cfg: ModelConfig, rope_bytes: int = 4) -> int:
    """Saved tensors that do not scale with B·S (listed in the module docstring)."""
    n = 0
    if cfg.position_encoding == "rope":
        n += 2 * S * cfg.head_dim * rope_bytes  # cos and sin, in the model's dtype (fp32 under autocast)
    else:
        n += S * 8  # position ids, int64
    return n


def loss_saved_bytes(cfg: ModelConfig, chunk: int, weight_bytes: int, autocast: bool) -> int:
    """What the loss saves for backward (the module docstring's list)."""
    tokens, vocab_weights = B * S, cfg.vocab_size * cfg.n_embd
    if not chunk:
        return tokens * (8 + 4 * cfg.vocab_size) + 4  # targets, fp32 log-probabilities, total weight
    return weight_bytes * vocab_weights - (2 * vocab_weights if autocast else 0)


@pytest.mark.parametrize("chunk", [0, 32])
@pytest.mark.parametrize("attention", ["sdpa", "math"])
@pytest.mark.parametrize("regime", ["fp32", "bf16-mixed", "fsdp-bf16"])
@pytest.mark.parametrize("shape", ["llama", "llama-mha", "gpt2"])
def test_activation_memory_equals_saved_tensors(shape, regime, attention, chunk):
    fields = {"llama": LLAMA, "llama-mha": {**LLAMA, "num_key_value_heads": LLAMA["n_head"]}, "gpt2": GPT2}[shape]
    cfg = ModelConfig(**fields)
    torch.manual_seed(0)
    model = Transformer(cfg, attention=attention, loss_chunk_tokens=chunk)
    precision, sharding = {"fp32": ("fp32", "none"), "bf16-mixed": ("bf16-mixed", "none"),
                           "fsdp-bf16": ("bf16-mixed", "fsdp")}[regime]
    if regime == "fsdp-bf16":  # what MixedPrecisionPolicy(param_dtype=bf16) computes with;
        model = model.to(torch.bfloat16)  # test_real_fsdp2_* proves real FSDP2 saves the same
    got = saved_bytes(model, precision if regime != "fsdp-bf16" else "none")

    m = counting.training_memory(cfg, micro_batch=B, seq_len=S, precision=precision, sharding=sharding,
                                 attention=attention, loss_chunk_tokens=chunk, device="cpu")
    tokens = B * S
    residual = 2 if regime == "fsdp-bf16" else 4
    loss_saved = loss_saved_bytes(cfg, chunk, weight_bytes=residual, autocast=regime == "bf16-mixed")
    expected = m["activations"] + loss_saved + m["weight_copies"] + fixed_bytes(cfg, rope_bytes=residual)
    if regime == "fsdp-bf16" and cfg.normalization == "layernorm":
        expected -= tokens * (2 * cfg.n_layer + 1) * 2 * (4 - 2)  # CPU LayerNorm statistics in bf16
    if attention == "math":
        expected += cfg.n_layer * S * S  # the causal mask, bool, one per layer
    assert got == expected, (got, expected, got - expected)


def test_autocast_weight_copies_are_real():
    """Under autocast the bf16 weight copies are saved for backward: the measured total grows by
    exactly 2 bytes per matmul weight over the per-token activations."""
    cfg = ModelConfig(**LLAMA)
    model = Transformer(cfg, loss_chunk_tokens=0)
    fp32, mixed = saved_bytes(model, "fp32"), saved_bytes(model, "bf16-mixed")
    a = counting.training_memory(cfg, micro_batch=B, seq_len=S, precision="fp32", sharding="none", loss_chunk_tokens=0)
    b = counting.training_memory(cfg, micro_batch=B, seq_len=S, precision="bf16-mixed", sharding="none",
                                 loss_chunk_tokens=0)
    assert a["weight_copies"] == 0 and b["weight_copies"] > 0
    # the only differences: per-token activations and the weight copies (the composite RMSNorm
    # extra is fp32 in both; the unchunked loss holds the same fp32 buffers in both)
    assert mixed - fp32 == b["activations"] - a["activations"] + b["weight_copies"]


@pytest.fixture
def one_process_group():
    """A real one-rank gloo process group, so FSDP2 runs for real in this process."""
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("attention", ["sdpa", "math"])
@pytest.mark.parametrize("shape", ["llama", "gpt2"])
def test_real_fsdp2_saves_the_bf16_model_plus_the_gathered_last_block(one_process_group, shape, attention):
    """The "fsdp-bf16" regime above casts the model to bf16 instead of running FSDP2. Here the
    trainer's own `apply_fsdp` (fully_shard per block and root, bf16 MixedPrecisionPolicy) runs for
    real: what autograd keeps once forward has returned is exactly the bf16 model's saved tensors
    plus the last block's gathered bf16 weights, which apply_fsdp deliberately leaves unsharded
    for backward (earlier blocks' gathered weights are freed at their reshard)."""
    from scalelab.train.parallel import apply_fsdp

    cfg = ModelConfig(**{"llama": LLAMA, "gpt2": GPT2}[shape])
    torch.manual_seed(0)
    simulated = saved_bytes(Transformer(cfg, attention=attention).to(torch.bfloat16), "none")
    torch.manual_seed(0)
    model = apply_fsdp(Transformer(cfg, attention=attention), 1, torch.device("cpu"), torch.bfloat16)
    real = saved_bytes(model, "none")
    last_block_matmul_weights = sum(m.weight.numel() for m in Transformer(cfg).layers[-1].modules()
                                    if isinstance(m, torch.nn.Linear))
    assert real == simulated + 2 * last_block_matmul_weights, (real, simulated)
