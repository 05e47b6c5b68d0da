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
                               normalization="rmsnorm", rope=True, residual_bytes=4, compute_bytes=2,
                               autocast=False, attention="sdpa"):
    """Bytes that autograd saves for backward per token, in one pre-norm block and after the last
    block (final norm and lm_head input; the logits are counted by the caller): `(block, head)`.

    This is the tensor-by-tensor list of what our model keeps, checked exactly against
    `torch.autograd.graph.saved_tensors_hooks` on the SDPA path (tests/test_memory.py):
    - each norm: its input, in the residual stream's dtype (fp32 under autocast), and its
      per-token statistics in fp32 (RMSNorm 1, LayerNorm 2);
    - each Linear: its input in the compute dtype. Autocast casts the normed activations once per
      consuming Linear, so q_proj and kv_proj (and SwiGLU's gate and up) each keep a copy;
    - attention: Q, and K after RoPE, plus the packed [K | V] projection that V is a view of; SDPA
      keeps its output and one fp32 log-sum-exp per head and token, no S×S matrix;
    - FFN: SwiGLU keeps gate, up, silu(gate) and their product (4·d_ff); GELU its input and
      output (2·d_ff).
    Not per token, so not here: RoPE's cos/sin tables, and (under autocast) the bf16 copy of
    every weight, which training_memory counts as `weight_copies`.
    On CUDA and MPS, RMSNorm is one fused kernel (input and statistics saved); PyTorch's CPU
    composite also keeps the normalised input, one more residual-dtype vector per norm.
    The math attention path keeps the fp32 softmax (plus its copy in a 16-bit compute dtype),
    n_head·S per token, instead of the log-sum-exp, and K and V as the matmuls copy them (repeated
    to n_head under GQA) instead of rotated K and [K | V]; it also keeps a bool S×S causal mask per layer (not per
    token, not counted). It is the FLOP-counting reference rather than a training path.
    """
    r, c = residual_bytes, compute_bytes
    stats = 4 * (2 if normalization == "layernorm" else 1)

    def norm(consumers):
        return r * n_embd + stats + c * n_embd * (consumers if autocast else 1)

    q_k = c * (n_embd + kv_dim) if rope else c * n_embd  # rotated Q and K (without RoPE: views of Q / [K|V])
    attn = norm(2) + q_k + 2 * c * kv_dim + c * n_embd + 4 * n_head
    if attention == "math":  # Q, K and V as the two matmuls keep them: K and V at n_head heads
        attn = norm(2) + 4 * c * n_embd + n_head * seq_len * (4 + (c if c != 4 else 0))
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


# ---- activation checkpointing ---------------------------------------------------------------

AC_MODES = ("none", "full", "selective")


def checkpointing(mode: Any, option: Any = "op") -> tuple[str, str]:
    """(mode, selective option) as train.activation_checkpointing / selective_ac_option mean them:
    a bool is the key's old form (true = full); the option is "op" or a whole k >= 1 (as digits)."""
    if isinstance(mode, bool) or mode is None:
        mode = "full" if mode else "none"
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing must be one of {', '.join(AC_MODES)}, got {mode!r}")
    option = str(option)
    if option != "op" and not (option.isdigit() and int(option) >= 1):
        raise ValueError(f'selective_ac_option must be "op" or a whole number k >= 1, got {option!r}')
    return mode, option


def checkpointed_layer_count(n_layer, mode: str, option: str = "op"):
    """Blocks that train/parallel.py's apply_activation_checkpointing wraps (its checkpointed_layers):
    every block under full and selective-by-op, every k-th (n_layer // k) under selective by layer."""
    if mode == "none":
        return 0.0
    n_layer = np.asarray(n_layer, dtype=np.float64)
    if mode == "selective" and option != "op":
        return np.floor(n_layer / int(option))
    return n_layer


def last_block_wrapped(n_layer, mode: str, option: str = "op"):
    """1.0 where the last block is checkpointed (so backward starts by recomputing it), else 0.0."""
    if mode == "none":
        return 0.0
    if mode == "selective" and option != "op":
        return (np.asarray(n_layer) % int(option) == 0).astype(np.float64)
    return 1.0


