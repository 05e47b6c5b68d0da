"""The scalelab Transformer: GPT-2, LLaMA 2/3, Mistral, Qwen2 and Qwen3 from one ModelConfig, in one file.

Read top to bottom: rotary positions, attention, feed-forward, block, the model, generation.
Every architectural choice is a ModelConfig field; there is one code path per concept:

- Attention has a query projection (n_head heads) and separate key and value projections
  (num_key_value_heads heads each). MHA, GQA and MQA are the same code; only the KV head count
  differs. Attention runs through `F.scaled_dot_product_attention` with
  `enable_gqa=True` (the kernel reads each KV head for its group of query heads, so K/V are
  never copied n_head/n_kv times), or through an explicit "math" path that spells the matmuls
  out. Heads are head_dim wide (n_head · head_dim need not be n_embd), and with qk_norm (Qwen3)
  each query and key head is RMS-normalised before RoPE. The math path is the reference: `torch.utils.flop_counter.FlopCounterMode` counts its
  FLOPs exactly as `scalelab.counting` does (tests/test_model.py proves it).
  A sliding window (Mistral) is a boolean mask on either path; the KV cache still keeps every
  position (simple, and exact; a rolling buffer would only save memory).
- Parameter names and layouts follow Hugging Face's LLaMA where one exists (RoPE rotates the
  two *halves* of each head, not interleaved pairs), so import/export (scalelab.hf) is a
  renaming (plus GPT-2's fused c_attn split in three) — never a permutation.
- The parameter count equals `scalelab.counting.count_params(cfg).total` for every preset:
  post-norm models have no final norm, LayerNorm has a bias iff `bias`, lm_head never has one.
- With targets, the loss is by default scored in chunks of tokens (`loss_chunk_tokens`): the
  [tokens × vocab] logits never exist at once (see `LinearCrossEntropy`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from scalelab.config import DEFAULT_LOSS_CHUNK_TOKENS, ModelConfig
from scalelab.errors import UserError
from scalelab.mla import MLAttention
from scalelab.moe import MoE, aux_loss, is_moe_layer, record_load

ATTENTION_IMPLEMENTATIONS = ("sdpa", "math")


# ---- rotary position embedding (RoPE) ---------------------------------------------------------

def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies (head_dim/2,) as float32 on the CPU, and the factor that scales
    cos/sin (1.0 except for YaRN).

    Computed with the same float32 operations as Hugging Face's `modeling_rope_utils`, so a
    checkpoint imported from there sees bit-for-bit the same angles it was trained with.
    """
    dim, base = (cfg.qk_rope_head_dim if cfg.is_mla else cfg.head_dim), cfg.rope_theta  # MLA: the rope part
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (base ** exponents)
    scaling = cfg.rope_scaling
    if not scaling:
        return inv_freq, 1.0
    kind = scaling.get("type", scaling.get("rope_type"))
    factor = float(scaling["factor"])
    if kind == "linear":  # position interpolation: every position divided by `factor`
        return inv_freq / factor, 1.0
    if kind == "llama3":
        # LLaMA 3.1: long wavelengths (beyond the original context) are slowed by `factor`,
        # short ones are kept, and the band between is interpolated smoothly.
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_context = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        # YaRN (Peng et al. 2023): interpolate low frequencies, extrapolate high ones, with a
        # linear ramp between, and scale attention logits via cos/sin by attention_factor.
        old_context = float(scaling.get("original_max_position_embeddings") or cfg.block_size)
        beta_fast = float(scaling.get("beta_fast") or 32.0)
        beta_slow = float(scaling.get("beta_slow") or 1.0)
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:  # transformers' _compute_yarn_parameters, DeepSeek's mscale pair included

            def mscale(scale: float = 1.0) -> float:
                return 0.1 * scale * math.log(factor) + 1.0 if factor > 1 else 1.0

            both = scaling.get("mscale") and scaling.get("mscale_all_dim")
            attention_factor = (mscale(scaling["mscale"]) / mscale(scaling["mscale_all_dim"]) if both
                                else mscale())

        def correction_dim(rotations: float) -> float:
            return dim * math.log(old_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

        lo = max(math.floor(correction_dim(beta_fast)), 0)
        hi = min(math.ceil(correction_dim(beta_slow)), dim - 1)
        if lo == hi:
            hi += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - lo) / (hi - lo)).clamp(0, 1)
        pos_freqs = base ** exponents
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
        keep = 1 - ramp  # 1 where the frequency is high enough to extrapolate unchanged
        return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)
    raise UserError(f"rope_scaling type {kind!r} is not supported; use linear, llama3 or yarn")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, S, head_dim) by the per-position angles; cos/sin are (S, head_dim)."""
    return x * cos + rotate_half(x) * sin


# ---- attention --------------------------------------------------------------------------------

def attention_mask(s_q: int, s_k: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Which keys each query may see, as a boolean (s_q, s_k) mask, or None when plain causal
    attention (or, for one query, no mask at all) already says it.

    The queries are the *last* s_q of s_k positions (with a KV cache, s_k > s_q), so query row r
    sits at position i = s_k - s_q + r and sees keys j <= i; with a sliding window only those with
    i - window < j <= i: `window` keys including its own, exactly as transformers'
    `sliding_window_overlay` (kv_idx > q_idx - sliding_window) defines it. A window at least as
    long as the keys hides nothing, so short sequences keep the fast unmasked path.
    """
    windowed = window is not None and window < s_k
    if not windowed and (s_q == 1 or s_q == s_k):
        return None
    offset = s_k - s_q
    ones = torch.ones(s_q, s_k, dtype=torch.bool, device=device)
    mask = ones.tril(diagonal=offset)
    if windowed:
        mask &= ~ones.tril(diagonal=offset - window)
    return mask


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, implementation: str,
                     window: int | None = None, scale: float | None = None) -> torch.Tensor:
    """softmax(QKᵀ·scale + causal mask)·V for q (B, n_head, Sq, d) and k, v (B, n_kv, Sk, d)
    (v's width may differ: MLA); `scale` defaults to 1/√d.

    With a KV cache, Sk > Sq: the queries are the *last* Sq positions, so the mask is aligned
    to the bottom-right. A single new query attends to everything and needs no mask, unless a
    sliding `window` hides the oldest keys (see attention_mask).
    """
    s_q, s_k = q.size(-2), k.size(-2)
    mask = attention_mask(s_q, s_k, window, q.device)
    if implementation == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=s_q > 1 and mask is None,
                                              enable_gqa=k.size(1) != q.size(1), scale=scale)
    # Explicit math: repeat each KV head for its group of query heads, then two matmuls whose
    # FLOPs (2·Sq·Sk·d each, per query head) are exactly the counting module's attention term.
    # A sliding window masks the full score matrix rather than skipping it, so the FLOPs (and
    # FlopCounterMode's count) do not depend on the window.
    repeats = q.size(1) // k.size(1)
    if repeats > 1:
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)) if scale is None else scale)
    if mask is None and s_q > 1:
        mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.softmax(scores.float(), dim=-1).to(q.dtype)  # softmax in fp32, as every reference does
    return probs @ v


