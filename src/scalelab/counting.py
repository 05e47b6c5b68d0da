"""Exact parameters and FLOPs, and estimated memory and time, for a ModelConfig.

Pure Python/numpy: no torch. The `*_arrays` functions take shapes as numbers *or numpy
arrays* (broadcasting), so the planner can evaluate a million shapes in one call; the
ModelConfig wrappers call them with scalars.

FLOPs convention (DESIGN.md): 2·m·n·k per matmul, exactly. Forward FLOPs for a sequence of S
tokens = 2·S·(weights of every matmul: Q, K, V, O, FFN, lm_head — not the embedding lookup)
+ per layer 4·S²·n_embd for QKᵀ and AV at the query-head count, with no causal discount.
Training = 3 × forward. This is what torch.utils.flop_counter.FlopCounterMode reports for the
model with explicit attention (tests/test_model.py proves it). A sliding attention window
(Mistral) does not change the count: the math path computes the full S×S score matrix and masks
it, and that is what FlopCounterMode counts; a kernel that skipped the masked blocks would do less.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scalelab.config import DEFAULT_LOSS_CHUNK_TOKENS, ModelConfig
from scalelab.hardware import Accelerator

# ---- parameters -----------------------------------------------------------------------------


def param_breakdown_arrays(n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size, *,
                           ffn_type: str = "swiglu", normalization: str = "rmsnorm", bias: bool = False,
                           tie_embeddings: bool = False, learned_positions: int = 0,
                           final_norm: bool = True, qkv_bias: bool = False) -> dict[str, Any]:
    """Parameter counts by component. Shapes may be numpy arrays (int64 arithmetic).
    `bias`: every Linear but lm_head has one (and LayerNorm too); `qkv_bias`: the Q, K and V
    projections have one even without `bias` (Qwen2). Biases are no matmul, so no FLOPs."""
    n_layer, n_embd, n_head, kv, d_ff, vocab = (np.asarray(x, dtype=np.int64) for x in
                                                (n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size))
    kv_dim = kv * (n_embd // n_head)
    b = 1 if bias else 0
    qkv_b = 1 if (bias or qkv_bias) else 0
    # Q and O are n_embd x n_embd; K and V are n_embd x kv_dim (GQA/MQA shrink only these).
    attention = 2 * n_embd * n_embd + 2 * n_embd * kv_dim + qkv_b * (n_embd + 2 * kv_dim) + b * n_embd
    n_in = 2 if ffn_type == "swiglu" else 1  # SwiGLU has gate and up projections
    ffn = (n_in + 1) * n_embd * d_ff + b * (n_in * d_ff + n_embd)
    norm = n_embd * (2 if (normalization == "layernorm" and bias) else 1)
    norms = n_layer * 2 * norm + (norm if final_norm else 0)
    token_embedding = vocab * n_embd
    position_embedding = np.int64(learned_positions) * n_embd
    lm_head = np.int64(0) if tie_embeddings else vocab * n_embd
    out = {
        "attention": n_layer * attention,
        "ffn": n_layer * ffn,
        "norms": norms,
        "token_embedding": token_embedding,
        "position_embedding": position_embedding,
        "lm_head": lm_head,
    }
    out["embedding"] = token_embedding + position_embedding + lm_head
    out["non_embedding"] = out["attention"] + out["ffn"] + norms
    out["total"] = out["embedding"] + out["non_embedding"]
    out["per_layer"] = attention + ffn + 2 * norm
    return out


def _shape_args(cfg: ModelConfig) -> tuple:
    return (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.num_key_value_heads, cfg.ffn_hidden, cfg.vocab_size)


def _style_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    return dict(ffn_type=cfg.ffn_type, normalization=cfg.normalization, bias=cfg.bias, qkv_bias=cfg.qkv_bias,
                tie_embeddings=cfg.tie_embeddings,
                learned_positions=cfg.block_size if cfg.position_encoding == "learned" else 0,
                final_norm=cfg.norm_position == "pre")


@dataclass(frozen=True)
class ParamCounts:
    total: int
    embedding: int  # token + learned position embeddings + untied lm_head (the vocabulary matrices)
    non_embedding: int  # everything else: attention, FFN, norms (Kaplan et al.'s N)
    breakdown: dict[str, int] = field(default_factory=dict)
    per_layer: int = 0


def count_params(cfg: ModelConfig) -> ParamCounts:
    """Exact parameter counts; `total` equals sum(p.numel()) of the torch model."""
    p = {k: int(v) for k, v in param_breakdown_arrays(*_shape_args(cfg), **_style_kwargs(cfg)).items()}
    breakdown = {k: p[k] for k in ("attention", "ffn", "norms", "token_embedding", "position_embedding",
                                   "lm_head")}
    return ParamCounts(total=p["total"], embedding=p["embedding"], non_embedding=p["non_embedding"],
                       breakdown=breakdown, per_layer=p["per_layer"])


# ---- FLOPs ----------------------------------------------------------------------------------


def matmul_weights_arrays(n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size, *,
                          ffn_type: str = "swiglu"):
    """Number of weights that take part in a matmul per token (lm_head counted even if tied,
    because the tied matrix is still multiplied; the embedding lookup is not a matmul)."""
    n_layer, n_embd, n_head, kv, d_ff, vocab = (np.asarray(x, dtype=np.int64) for x in
                                                (n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size))
    kv_dim = kv * (n_embd // n_head)
    n_mats = 3 if ffn_type == "swiglu" else 2
    per_layer = 2 * n_embd * n_embd + 2 * n_embd * kv_dim + n_mats * n_embd * d_ff
    return n_layer * per_layer + vocab * n_embd


def forward_flops_per_token_arrays(n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size,
                                   seq_len, *, ffn_type: str = "swiglu"):
    """Exact forward FLOPs per token at sequence length `seq_len` (see module docstring).
    Computed in float64 so a million shapes never overflow; exact below 2**53."""
    weights = matmul_weights_arrays(n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size,
                                    ffn_type=ffn_type).astype(np.float64)
    attention = 4.0 * np.asarray(n_layer, np.float64) * np.asarray(seq_len, np.float64) * np.asarray(
        n_embd, np.float64)
    return 2.0 * weights + attention


def training_flops_per_token_arrays(*args, **kwargs):
    """3 × forward: the backward pass costs two forwards (grad wrt inputs and wrt weights)."""
    return 3.0 * forward_flops_per_token_arrays(*args, **kwargs)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    s = cfg.block_size if seq_len is None else seq_len
    return int(forward_flops_per_token_arrays(*_shape_args(cfg), s, ffn_type=cfg.ffn_type))


def forward_flops(cfg: ModelConfig, batch_size: int, seq_len: int) -> int:
    """Forward FLOPs of one (batch_size, seq_len) batch, exactly as FlopCounterMode counts them."""
    weights = int(matmul_weights_arrays(*_shape_args(cfg), ffn_type=cfg.ffn_type))
    return batch_size * (2 * seq_len * weights + 4 * cfg.n_layer * seq_len * seq_len * cfg.n_embd)


def training_flops(cfg: ModelConfig, batch_size: int, seq_len: int) -> int:
    return 3 * forward_flops(cfg, batch_size, seq_len)


def training_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    return 3 * forward_flops_per_token(cfg, seq_len)


# The field's shortcuts for training FLOPs per token, each as its source's own code or paper computes
# it, with the N that source counts (L layers, H = n_embd, S the sequence length):
FLOPS_SHORTCUTS: dict[str, str] = {
    # Hoffmann et al. 2022 (Chinchilla) use C = 6ND with N every parameter, embeddings included.
    "training_per_token_6n": "6N, N all parameters (Chinchilla)",
    # Kaplan et al. 2020 (eq. 2.1): C = 6N per token with N the non-embedding parameters.
    "training_per_token_6n_non_embedding": "6N, N non-embedding (Kaplan)",
    # nanoGPT model.py estimate_mfu ("PaLM Appendix B"): flops_per_token = 6*N + 12*L*H*Q*T with
    # N = get_num_params(non_embedding=True), which subtracts only the position embeddings (wpe):
    # GPT-2's token embedding is its tied lm_head, so it stays. (nanoGPT takes T = block_size.)
    "training_per_token_nanogpt": "6(N - positions) + 12·L·H·S (nanoGPT, PaLM App. B)",
    # torchtitan get_num_flop_per_token: 6 * num_params + 12 * l * h * q * t, with num_params from
    # get_num_params(model, exclude_embedding=True), which subtracts the nn.Embedding (the token
    # embedding). For an untied model without biases this is the exact count plus 6 x the norms.
    "training_per_token_torchtitan": "6(N - token emb.) + 12·L·H·S (torchtitan)",
    # Megatron-LM training.py num_floating_point_operations (transformer_flops): 3 x 2 x every GEMM's
    # m·n·k -- Q, K, V, O, the FFN and the logits, at their own widths (GQA- and SwiGLU-aware) -- and
    # core attention at seq_length / 2 ("causal mask, only half of the mask is non-zero"); norms,
    # biases and the embedding lookup are no GEMM. (Megatron pads the vocabulary; we do not.)
    "training_per_token_megatron": "6·GEMM weights + 6·L·H·S, causal (Megatron-LM)",
}


def flops_report(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, Any]:
    """Exact FLOPs per token and the field's shortcuts (FLOPS_SHORTCUTS) beside them."""
    s = cfg.block_size if seq_len is None else seq_len
    n = count_params(cfg)
    fwd = forward_flops_per_token(cfg, s)
    attn_term = 12 * cfg.n_layer * cfg.n_embd * s  # 3 passes x 2·(QKᵀ and AV) x L·S·H per token, no causal discount
    gemm_weights = int(matmul_weights_arrays(*_shape_args(cfg), ffn_type=cfg.ffn_type))
    return {
        "seq_len": s,
        "forward_per_token": fwd,
        "training_per_token": 3 * fwd,
        "training_per_token_6n": 6 * n.total,
        "training_per_token_6n_non_embedding": 6 * n.non_embedding,
        "training_per_token_nanogpt": 6 * (n.total - n.breakdown["position_embedding"]) + attn_term,
        "training_per_token_torchtitan": 6 * (n.total - n.breakdown["token_embedding"]) + attn_term,
        "training_per_token_megatron": 6 * gemm_weights + attn_term // 2,
        "attention_share": 4 * cfg.n_layer * s * cfg.n_embd / fwd,
    }