def block_matmuls(n_embd, kv_dim, d_ff, *, ffn_type: str = "swiglu", kv_packed: bool = True) -> list[tuple[Any, Any]]:
    """(in, out) widths of one block's matmuls in the order its forward runs them: q_proj,
    kv_proj ([K | V] packed, as our model does; `kv_packed=False`: separate K and V projections,
    as torchtitan's and transformers' LLaMA do), o_proj, then gate (SwiGLU only), up, down."""
    ffn = [(n_embd, d_ff)] * (2 if ffn_type == "swiglu" else 1) + [(d_ff, n_embd)]
    kv = [(n_embd, 2 * kv_dim)] if kv_packed else [(n_embd, kv_dim), (n_embd, kv_dim)]
    return [(n_embd, n_embd), *kv, (n_embd, n_embd), *ffn]


def selective_op_saved_per_token(n_embd, kv_dim, d_ff, n_head, *, ffn_type: str = "swiglu", residual_bytes=4,
                                 compute_bytes=2, attention: str = "sdpa", kv_packed: bool = True):
    """Bytes per token one block keeps under selective-by-op checkpointing (parallel.py's
    _selective_op_context, torchtitan's policy): its input (the checkpoint's argument, residual
    dtype), the outputs of the 1st, 3rd, 5th ... matmul, and the fused attention's output and fp32
    log-sum-exp per head (the math path's matmuls are not on the save list: nothing)."""
    mms = block_matmuls(n_embd, kv_dim, d_ff, ffn_type=ffn_type, kv_packed=kv_packed)
    saved = sum(out for i, (_, out) in enumerate(mms) if i % 2 == 0)
    attn = compute_bytes * n_embd + 4 * n_head if attention == "sdpa" else 0
    return residual_bytes * n_embd + compute_bytes * saved + attn


def saved_activations_per_token(per_layer, n_layer, n_embd, kv_dim, d_ff, n_head, *, mode: str = "none",
                                option: str = "op", ffn_type: str = "swiglu", residual_bytes=4,
                                compute_bytes=2, attention: str = "sdpa", kv_packed: bool = True):
    """Bytes per token all blocks keep for backward under a checkpointing mode, given `per_layer`
    (activation_bytes_per_token's block figure, what one unwrapped block keeps): a fully
    recomputed block keeps only its input; selective-by-op keeps selective_op_saved_per_token."""
    wrapped = checkpointed_layer_count(n_layer, mode, option)
    if mode == "selective" and option == "op":
        kept = selective_op_saved_per_token(n_embd, kv_dim, d_ff, n_head, ffn_type=ffn_type,
                                            residual_bytes=residual_bytes, compute_bytes=compute_bytes,
                                            attention=attention, kv_packed=kv_packed)
    else:
        kept = residual_bytes * n_embd
    return (np.asarray(n_layer, dtype=np.float64) - wrapped) * per_layer + wrapped * kept