class KVCache:
    """Past keys and values for generation, per layer, at the *KV-head* count: a GQA model with
    8 KV heads for 64 query heads stores 8× less than MHA would. Filled by the model's forward.
    MLA stores its latent as "k" and its shared RoPE key as "v" (one head each, widths differ)."""

    def __init__(self, n_layer: int, max_len: int):
        self.max_len = max_len
        self.length = 0  # positions already stored (the next token's position)
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, S, d) after the cached positions; return all keys and values so far."""
        if self.k[layer] is None:  # allocate lazily, in the dtype attention actually produces
            self.k[layer] = k.new_zeros(k.size(0), k.size(1), self.max_len, k.size(3))
            self.v[layer] = v.new_zeros(v.size(0), v.size(1), self.max_len, v.size(3))
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} needed")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, implementation: str):
        super().__init__()
        self.layer_idx, self.implementation = layer_idx, implementation
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.sliding_window
        qkv_bias = cfg.bias or cfg.qkv_bias  # Qwen2: biases on Q, K and V only
        # n_head · head_dim need not be n_embd (Qwen3-0.6B: 16 x 128 on a 1024-wide stream)
        self.q_proj = nn.Linear(cfg.n_embd, cfg.q_dim, bias=qkv_bias)
        # K and V apart (as Hugging Face has them), so that tensor parallelism can give each rank
        # its own K heads and V heads (a fused [K | V] cut in two would give one rank all of K).
        self.k_proj = nn.Linear(cfg.n_embd, cfg.kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.kv_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.q_dim, cfg.n_embd, bias=cfg.bias)
        # Qwen3: an RMSNorm over each query and key head (one weight per projection), before RoPE
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        B, S, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds n_head / tp and n_kv_head / tp of them
        q = self.q_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        y = causal_attention(q, k, v, self.implementation, self.window)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))


FUSED_KV = "attn.kv_proj."  # what checkpoints written before K and V were apart call [K | V]


def split_fused_kv(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict (or any mapping keyed by parameter name) from a checkpoint written when the
    key and value projections were one `attn.kv_proj` ([K | V] stacked on the output dimension),
    with each such entry split into `attn.k_proj` and `attn.v_proj` (its first and second half).
    Current state dicts come back unchanged."""
    out = {}
    for key, value in state_dict.items():
        if FUSED_KV not in key:
            out[key] = value
            continue
        k, v = value.chunk(2, dim=0)
        out[key.replace(FUSED_KV, "attn.k_proj.")], out[key.replace(FUSED_KV, "attn.v_proj.")] = k, v
    return out