def gqa_comparison(cfg: ModelConfig, seq_len: int | None = None, kv_bytes: int = 2) -> dict[str, Any]:
    """What this model's KV-head count saves against the same model with full MHA."""
    mha = cfg.replace(num_key_value_heads=cfg.n_head)
    p, p_mha = count_params(cfg).total, count_params(mha).total
    f, f_mha = training_flops_per_token(cfg, seq_len), training_flops_per_token(mha, seq_len)
    kv, kv_mha = kv_cache_bytes_per_token(cfg, kv_bytes), kv_cache_bytes_per_token(mha, kv_bytes)
    return {
        "attention_type": cfg.attention_type,
        "params": p, "params_mha": p_mha, "params_saved": p_mha - p, "params_saved_fraction": (p_mha - p) / p_mha,
        "training_flops_per_token": f, "training_flops_per_token_mha": f_mha,
        "flops_saved_fraction": (f_mha - f) / f_mha,
        "kv_cache_bytes_per_token": kv, "kv_cache_bytes_per_token_mha": kv_mha,
        "kv_cache_reduction": kv_mha / kv,
    }


# ---- memory ---------------------------------------------------------------------------------

# Bytes per parameter for (weights, gradients, optimizer state incl. any fp32 master copy),
# with AdamW (two fp32 moments).
PRECISIONS: dict[str, tuple[int, int, int]] = {
    "fp32": (4, 4, 8),  # everything fp32
    "bf16-mixed": (4, 4, 8),  # torch.autocast: fp32 weights+grads, bf16 matmuls (activations bf16)
    "bf16": (2, 2, 12),  # bf16 weights+grads, fp32 master copy + moments (Megatron/DeepSpeed style)
}
ACTIVATION_BYTES = {"fp32": 4, "bf16-mixed": 2, "bf16": 2}
SHARDINGS = ("none", "ddp", "fsdp")