def recompute_flops_per_token_arrays(n_layer, n_embd, n_head, num_key_value_heads, d_ff, seq_len, *,
                                     mode: str = "none", option: str = "op", ffn_type: str = "swiglu",
                                     attention: str = "sdpa"):
    """Forward FLOPs per token that backward executes again (the difference between hardware and
    model FLOPs, measured with FlopCounterMode in tests/test_activation_checkpointing.py): a fully
    recomputed block runs its forward again (matmuls and attention); selective-by-op runs again the
    matmuls it did not save (the 2nd, 4th, ...) and, on the math path, attention's two matmuls
    (fused attention is saved). In both, the block's last matmul (down) never runs again: PyTorch's
    non-reentrant checkpoint stops recomputing once every tensor backward needs is back
    (torch.utils.checkpoint.set_checkpoint_early_stop, on by default), and down's input, saved as
    the op is recorded, is the last of them."""
    n_layer, n_embd, n_head, kv, d_ff, seq_len = (np.asarray(x, dtype=np.float64) for x in
                                                  (n_layer, n_embd, n_head, num_key_value_heads, d_ff, seq_len))
    kv_dim = kv * (n_embd // n_head)
    mms = block_matmuls(n_embd, kv_dim, d_ff, ffn_type=ffn_type)[:-1]  # all but down
    attention_flops = 4.0 * seq_len * n_embd
    wrapped = checkpointed_layer_count(n_layer, mode, option)
    if mode == "selective" and option == "op":
        per_block = sum(2.0 * i * o for j, (i, o) in enumerate(mms) if j % 2 == 1)
        per_block = per_block + (attention_flops if attention == "math" else 0.0)
    else:
        per_block = sum(2.0 * i * o for i, o in mms) + attention_flops
    return wrapped * per_block


def executed_training_flops(cfg: ModelConfig, batch_size: int, seq_len: int, *, activation_checkpointing: Any = "none",
                            selective_ac_option: Any = "op", attention: str = "sdpa") -> int:
    """FLOPs one training step of (batch_size, seq_len) executes: training_flops plus the forward
    recomputation of activation checkpointing (what hardware FLOPs utilisation, HFU, counts)."""
    mode, option = checkpointing(activation_checkpointing, selective_ac_option)
    extra = recompute_flops_per_token_arrays(cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.num_key_value_heads,
                                             cfg.ffn_hidden, seq_len, mode=mode, option=option,
                                             ffn_type=cfg.ffn_type, attention=attention)
    return training_flops(cfg, batch_size, seq_len) + round(float(extra)) * batch_size * seq_len


# ---- memory over the step's timeline --------------------------------------------------------
#
# What the device holds at four moments of a steady-state step (step >= 2: optimizer state exists,
# gradients were freed by zero_grad(set_to_none=True) after the last step), by component; the peak
# is the largest (docs/memory.md has every formula):
#   forward_end     weights, optimizer, DDP buckets, autocast weight copies, saved activations,
#                   FSDP's gathered root unit and last block, lm_head's gradient when the chunked loss forms it
#   loss_backward   forward_end + the loss temporaries (unchunked: fp32 log-probabilities and two fp32
#                   gradients per logit; chunked: one chunk's buffers)
#   backward        the first recomputed block: saved activations + one block recomputed + FSDP's
#                   root, two gathered blocks and one block's unsharded gradient + the root's gradients
#   optimizer_step  weights, gradients, optimizer, DDP buckets and the optimizer's temporaries
# A runtime reserve (CUDA context, caching-allocator fragmentation) is shown separately.

PHASES = ("forward_end", "loss_backward", "backward", "optimizer_step")
OPTIMIZER_IMPLS = ("fused", "foreach", "for-loop")
DEVICES = ("cuda", "cpu")

# Runtime reserve constants, in one place (docs/memory.md "Runtime reserve"):
# - CUDA_CONTEXT_BYTES: what a process's CUDA context (driver state, cuBLAS/cuDNN workspaces and
#   kernel images, loaded lazily under CUDA >= 11.7's CUDA_MODULE_LOADING=LAZY) holds outside
#   PyTorch's allocator: nvidia-smi shows it, torch.cuda.max_memory_reserved does not. PyTorch's
#   CUDA semantics notes ("Memory management") say the context is not counted by the allocator;
#   0.5 GiB is the usual size on an H100 with CUDA 12 (not measured here: no GPU was available).
# - ALLOCATOR_FRAGMENTATION: the caching allocator's reserved-but-unallocated share at the peak,
#   as a fraction of the allocated peak (torch.cuda.max_memory_reserved / max_memory_allocated - 1).
#   A working figure, not fitted and not measured here: reported gaps run from ~2% (1.83 GiB
#   reserved-unallocated beside 75.3 GiB allocated, vllm-project/compressed-tensors#587) to "up to
#   43%" with recomputation and pipelines (arXiv 2507.16274). With 0.10, torchtitan's published
#   reserved memory for LLaMA 3.1 8B (docs/performance.md, Tables 1 and 3) is reproduced within
#   10% (tests/test_memory_timeline.py::test_torchtitan_llama31_8b_reserved_memory).
# - On the CPU there is no caching allocator and no context: the reserve is 0.
CUDA_CONTEXT_BYTES = 0.5 * 2**30
ALLOCATOR_FRAGMENTATION = 0.10


def state_bytes(total_params, precision: str, shards):
    """(weights, gradients, optimizer) bytes per device: PRECISIONS' bytes per parameter, sharded
    over `shards` devices by FSDP (1 otherwise)."""
    wb, gb, ob = PRECISIONS[precision]
    return total_params * wb / shards, total_params * gb / shards, total_params * ob / shards


def autocast_weight_copy_bytes(matmul_weights, lm_head_params, n_layer, wrapped_layers):
    """Autocast's bf16 copy of each matmul weight (2 bytes per weight), which backward keeps, except
    in checkpointed blocks, whose copies are made again when they are recomputed."""
    per_block = (matmul_weights - lm_head_params) / n_layer
    return 2.0 * (matmul_weights - wrapped_layers * per_block)


def fsdp_unsharded_bytes(per_layer_params, root_params, compute_bytes, *, sharded: bool):
    """FSDP2's gathered (unsharded) parameters, in the compute dtype (MixedPrecisionPolicy's
    param_dtype), as (after forward, during backward): after forward, the root unit (embeddings,
    final norm, lm_head: FSDP2 never reshards the root after forward) and the last block (apply_fsdp
    keeps it for backward); during backward, the root, two blocks (the current one and the
    prefetched next) and the current block's unsharded gradient in the compute dtype plus its fp32
    reduce-scatter input. Zero without FSDP over more than one device."""
    if not sharded:
        return 0.0, 0.0
    after_forward = (root_params + per_layer_params) * compute_bytes
    during_backward = root_params * compute_bytes + per_layer_params * (2 * compute_bytes + compute_bytes + 4)
    return after_forward, during_backward


def ddp_bucket_bytes(total_params, gradient_bytes, *, ddp: bool):
    """DDP's gradient buckets: a second copy of every gradient, allocated when DDP wraps the model
    (torch.nn.parallel.DistributedDataParallel with gradient_as_bucket_view=False, the default)."""
    return total_params * gradient_bytes if ddp else 0.0


def optimizer_step_bytes(total_params, largest_param, shards, impl: str):
    """AdamW's temporaries during optimizer.step(), fp32: `fused` (the trainer on CUDA) updates in
    place; `foreach` (torch's default on CUDA without fused, torchtitan's) makes sqrt(v) for every
    local parameter at once (4 bytes per parameter); `for-loop` (the CPU) makes sqrt(v) and its
    quotient for one parameter at a time (8 bytes x the largest parameter: the embedding or
    lm_head, or an FFN matrix)."""
    if impl == "fused":
        return 0.0
    if impl == "foreach":
        return 4.0 * total_params / shards
    return 8.0 * largest_param / shards


def runtime_reserve_bytes(peak, device: str):
    """What the device holds beyond the allocated peak: on CUDA the context (CUDA_CONTEXT_BYTES) and
    the caching allocator's fragmentation (ALLOCATOR_FRAGMENTATION x peak); nothing on the CPU."""
    if device == "cpu":
        return 0.0
    return CUDA_CONTEXT_BYTES + ALLOCATOR_FRAGMENTATION * peak


def chunked_loss_weight_transients(lm_head_params, loss_chunk_tokens: int, *, autocast: bool):
    """Weight-sized buffers the chunked loss (model.score_chunks) holds beside a chunk's under
    autocast, measured with the profiler: the bf16 copy of lm_head's fp32 weight (2 bytes per
    weight), a chunk's bf16 weight-gradient product (2) and its fp32 promotion as it is added into
    the fp32 gradient (4). In fp32, and under FSDP's bf16 parameters, the product accumulates in
    place (addmm out=) and the weight needs no copy: nothing."""
    return 8.0 * lm_head_params if (loss_chunk_tokens and autocast) else 0.0


def step_phases(c: dict[str, Any]) -> dict[str, Any]:
    """Bytes live at each of PHASES from the named components (see the comment above PHASES)."""
    persistent = c["weights"] + c["optimizer"] + c["ddp_buckets"]
    forward = c["weight_copies"] + c["activations"] + c["fsdp_unsharded"] + c["loss_gradient"]
    return {
        "forward_end": persistent + forward,
        "loss_backward": persistent + forward + c["loss"],
        "backward": (persistent + c["weight_copies"] + c["activations"] + c["recompute"]
                     + c["fsdp_unsharded_backward"] + c["root_gradients"]),
        "optimizer_step": persistent + c["gradients"] + c["optimizer_step"],
    }


def training_memory(cfg: ModelConfig, *, micro_batch: int = 1, seq_len: int | None = None,
                    num_devices: int = 1, sharding: str = "fsdp", precision: str = "bf16-mixed",
                    activation_checkpointing: Any = "none", selective_ac_option: Any = "op",
                    attention: str = "sdpa", loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS,
                    optimizer_impl: str = "fused", device: str = "cuda") -> dict[str, Any]:
    """Peak training memory per device, in bytes, over one steady-state step, by named component
    (training_memory_arrays; docs/memory.md): `peak` is the allocated peak, `peak_phase` when it
    occurs, `runtime_reserve` what the device holds beyond it, and `total` = peak + reserve, what
    the device must have. `optimizer_impl` is AdamW's implementation (the trainer: fused on CUDA,
    for-loop on the CPU) and `device` cuda or cpu (the CPU has no reserve, and its composite
    RMSNorm keeps one more vector per norm)."""
    s = cfg.block_size if seq_len is None else seq_len
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {', '.join(SHARDINGS)}")
    mode, option = checkpointing(activation_checkpointing, selective_ac_option)
    parts = training_memory_arrays(*_shape_args(cfg), seq_len=s, micro_batch=micro_batch,
                                   num_devices=num_devices, sharding=sharding, precision=precision,
                                   activation_checkpointing=mode, selective_ac_option=option, attention=attention,
                                   loss_chunk_tokens=loss_chunk_tokens, optimizer_impl=optimizer_impl,
                                   device=device, **_style_kwargs(cfg))
    out: dict[str, Any] = {k: (PHASES[int(v)] if k == "peak_phase" else float(v)) for k, v in parts.items()}
    out.update(micro_batch=micro_batch, seq_len=s, num_devices=num_devices, sharding=sharding,
               precision=precision, activation_checkpointing=mode, selective_ac_option=option,
               loss_chunk_tokens=loss_chunk_tokens, optimizer_impl=optimizer_impl, device=device)
    return out


# The components training_memory_arrays returns (bytes per device), then the per-phase totals
# ("phase_" + each of PHASES), "peak", "peak_phase", "runtime_reserve" and "total".
MEMORY_COMPONENTS = ("weights", "gradients", "optimizer", "weight_copies", "activations", "loss", "loss_gradient",
                     "fsdp_unsharded", "fsdp_unsharded_backward", "ddp_buckets", "recompute", "root_gradients",
                     "optimizer_step")


def training_memory_arrays(n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size, *, seq_len: int,
                           micro_batch: int = 1, num_devices: int = 1, sharding: str = "fsdp",
                           precision: str = "bf16-mixed", activation_checkpointing: Any = "none",
                           selective_ac_option: Any = "op", attention: str = "sdpa",
                           loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS, optimizer_impl: str = "fused",
                           device: str = "cuda", kv_packed: bool = True, **style: Any) -> dict[str, Any]:
    """`training_memory` over numpy arrays of shapes (the planner's memory filter), same model.
    `style` takes param_breakdown_arrays' keywords (ffn_type, normalization, bias, ...).
    Returns bytes per device by component (MEMORY_COMPONENTS) as float64 arrays (0.0 where a
    component does not apply), each phase's total
    ("phase_<name>"), the allocated "peak" and its "peak_phase" (an index into PHASES), "runtime_reserve"
    and "total" = peak + runtime_reserve. `kv_packed=False` models a block with separate K and V
    projections (torchtitan's), which changes what selective-by-op checkpointing saves."""
    mode, option = checkpointing(activation_checkpointing, selective_ac_option)
    if optimizer_impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"optimizer_impl must be one of {', '.join(OPTIMIZER_IMPLS)}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}")
    ffn_type = style.get("ffn_type", "swiglu")
    p = param_breakdown_arrays(n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size, **style)
    total_params = p["total"].astype(np.float64)
    fsdp = sharding == "fsdp" and np.any(np.asarray(num_devices) > 1)
    shards = num_devices if sharding == "fsdp" else 1
    # How the trainer runs each precision: fp32 throughout; bf16-mixed is torch.autocast over fp32
    # weights, except under FSDP, where MixedPrecisionPolicy gathers bf16 weights and the whole
    # forward (residual stream included) runs in bf16 with no casts; bf16 is bf16 weights.
    autocast = precision == "bf16-mixed" and sharding != "fsdp"
    residual = 4 if precision == "fp32" or autocast else 2
    compute_bytes = ACTIVATION_BYTES[precision]
    weights, gradients, optimizer = state_bytes(total_params, precision, shards)
    lm_head_params = vocab_size * np.asarray(n_embd, dtype=np.float64)
    matmul_weights = matmul_weights_arrays(n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size,
                                           ffn_type=ffn_type).astype(np.float64)
    copies = (autocast_weight_copy_bytes(matmul_weights, lm_head_params, n_layer,
                                         checkpointed_layer_count(n_layer, mode, option)) if autocast else 0.0)
    root_params = total_params - np.asarray(n_layer, dtype=np.float64) * p["per_layer"]
    n_layer, n_embd, n_head, kv, d_ff, vocab = (np.asarray(x, dtype=np.float64) for x in
                                                (n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size))
    kv_dim = kv * (n_embd // n_head)
    tokens = micro_batch * seq_len
    per_layer, head = activation_bytes_per_token(
        n_embd, kv_dim, d_ff, n_head, seq_len, ffn_type=ffn_type,
        normalization=style.get("normalization", "rmsnorm"), rope=not style.get("learned_positions", 0),
        residual_bytes=residual, compute_bytes=compute_bytes, autocast=autocast, attention=attention)
    if device == "cpu" and style.get("normalization", "rmsnorm") == "rmsnorm":
        # PyTorch's CPU RMSNorm is a composite that also keeps the normalised input (residual dtype)
        per_layer, head = per_layer + 2 * residual * n_embd, head + residual * n_embd
    blocks = saved_activations_per_token(per_layer, n_layer, n_embd, kv_dim, d_ff, n_head, mode=mode, option=option,
                                         ffn_type=ffn_type, residual_bytes=residual, compute_bytes=compute_bytes,
                                         attention=attention, kv_packed=kv_packed)
    # backward meets the last block first; when it is wrapped, it is recomputed whole
    recompute = tokens * per_layer * last_block_wrapped(n_layer, mode, option)
    # the chunked loss forms lm_head's weight gradient in forward, in the dtype lm_head computes in
    loss_gradient = lm_head_params * (compute_bytes if fsdp else PRECISIONS[precision][1]) if loss_chunk_tokens else 0.0
    unsharded_fwd, unsharded_bwd = fsdp_unsharded_bytes(p["per_layer"].astype(np.float64), root_params,
                                                        compute_bytes, sharded=bool(fsdp))
    c = {"weights": weights, "gradients": gradients, "optimizer": optimizer, "weight_copies": copies,
         "activations": tokens * (blocks + head),
         "loss": loss_bytes(tokens, vocab, compute_bytes, loss_chunk_tokens) + chunked_loss_weight_transients(
             lm_head_params, loss_chunk_tokens, autocast=autocast),
         "loss_gradient": loss_gradient,
         "fsdp_unsharded": unsharded_fwd, "fsdp_unsharded_backward": unsharded_bwd,
         "ddp_buckets": ddp_bucket_bytes(total_params, PRECISIONS[precision][1], ddp=sharding == "ddp"),
         "recompute": recompute,
         "root_gradients": root_params * PRECISIONS[precision][1] / shards,
         "optimizer_step": optimizer_step_bytes(total_params, np.maximum(lm_head_params, n_embd * d_ff), shards,
                                                optimizer_impl)}
    out = dict(c)
    phases = step_phases(c)
    for k in PHASES:
        out[f"phase_{k}"] = phases[k]
    out["peak"] = np.maximum(np.maximum(phases["forward_end"], phases["loss_backward"]),
                             np.maximum(phases["backward"], phases["optimizer_step"]))
    # the first phase that reaches the peak, as an index into PHASES (training_memory names it)
    out["peak_phase"] = np.select([phases[k] == out["peak"] for k in PHASES], list(range(len(PHASES))))
    out["runtime_reserve"] = runtime_reserve_bytes(out["peak"], device)
    out["total"] = out["peak"] + out["runtime_reserve"]
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