# ---- feed-forward -----------------------------------------------------------------------------

class FeedForward(nn.Module):
    """GELU MLP (GPT-2: down(gelu(up(x)))) or SwiGLU (LLaMA: down(silu(gate(x)) · up(x)))."""

    def __init__(self, cfg: ModelConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or cfg.ffn_hidden  # a MoE's shared experts have their own width
        self.swiglu = cfg.ffn_type == "swiglu"
        if self.swiglu:
            self.gate = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.up = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.down = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        # GPT-2 was trained with the tanh approximation of GELU (HF's "gelu_new").
        return self.down(F.gelu(self.up(x), approximate="tanh"))


# ---- block ------------------------------------------------------------------------------------

def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.normalization == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, attention: str):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.attn_norm = make_norm(cfg)
        self.attn = MLAttention(cfg, layer_idx, attention) if cfg.is_mla else Attention(cfg, layer_idx, attention)
        self.ffn_norm = make_norm(cfg)
        self.ffn = MoE(cfg, attention) if is_moe_layer(cfg, layer_idx) else FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        if self.pre_norm:  # GPT-2, LLaMA: the residual stream itself is never normalised
            x = x + self.attn(self.attn_norm(x), rope, kv_cache)
            return x + self.ffn(self.ffn_norm(x))
        # post-norm (the original Transformer): normalise after each residual add
        x = self.attn_norm(x + self.attn(x, rope, kv_cache))
        return self.ffn_norm(x + self.ffn(x))


# ---- the loss: lm_head and cross-entropy, chunk by chunk ------------------------------------

def score_chunks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                 compute_dtype: torch.dtype, with_grads: bool):
    """Mean cross-entropy (over targets != -1) of the logits hidden @ weightᵀ, formed
    `chunk_tokens` rows at a time (score_chunk); with `with_grads`, also the loss's gradients
    with respect to hidden (in `compute_dtype`) and to weight (in weight's dtype), chunk by chunk
    as well. hidden (N, H), weight (V, H), targets (N,)."""
    n_valid = (targets != -1).sum()
    weight_c = weight.to(compute_dtype)  # autocast's copy of the weight; no copy when already that dtype
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty(hidden.shape, dtype=compute_dtype, device=hidden.device) if with_grads else None
    grad_weight = torch.zeros_like(weight) if with_grads else None
    for start in range(0, hidden.size(0), chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        loss_sum += score_chunk(hidden[rows].to(compute_dtype), weight_c, targets[rows], n_valid,
                                None if grad_hidden is None else grad_hidden[rows], grad_weight)
    return loss_sum / n_valid, grad_hidden, grad_weight


def score_chunk(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, n_valid: torch.Tensor,
                grad_h: torch.Tensor | None, grad_weight: torch.Tensor | None) -> torch.Tensor:
    """The summed cross-entropy of one chunk's rows h (rows, H) against weight (V, H), both in the
    compute dtype; with grad_h, writes d loss / d h into it and adds d loss / d weight into
    grad_weight, for the mean over all `n_valid` targets of the batch.

    The logits are a compute-dtype matmul (what autocast's lm_head computes) made fp32, as the
    unchunked loss makes them; their softmax is then formed in place and turned in place into
    d loss / d logits = (softmax - onehot) / n_valid (zero for an ignored row), so a chunk holds
    one fp32 [rows × vocab] buffer, plus its compute-dtype form when that is 16-bit. (A function of
    its own so that a chunk's buffers are freed before the next chunk's exist.)"""
    valid = targets != -1
    targets = targets.clamp(min=0)[:, None]  # an ignored row reads column 0 and is masked out below
    logits = (h @ weight.T).float()
    target_logit = logits.gather(1, targets).squeeze(1)
    row_max = logits.amax(dim=1, keepdim=True)
    probs = logits.sub_(row_max).exp_()  # in place: the chunk's one fp32 buffer
    row_sum = probs.sum(dim=1, keepdim=True)
    log_norm = (row_sum.log() + row_max).squeeze(1)  # the row's logsumexp
    loss = torch.where(valid, log_norm - target_logit, 0.0).sum()
    if grad_h is not None:
        probs.div_(row_sum).scatter_add_(1, targets, -valid[:, None].float())  # softmax - onehot
        grad_logits = probs.mul_(valid[:, None] / n_valid).to(h.dtype)
        torch.mm(grad_logits, weight, out=grad_h)
        if grad_weight.dtype == h.dtype:  # addmm with out=, not addmm_, which FlopCounterMode does not count
            torch.addmm(grad_weight, grad_logits.T, h, out=grad_weight)
        else:  # autocast: the compute-dtype product, accumulated into the fp32 weight's gradient
            grad_weight += grad_logits.T @ h
    return loss


class LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(hidden @ weightᵀ, targets, ignore_index=-1), mean over the targets kept,
    without the [tokens × vocab] logits: a fused linear cross-entropy, as Liger-Kernel's.

    Forward scores `chunk_tokens` tokens at a time and, since the loss is the graph's end, also
    forms each chunk's gradients there (score_chunks); backward only scales them by the incoming
    gradient. Why not recompute in backward (torchtune's chunked loss, or
    `torch.utils.checkpoint` per chunk): that runs the lm_head matmul once more, a third more
    lm_head FLOPs, and at a large vocabulary the lm_head is much of a small model's step. What
    this keeps from forward to backward instead: the hidden states' gradient (tokens × n_embd,
    the size of the lm_head input the unchunked loss saves) and lm_head's weight gradient, which
    becomes the parameter's .grad. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens, compute_dtype):
        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are explicit here
            loss, grad_hidden, grad_weight = score_chunks(hidden, weight, targets, chunk_tokens, compute_dtype,
                                                          with_grads=True)
        ctx.hidden_dtype = hidden.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        # in place: these buffers are this node's own, and a second backward through it would
        # fail autograd's version check rather than read them scaled
        grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden.to(ctx.hidden_dtype), grad_weight, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_tokens: int) -> torch.Tensor:
    """The mean cross-entropy of hidden (N, H) @ weightᵀ against targets (N,) (-1 ignored), scored
    `chunk_tokens` tokens at a time, in the dtype an lm_head would compute in here (autocast's
    when it is on)."""
    device = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens, compute_dtype)
    with torch.autocast(device, enabled=False):
        return score_chunks(hidden, weight, targets, chunk_tokens, compute_dtype, with_grads=False)[0]