def activation_bytes_per_token(n_embd, kv_dim, d_ff, n_head, seq_len, *, ffn_type="swiglu",
                               normalization="rmsnorm", residual_bytes=4, compute_bytes=2,
                               autocast=False, attention="sdpa"):
    """Bytes that autograd saves for backward per token, in one pre-norm block and after the last
    block (final norm and lm_head input; the logits are counted by the caller): `(block, head)`.

    This is the tensor-by-tensor list of what our model keeps, checked exactly against
    `torch.autograd.graph.saved_tensors_hooks` on the SDPA path (tests/test_memory.py):
    - each norm: its input, in the residual stream's dtype (fp32 under autocast), and its
      per-token statistics in fp32 (RMSNorm 1, LayerNorm 2);
    - each Linear: its input in the compute dtype. Autocast casts the normed activations once per
      consuming Linear, so q_proj, k_proj and v_proj (and SwiGLU's gate and up) each keep a copy;
    - attention: Q and K after RoPE (without RoPE: Q and K as projected), and V; SDPA
      keeps its output and one fp32 log-sum-exp per head and token, no S×S matrix;
    - FFN: SwiGLU keeps gate, up, silu(gate) and their product (4·d_ff); GELU its input and
      output (2·d_ff).
    Not per token, so not here: RoPE's cos/sin tables, and (under autocast) the bf16 copy of
    every weight, which training_memory counts as `weight_copies`.
    On CUDA and MPS, RMSNorm is one fused kernel (input and statistics saved); PyTorch's CPU
    composite also keeps the normalised input, one more residual-dtype vector per norm.
    The math attention path keeps the fp32 softmax (plus its copy in a 16-bit compute dtype),
    n_head·S per token, instead of the log-sum-exp, and K and V as the matmuls copy them (repeated
    to n_head under GQA) instead of rotated K and V; it also keeps a bool S×S causal mask per layer (not per
    token, not counted). It is the FLOP-counting reference rather than a training path.
    """
    r, c = residual_bytes, compute_bytes
    stats = 4 * (2 if normalization == "layernorm" else 1)

    def norm(consumers):
        return r * n_embd + stats + c * n_embd * (consumers if autocast else 1)

    attn = norm(3) + c * (n_embd + 2 * kv_dim) + c * n_embd + 4 * n_head  # Q, K, V; output; log-sum-exp
    if attention == "math":  # Q, K and V as the two matmuls keep them: K and V at n_head heads
        attn = norm(3) + 4 * c * n_embd + n_head * seq_len * (4 + (c if c != 4 else 0))
    ffn = norm(2 if ffn_type == "swiglu" else 1) + (4 if ffn_type == "swiglu" else 2) * c * d_ff
    head = norm(1) + 8  # final norm + lm_head input; token ids for the embedding (int64)
    return attn + ffn, head