# ---- the model --------------------------------------------------------------------------------

class Transformer(nn.Module):
    """A decoder-only language model built from a ModelConfig.

    `attention`: "sdpa" (fused kernel, the default) or "math" (explicit matmuls; the reference
    for FLOP counting and for checking the kernel). `loss_chunk_tokens`: with targets, score the
    loss this many tokens at a time (`chunked_cross_entropy`; the forward then returns no logits);
    0 forms the full logits and scores them at once.
    """

    def __init__(self, config: ModelConfig, attention: str = "sdpa",
                 loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS):
        super().__init__()
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise UserError(f"attention must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}; got {attention!r}")
        if isinstance(loss_chunk_tokens, bool) or not isinstance(loss_chunk_tokens, int) or loss_chunk_tokens < 0:
            raise UserError(f"loss_chunk_tokens must be a whole number >= 0 (0 = unchunked); got {loss_chunk_tokens!r}")
        self.config, self.attention, self.loss_chunk_tokens = config, attention, loss_chunk_tokens
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        learned = config.position_encoding == "learned"
        self.pos_embeddings = nn.Embedding(config.block_size, config.n_embd) if learned else None
        self.layers = nn.ModuleList(Block(config, i, attention) for i in range(config.n_layer))
        # A post-norm block already ends in a norm, so only pre-norm models need a final one.
        self.norm = make_norm(config) if config.norm_position == "pre" else None
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # one matrix both embeds tokens and scores them (GPT-2, LLaMA 3.2)
            self.lm_head.weight = self.tok_embeddings.weight
        # RoPE frequencies are derived from the config, not learned. They are a plain attribute,
        # not a buffer, so `model.to(torch.bfloat16)` cannot round them and the meta device
        # cannot leave them empty; they follow the input's device on first use.
        self._rope: tuple[torch.Tensor, float] | None = None if learned else rope_frequencies(config)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 / nanoGPT initialisation: every matmul weight and embedding ~ N(0, 0.02), biases 0,
        norm weights 1. The projections that write into the residual stream (attention output
        and FFN down) use 0.02/√(2·n_layer): each block adds two such terms, so the variance of
        the residual stream stays O(1) at any depth instead of growing with n_layer.
        Works after `to_empty()` from the meta device (materialises every parameter)."""
        self.tie_weights()
        std = 0.02
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        for layer in self.layers:
            nn.init.normal_(layer.attn.o_proj.weight, mean=0.0, std=residual_std)
            if isinstance(layer.ffn, MoE):
                layer.ffn.init_weights(std, residual_std)
                if layer.ffn.shared is not None:
                    nn.init.normal_(layer.ffn.shared.down.weight, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(layer.ffn.down.weight, mean=0.0, std=residual_std)

    def tie_weights(self) -> None:
        """Make lm_head share the token embedding again when the config ties them. Moving a model
        off the meta device (`to_empty`) gives each module its own new Parameter, which unties
        them; `init_weights` and the checkpoint loaders call this."""
        if self.config.tie_embeddings and self.lm_head.weight is not self.tok_embeddings.weight:
            self.lm_head.weight = self.tok_embeddings.weight

    def rope_cos_sin(self, start: int, length: int, device: torch.device, dtype: torch.dtype):
        """cos and sin (length, head_dim) for positions start..start+length-1, as HF computes them."""
        inv_freq, attention_factor = self._rope
        if inv_freq.device != device:
            inv_freq = inv_freq.to(device)
            self._rope = (inv_freq, attention_factor)
        positions = torch.arange(start, start + length, device=device, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # an outer product, kept out of any matmul
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if attention_factor != 1.0:
            cos, sin = cos * attention_factor, sin * attention_factor
        return cos.to(dtype), sin.to(dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                kv_cache: KVCache | None = None, last_only: bool = False):
        """idx (B, S) token ids -> logits (B, S, vocab); with targets (B, S) -> (logits, loss),
        the mean cross-entropy over targets != -1, where logits is None when the loss is chunked
        (`loss_chunk_tokens` > 0: the full logits are never formed). With `kv_cache`, idx
        continues the cached sequence. `last_only` computes logits for the last position only
        (generation)."""
        B, S = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        x = self.tok_embeddings(idx)
        rope = None
        if self.pos_embeddings is not None:
            if start + S > self.config.block_size:
                raise ValueError(f"sequence of {start + S} tokens exceeds the {self.config.block_size} "
                                 "learned positions (block_size)")
            x = x + self.pos_embeddings(torch.arange(start, start + S, device=idx.device))
        else:
            rope = self.rope_cos_sin(start, S, idx.device, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, kv_cache)
        if kv_cache is not None:
            kv_cache.length += S
        moe = [layer.ffn for layer in self.layers if isinstance(layer.ffn, MoE)] if self.training else []
        record_load(moe)  # here, once per forward: activation checkpointing recomputes the blocks
        if self.norm is not None:
            x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        if targets is not None and self.loss_chunk_tokens:
            loss = chunked_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                         self.loss_chunk_tokens)
            return None, self.with_aux_loss(loss, moe)
        logits = self.lm_head(x)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, self.with_aux_loss(loss, moe)

    def with_aux_loss(self, loss: torch.Tensor, moe: list[MoE]) -> torch.Tensor:
        """In training, a MoE's loss plus router_aux_loss_coef × its load-balancing loss (as
        transformers' MixtralForCausalLM adds it); evaluation reports the language-model loss alone."""
        coef = self.config.router_aux_loss_coef
        return loss + coef * aux_loss(moe) if moe and coef else loss

    # ---- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue idx (B, S) by max_new_tokens sampled tokens -> (B, S + max_new_tokens).

        temperature 0 is greedy decoding. With the KV cache each step feeds one token; without
        it each step re-reads the last block_size tokens. Both give the same tokens; when the
        text would outgrow block_size the cache is not used (the window must slide, which
        changes every cached position).
        """
        block = self.config.block_size
        if idx.size(1) + max_new_tokens > block:
            use_cache = False
        cache = KVCache(self.config.n_layer, idx.size(1) + max_new_tokens) if use_cache else None
        out, step_input = idx, idx
        for _ in range(max_new_tokens):
            if cache is None:
                step_input = out[:, -block:]
            logits = self(step_input, kv_cache=cache, last_only=True)[:, -1].float()
            next_token = sample_next_token(logits, temperature, top_k, top_p, generator)
            out = torch.cat((out, next_token), dim=1)
            step_input = next_token
        return out


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits (B, vocab) -> (B, 1). temperature 0 means argmax."""
    if not 0 <= temperature < float("inf"):  # also refuses NaN
        raise UserError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus sampling: keep the smallest set of most likely tokens whose probability
        # reaches top_p (the most likely token always stays).
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