def loss_bytes(tokens, vocab_size, compute_bytes: int, loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS):
    """Bytes the loss holds at its peak for `tokens` tokens (numbers or numpy arrays), measured with
    the profiler's allocator events in tests/test_chunked_loss.py.

    Unchunked (loss_chunk_tokens 0), per token: the targets (int64) and, per vocabulary entry, 12
    bytes whatever the compute dtype: at log_softmax's backward the fp32 log-probabilities that
    cross_entropy saved, their gradient from nll_loss and the logits' gradient, all fp32, are live
    at once (the compute-dtype logits are not, once the caller drops them, as the trainer does).
    Chunked (model.score_chunk): one chunk of min(chunk, tokens) rows at a time, each holding an
    fp32 [rows × vocab] buffer (logits, made softmax and then gradient in place) and, for a 16-bit
    compute dtype, the logits and then the gradient in that dtype beside it; nothing per vocabulary
    entry is kept for backward. lm_head's weight gradient, formed in that forward, is counted in
    `gradients`; the hidden states' gradient replaces the lm_head input in activation_bytes_per_token.
    Not counted on either path: weight-sized transients (the compute-dtype weight gradient before
    its cast to fp32, under autocast).
    """
    if not loss_chunk_tokens:
        return tokens * (8 + vocab_size * 12)
    rows = np.minimum(np.asarray(tokens, dtype=np.float64), loss_chunk_tokens)
    return rows * vocab_size * (4 + (compute_bytes if compute_bytes != 4 else 0))


def training_memory(cfg: ModelConfig, *, micro_batch: int = 1, seq_len: int | None = None,
                    num_devices: int = 1, sharding: str = "fsdp", precision: str = "bf16-mixed",
                    activation_checkpointing: bool = False, attention: str = "sdpa",
                    loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS) -> dict[str, Any]:
    """Estimated peak training memory per device, in bytes, by component.

    Weights, gradients and optimizer state are exact given the precision; activations are what
    autograd keeps, tensor by tensor (activation_bytes_per_token, proven against PyTorch), plus
    what the loss holds (loss_bytes): unchunked, the logits' fp32 log-probabilities and two fp32
    gradients at its backward; with `loss_chunk_tokens` > 0 (the model's default), one chunk's
    logits. Under autocast (bf16-mixed without
    FSDP) `weight_copies` is the bf16 copy of every matmul weight that autocast makes and
    backward keeps. FSDP (ZeRO-3) shards weights, gradients and
    optimizer state over devices, and holds two unsharded blocks at a time (current + prefetch).
    DDP replicates everything. Activations never shard under data parallelism.
    """
    s = cfg.block_size if seq_len is None else seq_len
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {', '.join(SHARDINGS)}")
    parts = training_memory_arrays(*_shape_args(cfg), seq_len=s, micro_batch=micro_batch,
                                   num_devices=num_devices, sharding=sharding, precision=precision,
                                   activation_checkpointing=activation_checkpointing, attention=attention,
                                   loss_chunk_tokens=loss_chunk_tokens, **_style_kwargs(cfg))
    out: dict[str, Any] = {k: float(v) for k, v in parts.items()}
    out.update(micro_batch=micro_batch, seq_len=s, num_devices=num_devices, sharding=sharding,
               precision=precision, activation_checkpointing=activation_checkpointing,
               loss_chunk_tokens=loss_chunk_tokens)
    return out


def training_memory_arrays(n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size, *, seq_len: int,
                           micro_batch: int = 1, num_devices: int = 1, sharding: str = "fsdp",
                           precision: str = "bf16-mixed", activation_checkpointing: bool = False,
                           attention: str = "sdpa", loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS,
                           **style: Any) -> dict[str, Any]:
    """`training_memory` over numpy arrays of shapes (the planner's memory filter), same model.
    `style` takes param_breakdown_arrays' keywords (ffn_type, normalization, bias, ...).
    Returns bytes per device by component as float64 arrays."""
    wb, gb, ob = PRECISIONS[precision]
    p = param_breakdown_arrays(n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size, **style)
    total_params = p["total"].astype(np.float64)
    shards = num_devices if sharding == "fsdp" else 1
    # How the trainer runs each precision: fp32 throughout; bf16-mixed is torch.autocast over fp32
    # weights, except under FSDP, where MixedPrecisionPolicy gathers bf16 weights and the whole
    # forward (residual stream included) runs in bf16 with no casts; bf16 is bf16 weights.
    autocast = precision == "bf16-mixed" and sharding != "fsdp"
    residual = 4 if precision == "fp32" or autocast else 2
    compute_bytes = ACTIVATION_BYTES[precision]
    copies = (2.0 * matmul_weights_arrays(n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size,
                                          ffn_type=style.get("ffn_type", "swiglu"))
              if autocast else np.zeros_like(total_params))
    n_layer, n_embd, n_head, kv, d_ff, vocab = (np.asarray(x, dtype=np.float64) for x in
                                                (n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size))
    unsharded = (2.0 * p["per_layer"] * compute_bytes if sharding == "fsdp" and num_devices > 1
                 else np.zeros_like(total_params))
    tokens = micro_batch * seq_len
    per_layer, head = activation_bytes_per_token(
        n_embd, kv * (n_embd // n_head), d_ff, n_head, seq_len, ffn_type=style.get("ffn_type", "swiglu"),
        normalization=style.get("normalization", "rmsnorm"),
        residual_bytes=residual, compute_bytes=compute_bytes, autocast=autocast, attention=attention)
    if activation_checkpointing:  # each block's input, plus one block's activations while it is recomputed
        layer_acts = tokens * (n_layer * residual * n_embd + per_layer)
    else:
        layer_acts = tokens * n_layer * per_layer
    activations = layer_acts + tokens * head + loss_bytes(tokens, vocab, compute_bytes, loss_chunk_tokens)
    out = {"weights": total_params * wb / shards, "gradients": total_params * gb / shards,
           "optimizer": total_params * ob / shards, "unsharded_buffers": unsharded, "weight_copies": copies,
           "activations": activations}
    out["total"] = sum(out.values())
    return out


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_element: int = 2) -> int:
    """Inference KV cache: K and V for every layer, at the KV-head count (GQA-aware)."""
    return 2 * cfg.n_layer * cfg.kv_dim * bytes_per_element


# ---- time -----------------------------------------------------------------------------------


def training_time(training_flops_per_token: float, tokens: float, accelerator: Accelerator,
                  num_devices: int = 1, mfu: float = 0.4) -> dict[str, float]:
    """Throughput and wall-clock at a given model FLOPs utilisation (MFU)."""
    per_device = mfu * accelerator.peak_bf16_flops / training_flops_per_token
    seconds = tokens / (per_device * num_devices)
    return {
        "tokens_per_second_per_device": per_device,
        "tokens_per_second": per_device * num_devices,
        "seconds": seconds, "hours": seconds / 3600, "days": seconds / 86400,
        "gpu_hours": seconds * num_devices / 3600,
        "mfu": mfu, "num_devices": num_devices, "gpu_type": accelerator.name,
        "total_flops": training_flops_per_token * tokens,
    }


def mfu(tokens_per_second: float, training_flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the hardware's dense peak."""
    return tokens_per_second * training_flops_per_token / peak_flops
