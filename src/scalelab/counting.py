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

import functools
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from scalelab.config import DEFAULT_LOSS_CHUNK_TOKENS, ModelConfig
from scalelab.hardware import Accelerator

# ---- the matmul list -------------------------------------------------------------------------
#
# Parameters, FLOPs and memory all sum over ONE description of the model: per block kind (attention,
# dense FFN, MoE, the head), the list of its matmuls, each (name, d_in, d_out, copies, per_token):
# `copies` weight matrices of d_in x d_out are held, and each token multiplies `per_token` of them
# (routed experts: copies = n_routed_experts, per_token = num_experts_per_tok, so the active fraction
# is k/E; everything else 1 and 1). Activation x activation products (attention's QKᵀ and AV) are in
# the list too, with `weight` false: FLOPs, no parameters. Parameters that are no matmul (norms,
# biases) are each block's `other`. A new block type is one function here.


def _times(n, x):
    """n · x, without an array pass when n is 1 (the planner's arrays hold a million shapes)."""
    return x if isinstance(n, int) and n == 1 else n * x


class Matmul(NamedTuple):  # a NamedTuple: the planner builds a few dozen per call, dataclasses cost more
    name: str
    d_in: Any  # numbers or numpy arrays (the planner's thousands of shapes broadcast through)
    d_out: Any
    copies: Any = 1  # weight matrices of this shape held (routed experts: n_routed_experts)
    per_token: Any = 1  # of those, how many each token multiplies (routed experts: num_experts_per_tok)
    weight: bool = True  # False: activation x activation (attention scores and values): no parameters
    stored: bool = True  # False: the weight is another parameter (a tied lm_head is the embedding)

    @property
    def params(self):
        return _times(self.copies, self.d_in * self.d_out) if self.weight and self.stored else 0

    @property
    def active_params(self):
        return _times(self.per_token, self.d_in * self.d_out) if self.weight and self.stored else 0

    @property
    def forward_flops_per_token(self):
        return 2 * _times(self.per_token, self.d_in * self.d_out)

    @property
    def active_fraction(self) -> float:
        return self.per_token / self.copies


class Block(NamedTuple):
    """`repeats` identical blocks (per model: n_layer attention blocks, ...), each with its matmuls
    and its other parameters by name (norms, biases)."""
    name: str
    repeats: Any
    matmuls: list[Matmul]
    other: dict[str, Any] = {}

    @property
    def params(self):  # one block
        return _sum([_pair_sum([(m.copies, m.d_in, m.d_out) for m in self.matmuls if m.weight and m.stored])]
                    + list(self.other.values()))

    @property
    def active_params(self):
        return _sum([_pair_sum([(m.per_token, m.d_in, m.d_out) for m in self.matmuls if m.weight and m.stored])]
                    + list(self.other.values()))

    def weights(self, active: bool = False):
        """Weights multiplied (tied or not): all copies, or with `active` those one token multiplies."""
        return _pair_sum([(m.per_token if active else m.copies, m.d_in, m.d_out) for m in self.matmuls if m.weight])

    @property
    def forward_flops_per_token(self):
        return 2 * self.matmul_products()

    def matmul_products(self):
        """Σ d_in · d_out per token over the matmuls a token goes through (FLOPs / 2)."""
        return _pair_sum([(m.per_token, m.d_in, m.d_out) for m in self.matmuls])


def _sum(terms: list):
    """Sum skipping literal zeros (absent biases, no weights), so arrays are added only when needed."""
    total = 0
    for t in terms:
        if not (isinstance(t, int) and t == 0):
            total = t if isinstance(total, int) and total == 0 else total + t
    return total


def _pair_sum(terms: list[tuple]):
    """Σ n·x·y over (n, x, y), with the products that share a factor (the same object: q, k and v all
    take n_embd) done as one x·(Σ n·y): over a million shapes each array pass counts."""
    groups: dict[int, tuple[Any, dict]] = {}
    for n, x, y in terms:
        if id(x) not in groups and id(y) in groups:
            x, y = y, x
        partners = groups.setdefault(id(x), (x, {}))[1]
        key = (id(y), n if isinstance(n, int) else id(n))  # the same partner at the same multiplicity
        times, _, _ = partners.get(key, (0, n, y))
        partners[key] = (times + 1, n, y)  # gate and up: n_embd x d_ff twice -> 2 · d_ff, one array pass
    return _sum([x * _sum([_times(times, _times(n, y)) for times, n, y in partners.values()])
                 for x, partners in groups.values()])


@dataclass(frozen=True)
class Arch:
    """What the matmul list needs: sizes (numbers or numpy arrays) and the style of a model, as in
    ModelConfig (head_dim None: n_embd // n_head). `arch(cfg)` builds it from a config."""
    n_layer: Any
    n_embd: Any
    n_head: Any
    num_key_value_heads: Any
    d_ff: Any
    vocab_size: Any
    head_dim: Any = None
    ffn_type: str = "swiglu"
    normalization: str = "rmsnorm"
    bias: bool = False
    qkv_bias: bool = False
    tie_embeddings: bool = False
    learned_positions: Any = 0
    final_norm: bool = True
    qk_norm: bool = False
    q_lora_rank: Any = None
    kv_lora_rank: Any = None
    qk_nope_head_dim: Any = None
    qk_rope_head_dim: Any = None
    v_head_dim: Any = None
    n_routed_experts: Any = 0
    num_experts_per_tok: Any = 0
    n_shared_experts: Any = 0
    moe_intermediate_size: Any = None
    first_k_dense_replace: Any = 0

    def __post_init__(self) -> None:
        if self.head_dim is None:  # computed once: an integer division over a million shapes is not free
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)

    @property
    def hd(self):
        return self.head_dim

    @property
    def norm(self):
        """Parameters of one norm over n_embd (LayerNorm has a bias iff `bias`)."""
        return self.n_embd * (2 if (self.normalization == "layernorm" and self.bias) else 1)

    @property
    def n_moe_layers(self):
        return self.n_layer - self.first_k_dense_replace if self.n_routed_experts else 0


ARCH_FIELDS = tuple(f for f in Arch.__dataclass_fields__ if f not in (
    "n_layer", "n_embd", "n_head", "num_key_value_heads", "d_ff", "vocab_size", "learned_positions", "final_norm"))


def arch(cfg: ModelConfig) -> Arch:
    """The Arch of a ModelConfig, in Python ints (exact)."""
    return Arch(*_shape_args(cfg), **_style_kwargs(cfg))


def attention_block(a: Arch, seq_len=0) -> Block:
    """Dense attention (MHA/GQA/MQA, any head_dim, optional q/k norm) or MLA."""
    if a.kv_lora_rank is not None:
        return mla_block(a, seq_len)
    q_dim, kv_dim = a.n_head * a.hd, a.num_key_value_heads * a.hd
    other = {"bias": (q_dim + 2 * kv_dim if a.bias or a.qkv_bias else 0) + (a.n_embd if a.bias else 0)}
    if a.qk_norm:
        other["qk_norm"] = 2 * a.hd  # one RMSNorm weight for the query heads, one for the key heads
    return Block("attention", a.n_layer, [
        Matmul("q_proj", a.n_embd, q_dim), Matmul("k_proj", a.n_embd, kv_dim), Matmul("v_proj", a.n_embd, kv_dim),
        Matmul("scores", q_dim, seq_len, weight=False),  # QKᵀ: each query head against S keys
        Matmul("values", seq_len, q_dim, weight=False),  # AV
        Matmul("o_proj", q_dim, a.n_embd)], other)


def mla_block(a: Arch, seq_len=0) -> Block:
    """Multi-head Latent Attention (DeepSeek-V2/V3), as transformers' DeepseekV3Attention computes it
    in training (the latent expanded to per-head keys and values; no weight absorption)."""
    qk_head = a.qk_nope_head_dim + a.qk_rope_head_dim
    if a.q_lora_rank is None:
        q = [Matmul("q_proj", a.n_embd, a.n_head * qk_head)]
        other = {}
    else:
        q = [Matmul("q_a_proj", a.n_embd, a.q_lora_rank), Matmul("q_b_proj", a.q_lora_rank, a.n_head * qk_head)]
        other = {"q_a_layernorm": a.q_lora_rank}
    other["kv_a_layernorm"] = a.kv_lora_rank
    return Block("attention", a.n_layer, q + [
        Matmul("kv_a_proj_with_mqa", a.n_embd, a.kv_lora_rank + a.qk_rope_head_dim),
        Matmul("kv_b_proj", a.kv_lora_rank, a.n_head * (a.qk_nope_head_dim + a.v_head_dim)),
        Matmul("scores", a.n_head * qk_head, seq_len, weight=False),
        Matmul("values", seq_len, a.n_head * a.v_head_dim, weight=False),
        Matmul("o_proj", a.n_head * a.v_head_dim, a.n_embd)], other)


def swiglu_matmuls(prefix: str, n_embd, hidden, copies=1, per_token=1) -> list[Matmul]:
    return [Matmul(f"{prefix}gate", n_embd, hidden, copies, per_token),
            Matmul(f"{prefix}up", n_embd, hidden, copies, per_token),
            Matmul(f"{prefix}down", hidden, n_embd, copies, per_token)]


def ffn_block(a: Arch) -> Block:
    """The dense FFN, in every layer of a dense model and the first first_k_dense_replace of a MoE."""
    if a.ffn_type == "swiglu":
        matmuls = swiglu_matmuls("", a.n_embd, a.d_ff)
    else:
        matmuls = [Matmul("up", a.n_embd, a.d_ff), Matmul("down", a.d_ff, a.n_embd)]
    n_in = 2 if a.ffn_type == "swiglu" else 1
    other = {"bias": (n_in * a.d_ff + a.n_embd) if a.bias else 0}
    return Block("ffn", a.n_layer - a.n_moe_layers if a.n_routed_experts else a.n_layer, matmuls, other)


def moe_block(a: Arch) -> Block:
    """The MoE FFN: router, routed experts (k of E per token), shared experts (every token)."""
    width = a.d_ff if a.moe_intermediate_size is None else a.moe_intermediate_size
    matmuls = [Matmul("router", a.n_embd, a.n_routed_experts)]
    matmuls += swiglu_matmuls("experts.", a.n_embd, width, a.n_routed_experts, a.num_experts_per_tok)
    if a.n_shared_experts:
        matmuls += swiglu_matmuls("shared_experts.", a.n_embd, a.n_shared_experts * width)
    return Block("moe", a.n_moe_layers, matmuls)


def head_block(a: Arch) -> Block:
    """The lm_head (a matmul even when tied to the embedding; then it stores nothing)."""
    return Block("head", 1, [Matmul("lm_head", a.n_embd, a.vocab_size, stored=not a.tie_embeddings)])


def blocks(a: Arch, seq_len=0) -> list[Block]:
    """Every block kind of the model with its repeat count (seq_len sets the attention matmuls' S)."""
    out = [attention_block(a, seq_len), ffn_block(a)]
    if a.n_routed_experts:
        out.append(moe_block(a))
    return out + [head_block(a)]


# ---- parameters -----------------------------------------------------------------------------

def _int_arch(n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size, style: dict[str, Any]) -> Arch:
    sizes = (np.asarray(x, dtype=np.int64) for x in (n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size))
    return Arch(*sizes, **style)


def param_breakdown_arrays(n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size, *,
                           ffn_type: str = "swiglu", normalization: str = "rmsnorm", bias: bool = False,
                           tie_embeddings: bool = False, learned_positions: int = 0,
                           final_norm: bool = True, qkv_bias: bool = False, **arch_fields: Any) -> dict[str, Any]:
    """Parameter counts by component, summed over the matmul list. Shapes may be numpy arrays (int64
    arithmetic). `bias`: every Linear but lm_head has one (and LayerNorm too); `qkv_bias`: the Q, K and
    V projections have one even without `bias` (Qwen2). Biases are no matmul, so no FLOPs.
    `arch_fields`: Arch's other fields (head_dim, qk_norm, the MLA and MoE sizes).
    `active`: the parameters one token's forward uses: all but the unchosen routed experts."""
    return _param_breakdown(_int_arch(n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size, dict(
        ffn_type=ffn_type, normalization=normalization, bias=bias, qkv_bias=qkv_bias, tie_embeddings=tie_embeddings,
        learned_positions=learned_positions, final_norm=final_norm, **arch_fields)))


def _param_breakdown(a: Arch) -> dict[str, Any]:
    """param_breakdown_arrays for an Arch of numbers (Python ints: exact and quick) or int64 arrays."""
    attn, ffn, *rest = blocks(a)
    head = rest[-1]
    norm = a.norm
    norms = a.n_layer * 2 * norm + (norm if a.final_norm else 0)
    token_embedding = a.vocab_size * a.n_embd
    position_embedding = np.int64(a.learned_positions) * a.n_embd
    lm_head = head.params if not a.tie_embeddings else np.int64(0)
    attn_params, ffn_params = attn.params, ffn.params
    out = {"attention": attn.repeats * attn_params, "ffn": ffn.repeats * ffn_params, "norms": norms,
           "token_embedding": token_embedding, "position_embedding": position_embedding, "lm_head": lm_head}
    layer = attn_params + ffn_params + 2 * norm  # a dense layer; a MoE model's largest is a MoE layer
    inactive = 0
    if a.n_routed_experts:
        moe = rest[0]
        for part in ("router", "experts.", "shared_experts."):
            out[part.rstrip(".")] = moe.repeats * sum(m.params for m in moe.matmuls if m.name.startswith(part))
        layer = attn_params + moe.params + 2 * norm
        inactive = moe.repeats * (moe.params - moe.active_params)
    out["embedding"] = token_embedding + position_embedding + lm_head
    out["non_embedding"] = _sum([v for k, v in out.items() if k not in (
        "token_embedding", "position_embedding", "lm_head", "embedding")])
    out["total"] = out["embedding"] + out["non_embedding"]
    out["active"] = out["total"] - inactive if a.n_routed_experts else out["total"]
    out["per_layer"] = layer
    return out


def _shape_args(cfg: ModelConfig) -> tuple:
    return (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.num_key_value_heads, cfg.ffn_hidden, cfg.vocab_size)


def _style_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Everything but the six sizes, as param_breakdown_arrays and Arch take it."""
    out = dict(ffn_type=cfg.ffn_type, normalization=cfg.normalization, bias=cfg.bias, qkv_bias=cfg.qkv_bias,
               tie_embeddings=cfg.tie_embeddings,
               learned_positions=cfg.block_size if cfg.position_encoding == "learned" else 0,
               final_norm=cfg.norm_position == "pre", head_dim=cfg.head_dim, qk_norm=cfg.qk_norm)
    if cfg.is_mla:
        out.update(q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                   qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim)
    if cfg.is_moe:
        out.update(n_routed_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                   n_shared_experts=cfg.n_shared_experts, moe_intermediate_size=cfg.expert_hidden,
                   first_k_dense_replace=cfg.first_k_dense_replace)
    return out


@dataclass(frozen=True)
class ParamCounts:
    total: int
    embedding: int  # token + learned position embeddings + untied lm_head (the vocabulary matrices)
    non_embedding: int  # everything else: attention, FFN, norms (Kaplan et al.'s N)
    breakdown: dict[str, int] = field(default_factory=dict)
    per_layer: int = 0  # the largest layer (a MoE layer in a MoE model)
    active: int = 0  # used by one token: total less the routed experts it does not choose (= total if dense)


BREAKDOWN_KEYS = ("attention", "ffn", "router", "experts", "shared_experts", "norms", "token_embedding",
                  "position_embedding", "lm_head")


def count_params(cfg: ModelConfig) -> ParamCounts:
    """Exact parameter counts; `total` equals sum(p.numel()) of the torch model. The breakdown has
    router / experts (routed) / shared_experts only for a MoE model."""
    p = {k: int(v) for k, v in _param_breakdown(arch(cfg)).items()}
    breakdown = {k: p[k] for k in BREAKDOWN_KEYS if k in p}
    return ParamCounts(total=p["total"], embedding=p["embedding"], non_embedding=p["non_embedding"],
                       breakdown=breakdown, per_layer=p["per_layer"], active=p["active"])


# ---- FLOPs ----------------------------------------------------------------------------------


def matmul_weights_arrays(n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size, *,
                          ffn_type: str = "swiglu", active: bool = False, **arch_fields: Any):
    """Number of weights that take part in a matmul (lm_head counted even if tied, because the tied
    matrix is still multiplied; the embedding lookup is not a matmul): every expert's, or with
    `active` only those one token multiplies (its k routed experts)."""
    a = _int_arch(n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size,
                  dict(ffn_type=ffn_type, **arch_fields))
    return _sum([_times(b.repeats, b.weights(active)) for b in blocks(a)])


def _forward_flops_per_token(a: Arch, seq_len):
    """Sum over the matmul list: 2 · d_in · d_out per token and matmul a token goes through."""
    return 2 * _sum([_times(b.repeats, b.matmul_products()) for b in blocks(a, seq_len)])


def forward_flops_per_token_arrays(n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size,
                                   seq_len, *, ffn_type: str = "swiglu", **arch_fields: Any):
    """Exact forward FLOPs per token at sequence length `seq_len` (see module docstring), of the active
    path (a token's k routed experts and the router included). Computed in float64 so a million shapes
    never overflow; exact below 2**53."""
    a = _int_arch(n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size, dict(ffn_type=ffn_type, **arch_fields))
    # the weight matmuls sum in int64 (exact; bounded by config's limits), the S-long attention ones in
    # float64 (seq_len a float promotes them), as the total is
    return np.asarray(_forward_flops_per_token(a, np.float64(seq_len) if np.ndim(seq_len) == 0
                                               else np.asarray(seq_len, dtype=np.float64)), dtype=np.float64)


def training_flops_per_token_arrays(*args, **kwargs):
    """3 × forward: the backward pass costs two forwards (grad wrt inputs and wrt weights)."""
    return 3.0 * forward_flops_per_token_arrays(*args, **kwargs)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    s = cfg.block_size if seq_len is None else seq_len
    return int(_forward_flops_per_token(arch(cfg), s))


def forward_flops(cfg: ModelConfig, batch_size: int, seq_len: int) -> int:
    """Forward FLOPs of one (batch_size, seq_len) batch, exactly as FlopCounterMode counts them."""
    return batch_size * seq_len * int(_forward_flops_per_token(arch(cfg), seq_len))


def training_flops(cfg: ModelConfig, batch_size: int, seq_len: int) -> int:
    return 3 * forward_flops(cfg, batch_size, seq_len)


def training_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    return 3 * forward_flops_per_token(cfg, seq_len)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token of the activation x activation matmuls (QKᵀ and AV), all layers."""
    b = attention_block(arch(cfg), seq_len)
    return b.repeats * sum(m.forward_flops_per_token for m in b.matmuls if not m.weight)


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
    # The MoE convention (DeepSeek-V3's, Megatron's MoE papers): 6 x the parameters a token activates.
    # Reported for MoE models only.
    "training_per_token_6n_active": "6N, N active parameters (MoE)",
}


def flops_report(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, Any]:
    """Exact FLOPs per token and the field's shortcuts (FLOPS_SHORTCUTS) beside them. For a MoE the
    exact count is the active path's, and the shortcuts that have a MoE form use it (see below)."""
    s = cfg.block_size if seq_len is None else seq_len
    n = count_params(cfg)
    fwd = forward_flops_per_token(cfg, s)
    attention = attention_flops_per_token(cfg, s)  # QKᵀ and AV at the model's own head widths
    # nanoGPT's and torchtitan's 12·L·H·S (3 passes x 2·(QKᵀ and AV) x L·S·H per token, no causal discount)
    # take H = n_heads x (dim // n_heads) = n_embd, whatever the model's head_dim
    attn_term = 12 * cfg.n_layer * cfg.n_embd * s
    gemm_weights = int(matmul_weights_arrays(*_shape_args(cfg), active=True, **_style_kwargs(cfg)))
    out = {
        "seq_len": s,
        "forward_per_token": fwd,
        "training_per_token": 3 * fwd,
        "training_per_token_6n": 6 * n.total,
        "training_per_token_6n_non_embedding": 6 * n.non_embedding,
        "training_per_token_nanogpt": 6 * (n.total - n.breakdown["position_embedding"]) + attn_term,
        # torchtitan's MoE models count the active parameters (router, shared experts, k/E of the experts)
        "training_per_token_torchtitan": 6 * (n.active - n.breakdown["token_embedding"]) + attn_term,
        "training_per_token_megatron": 6 * gemm_weights + 3 * attention // 2,
        "attention_share": attention / fwd,
    }
    if cfg.is_moe:
        out["training_per_token_6n_active"] = 6 * n.active
    return out


def gqa_comparison(cfg: ModelConfig, seq_len: int | None = None, kv_bytes: int = 2) -> dict[str, Any]:
    """What this model's KV-head count saves against the same model with full MHA. MLA has a K and V
    per head already (no parameters or FLOPs to compare); what its latent saves is the KV cache."""
    kv, kv_mha = kv_cache_bytes_per_token(cfg, kv_bytes), mha_kv_cache_bytes_per_token(cfg, kv_bytes)
    if cfg.is_mla:
        return {"attention_type": "MLA", "kv_cache_bytes_per_token": kv, "kv_cache_bytes_per_token_mha": kv_mha,
                "kv_cache_reduction": kv_mha / kv}
    mha = cfg.replace(num_key_value_heads=cfg.n_head)
    p, p_mha = count_params(cfg).total, count_params(mha).total
    f, f_mha = training_flops_per_token(cfg, seq_len), training_flops_per_token(mha, seq_len)
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
                               autocast=False, attention="sdpa", q_dim=None, parts=False):
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
    q_dim = n_embd if q_dim is None else q_dim  # n_head · head_dim (Qwen3: not n_embd)
    stats = 4 * (2 if normalization == "layernorm" else 1)

    def norm(consumers):
        return r * n_embd + stats + c * n_embd * (consumers if autocast else 1)

    # Q, K and V (rotated or not, they are what SDPA keeps: each its own projection's output); output; log-sum-exp
    attn = norm(3) + c * (q_dim + 2 * kv_dim) + c * q_dim + 4 * n_head
    if attention == "math":  # Q, K and V as the two matmuls keep them: K and V at n_head heads
        attn = norm(3) + 4 * c * q_dim + n_head * seq_len * (4 + (c if c != 4 else 0))
    ffn = norm(2 if ffn_type == "swiglu" else 1) + (4 if ffn_type == "swiglu" else 2) * c * d_ff
    head = norm(1) + 8  # final norm + lm_head input; token ids for the embedding (int64)
    return (attn, ffn, head) if parts else (attn + ffn, head)


def layer_activation_bytes_per_token(a: Arch, seq_len, *, residual_bytes=4, compute_bytes=2, autocast=False,
                                     attention="sdpa"):
    """Per token: (all layers, the largest layer, after the last layer) of activation_bytes_per_token,
    for any Arch. Dense attention and FFN are activation_bytes_per_token's proven list (with the
    model's head_dim); MLA attention and MoE FFN layers are estimates by the same rules (each
    Linear's input in the compute dtype, each norm's input and statistics, SwiGLU's four
    hidden-width tensors, SDPA's output and log-sum-exp), not yet checked tensor by tensor against the
    MLA/MoE modules, and q/k norms are not counted."""
    c = compute_bytes
    attn, ffn, head = activation_bytes_per_token(
        a.n_embd, a.num_key_value_heads * a.hd, a.d_ff, a.n_head, seq_len, ffn_type=a.ffn_type,
        normalization=a.normalization, residual_bytes=residual_bytes,
        compute_bytes=compute_bytes, autocast=autocast, attention=attention, q_dim=a.n_head * a.hd, parts=True)
    stats = 4 * (2 if a.normalization == "layernorm" else 1)

    def norm(consumers):
        return residual_bytes * a.n_embd + stats + c * a.n_embd * (consumers if autocast else 1)

    if a.kv_lora_rank is not None:
        attn = mla_activation_bytes(a, norm, c, seq_len, attention)
    layer = attn + ffn
    if not a.n_routed_experts:
        return a.n_layer * layer, layer, head
    width = a.d_ff if a.moe_intermediate_size is None else a.moe_intermediate_size
    moe = (norm(2) + 2 * 4 * a.n_routed_experts  # router logits and scores, fp32
           + a.num_experts_per_tok * (2 * c * a.n_embd + 4 * c * width)  # each chosen expert's input, SwiGLU, output
           + 4 * c * a.n_shared_experts * width)
    moe_layer = attn + moe
    n_moe = a.n_moe_layers
    return (a.n_layer - n_moe) * layer + n_moe * moe_layer, np.maximum(layer, moe_layer), head


def mla_activation_bytes(a: Arch, norm, c, seq_len, attention):
    """MLA's half of one layer's activations per token (an estimate; see layer_activation_bytes_per_token)."""
    qk, v = a.n_head * (a.qk_nope_head_dim + a.qk_rope_head_dim), a.n_head * a.v_head_dim
    q_path = 0 if a.q_lora_rank is None else 2 * c * a.q_lora_rank + 4  # q_a_layernorm input + stats, q_b input
    latent = 2 * c * a.kv_lora_rank + 4  # kv_a_layernorm input + stats, kv_b input
    if attention == "math":
        core = 2 * c * qk + 2 * c * v + a.n_head * seq_len * (4 + (c if c != 4 else 0))
    else:
        core = 2 * c * qk + c * v + c * v + 4 * a.n_head  # Q, K, V; SDPA output; log-sum-exp
    return norm(2) + q_path + latent + core


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


def block_matmuls(n_embd, kv_dim, d_ff, *, ffn_type: str = "swiglu") -> list[tuple[Any, Any]]:
    """(in, out) widths of one block's matmuls in the order its forward runs them: q_proj, k_proj,
    v_proj (separate, as torchtitan's and transformers' LLaMA have them), o_proj, then gate (SwiGLU
    only), up, down."""
    ffn = [(n_embd, d_ff)] * (2 if ffn_type == "swiglu" else 1) + [(d_ff, n_embd)]
    return [(n_embd, n_embd), (n_embd, kv_dim), (n_embd, kv_dim), (n_embd, n_embd), *ffn]


def selective_op_saved_per_token(n_embd, kv_dim, d_ff, n_head, *, ffn_type: str = "swiglu", residual_bytes=4,
                                 compute_bytes=2, attention: str = "sdpa"):
    """Bytes per token one block keeps under selective-by-op checkpointing (parallel.py's
    _selective_op_context, torchtitan's policy): its input (the checkpoint's argument, residual
    dtype), the outputs of the 1st, 3rd, 5th ... matmul, and the fused attention's output and fp32
    log-sum-exp per head (the math path's matmuls are not on the save list: nothing)."""
    mms = block_matmuls(n_embd, kv_dim, d_ff, ffn_type=ffn_type)
    saved = sum(out for i, (_, out) in enumerate(mms) if i % 2 == 0)
    attn = compute_bytes * n_embd + 4 * n_head if attention == "sdpa" else 0
    return residual_bytes * n_embd + compute_bytes * saved + attn


def saved_activations_per_token(per_layer, n_layer, n_embd, kv_dim, d_ff, n_head, *, mode: str = "none",
                                option: str = "op", ffn_type: str = "swiglu", residual_bytes=4,
                                compute_bytes=2, attention: str = "sdpa"):
    """Bytes per token all blocks keep for backward under a checkpointing mode, given `per_layer`
    (activation_bytes_per_token's block figure, what one unwrapped block keeps): a fully
    recomputed block keeps only its input; selective-by-op keeps selective_op_saved_per_token."""
    wrapped = checkpointed_layer_count(n_layer, mode, option)
    if mode == "selective" and option == "op":
        kept = selective_op_saved_per_token(n_embd, kv_dim, d_ff, n_head, ffn_type=ffn_type,
                                            residual_bytes=residual_bytes, compute_bytes=compute_bytes,
                                            attention=attention)
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
# What the device holds at five moments of a steady-state step (step >= 2: optimizer state exists,
# gradients were freed by zero_grad(set_to_none=True) after the last step), by component; the peak
# is the largest (docs/memory.md has every formula):
#   forward_end     weights, optimizer, DDP buckets, autocast weight copies, saved activations,
#                   FSDP's gathered root unit and last block, lm_head's gradient when the chunked loss forms it
#   loss_backward   forward_end + the loss temporaries (unchunked: fp32 log-probabilities and two fp32
#                   gradients per logit; chunked: one chunk's buffers)
#   backward        the first recomputed block: saved activations + one block recomputed + FSDP's
#                   root and two gathered blocks + the root's gradients
#   gradient_reduce FSDP only, the end of backward: the root unit's reduce-scatter (its fp32 input,
#                   and gloo's copy of it on the CPU) beside every sharded gradient and lm_head's
#   optimizer_step  weights, gradients, optimizer, DDP buckets and the optimizer's temporaries
# Under gradient accumulation (k > 1 micro-batches per step) the first three are those of micro-batches
# 2..k, which also hold the gradients accumulated so far (accumulated_gradient_bytes).
# A runtime reserve (CUDA context, caching-allocator fragmentation) is shown separately.

PHASES = ("forward_end", "loss_backward", "backward", "gradient_reduce", "optimizer_step")
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


def cpu_rms_norm_extra_bytes(residual_bytes):
    """Bytes per element one RMSNorm keeps on the CPU beyond what the fused kernel's rule counts
    (its input in the residual dtype, its statistics, and its output, which the next Linear saves).
    PyTorch's CPU rms_norm is a composite that saves its input in fp32 (the input itself when it is
    fp32, else an fp32 copy, and then not the 16-bit input) and the fp32 normalised input: 8 bytes
    where the rule counts the input's own, 4 or 2 (measured tensor by tensor: tests/test_memory.py;
    live, at the step's peak: tests/test_memory_timeline.py's FSDP bf16 rows)."""
    return 8 - residual_bytes


def fsdp_unsharded_bytes(per_layer_params, root_params, compute_bytes, *, sharded: bool):
    """FSDP2's gathered (unsharded) parameters, in the compute dtype (MixedPrecisionPolicy's
    param_dtype), as (after forward, during backward): after forward, the root unit (embeddings,
    final norm, lm_head) and the last block, which apply_fsdp keeps gathered for backward; during
    a block's backward, the root and two blocks (the current one and the prefetched next). A
    block's unsharded gradient and its reduce-scatter input appear only after its backward has
    freed what it recomputed and saved, and are smaller (the root's, at the end of backward, is
    gradient_reduce's). Zero without FSDP over more than one device."""
    if not sharded:
        return 0.0, 0.0
    after_forward = (root_params + per_layer_params) * compute_bytes
    during_backward = root_params * compute_bytes + per_layer_params * 2 * compute_bytes
    return after_forward, during_backward


def fsdp_reduce_scatter_bytes(root_params, *, sharded: bool, device: str):
    """The root unit's reduce-scatter at the end of backward, the largest of FSDP2's: its input in
    the fp32 reduce dtype (MixedPrecisionPolicy(reduce_dtype=fp32)), and on the CPU a second copy,
    which ProcessGroupGloo's reduce_scatter_tensor makes of its input (NCCL reduces in place)."""
    if not sharded:
        return 0.0
    return root_params * 4.0 * (2 if device == "cpu" else 1)


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


def accumulated_gradient_bytes(gradients, grad_accum_steps):
    """Gradients already accumulated when micro-batches 2..k of an optimizer step run their forward,
    loss and backward (the trainer's train_step: `grad_accum_steps` forward/backward passes of
    `loss / accum`; ParallelDims.grad_sync): the step's `gradients`, the size they end at. Without
    FSDP every parameter's .grad at full size (one process, and DDP under no_sync, which reduces
    nothing until the last micro-batch), added into in place by later backwards. Under FSDP2 each
    micro-batch reduce-scatters, so what accumulates is the sharded gradient (keeping the
    gradients unsharded until the last micro-batch would hold 4 bytes per parameter on every
    device: 29.9 GiB for an 8B model). Nothing with one micro-batch per step."""
    if isinstance(grad_accum_steps, int) and grad_accum_steps == 1:
        return 0.0
    return np.where(np.asarray(grad_accum_steps) > 1, gradients, 0.0)


def root_gradient_bytes(root_params, lm_head_params, loss_gradient, gradient_bytes, compute_bytes,
                        grad_accum_steps=1, *, fsdp: bool):
    """The root unit's gradients (embeddings, final norm, lm_head) the loss's backward forms, new at
    the start of backward beside the saved activations, less `loss_gradient` (lm_head's, which the
    chunked loss forms in forward). Under FSDP2, lm_head's unsharded gradient in the compute dtype
    (the root's post-backward runs only once the embedding's gradient exists, at the end); without
    FSDP the embedding's and lm_head's, in the gradient dtype. Under gradient accumulation without
    FSDP, the micro-batches that set the peak (2..k) add them into the accumulated .grad in place:
    nothing beyond accumulated_gradient_bytes."""
    held = (lm_head_params * compute_bytes if fsdp else root_params * gradient_bytes) - loss_gradient
    if fsdp or (isinstance(grad_accum_steps, int) and grad_accum_steps == 1):
        return held
    return np.where(np.asarray(grad_accum_steps) > 1, 0.0, held)


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
    # micro-batches 2..k of gradient accumulation run forward and backward beside the gradients so far
    in_micro_batch = persistent + c["accumulated_gradients"]
    forward = c["weight_copies"] + c["activations"] + c["fsdp_unsharded"] + c["loss_gradient"]
    root_gradients = c["loss_gradient"] + c["root_gradients"]
    return {
        "forward_end": in_micro_batch + forward,
        "loss_backward": in_micro_batch + forward + c["loss"],
        "backward": (in_micro_batch + c["weight_copies"] + c["activations"] + c["recompute"]
                     + c["fsdp_unsharded_backward"] + root_gradients),
        "gradient_reduce": persistent + c["gradients"] + np.where(c["fsdp_reduce_scatter"] > 0,
                                                                   root_gradients + c["fsdp_reduce_scatter"], 0.0),
        "optimizer_step": persistent + c["gradients"] + c["optimizer_step"],
    }


def training_memory(cfg: ModelConfig, *, micro_batch: int = 1, seq_len: int | None = None,
                    num_devices: int = 1, sharding: str = "fsdp", precision: str = "bf16-mixed",
                    activation_checkpointing: Any = "none", selective_ac_option: Any = "op",
                    attention: str = "sdpa", loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS,
                    optimizer_impl: str = "fused", device: str = "cuda", grad_accum_steps: int = 1) -> dict[str, Any]:
    """Peak training memory per device, in bytes, over one steady-state step, by named component
    (training_memory_arrays; docs/memory.md): `peak` is the allocated peak, `peak_phase` when it
    occurs, `runtime_reserve` what the device holds beyond it, and `total` = peak + reserve, what
    the device must have. `optimizer_impl` is AdamW's implementation (the trainer: fused on CUDA,
    for-loop on the CPU) and `device` cuda or cpu (the CPU has no reserve, and its composite
    RMSNorm keeps one more vector per norm). `grad_accum_steps` is the micro-batches per optimizer
    step (the trainer's gradient accumulation): from the second on, the accumulated gradients
    are live through forward and backward (`accumulated_gradients`)."""
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
                                   device=device, grad_accum_steps=grad_accum_steps, **_style_kwargs(cfg))
    out: dict[str, Any] = {k: (PHASES[int(v)] if k == "peak_phase" else float(v)) for k, v in parts.items()}
    out.update(micro_batch=micro_batch, seq_len=s, num_devices=num_devices, sharding=sharding,
               precision=precision, activation_checkpointing=mode, selective_ac_option=option,
               loss_chunk_tokens=loss_chunk_tokens, optimizer_impl=optimizer_impl, device=device,
               grad_accum_steps=grad_accum_steps)
    return out


# The components training_memory_arrays returns (bytes per device), then the per-phase totals
# ("phase_" + each of PHASES), "peak", "peak_phase", "runtime_reserve" and "total".
MEMORY_COMPONENTS = ("weights", "gradients", "accumulated_gradients", "optimizer", "weight_copies", "activations",
                     "loss", "loss_gradient", "fsdp_unsharded", "fsdp_unsharded_backward", "fsdp_reduce_scatter",
                     "ddp_buckets", "recompute", "root_gradients", "optimizer_step")


def training_memory_arrays(n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size, *, seq_len: int,
                           micro_batch: int = 1, num_devices: int = 1, sharding: str = "fsdp",
                           precision: str = "bf16-mixed", activation_checkpointing: Any = "none",
                           selective_ac_option: Any = "op", attention: str = "sdpa",
                           loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS, optimizer_impl: str = "fused",
                           device: str = "cuda", grad_accum_steps: Any = 1, **style: Any) -> dict[str, Any]:
    """`training_memory` over numpy arrays of shapes (the planner's memory filter), same model.
    `style` takes param_breakdown_arrays' keywords (ffn_type, normalization, bias, ...).
    Returns bytes per device by component (MEMORY_COMPONENTS) as float64 arrays (0.0 where a
    component does not apply), each phase's total
    ("phase_<name>"), the allocated "peak" and its "peak_phase" (an index into PHASES), "runtime_reserve"
    and "total" = peak + runtime_reserve."""
    mode, option = checkpointing(activation_checkpointing, selective_ac_option)
    if optimizer_impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"optimizer_impl must be one of {', '.join(OPTIMIZER_IMPLS)}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}")
    if np.any(np.asarray(grad_accum_steps) < 1):
        raise ValueError(f"grad_accum_steps must be at least 1, got {grad_accum_steps}")
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
                                           **style).astype(np.float64)
    copies = (autocast_weight_copy_bytes(matmul_weights, lm_head_params, n_layer,
                                         checkpointed_layer_count(n_layer, mode, option)) if autocast else 0.0)
    # FSDP's root unit: embeddings, lm_head and the final norm (a MoE model's layers differ in size)
    final_norm = (np.asarray(n_embd, dtype=np.float64) * (1 + (style.get("normalization") == "layernorm"
                                                                and bool(style.get("bias"))))
                  if style.get("final_norm", True) else 0.0)
    root_params = p["embedding"].astype(np.float64) + final_norm
    a = Arch(*(np.asarray(x, dtype=np.float64) for x in (n_layer, n_embd, n_head, num_key_value_heads, d_ff,
                                                          vocab_size)), **style)
    n_layer, n_embd, n_head, d_ff, vocab = a.n_layer, a.n_embd, a.n_head, a.d_ff, a.vocab_size
    kv_dim = a.num_key_value_heads * a.hd
    tokens = micro_batch * seq_len
    all_layers, largest_layer, head = layer_activation_bytes_per_token(
        a, seq_len, residual_bytes=residual, compute_bytes=compute_bytes, autocast=autocast, attention=attention)
    if device == "cpu" and style.get("normalization", "rmsnorm") == "rmsnorm":
        extra = cpu_rms_norm_extra_bytes(residual) * n_embd
        all_layers = all_layers + n_layer * 2 * extra
        largest_layer, head = largest_layer + 2 * extra, head + extra
    # checkpointing modes over the mean layer (every layer, for a dense model); selective-by-op's
    # save list is the dense block's (block_matmuls)
    blocks = saved_activations_per_token(all_layers / n_layer, n_layer, n_embd, kv_dim, d_ff, n_head, mode=mode,
                                         option=option, ffn_type=ffn_type, residual_bytes=residual,
                                         compute_bytes=compute_bytes, attention=attention)
    # backward meets the last block first; when it is wrapped, it is recomputed whole
    recompute = tokens * largest_layer * last_block_wrapped(n_layer, mode, option)
    # the chunked loss forms lm_head's weight gradient in forward, in the dtype lm_head computes in
    loss_gradient = lm_head_params * (compute_bytes if fsdp else PRECISIONS[precision][1]) if loss_chunk_tokens else 0.0
    unsharded_fwd, unsharded_bwd = fsdp_unsharded_bytes(p["per_layer"].astype(np.float64), root_params,
                                                        compute_bytes, sharded=bool(fsdp))
    c = {"weights": weights, "gradients": gradients,
         "accumulated_gradients": accumulated_gradient_bytes(gradients, grad_accum_steps),
         "optimizer": optimizer, "weight_copies": copies,
         "activations": tokens * (blocks + head),
         "loss": loss_bytes(tokens, vocab, compute_bytes, loss_chunk_tokens) + chunked_loss_weight_transients(
             lm_head_params, loss_chunk_tokens, autocast=autocast),
         "loss_gradient": loss_gradient,
         "fsdp_unsharded": unsharded_fwd, "fsdp_unsharded_backward": unsharded_bwd,
         "fsdp_reduce_scatter": fsdp_reduce_scatter_bytes(root_params, sharded=bool(fsdp), device=device),
         "ddp_buckets": ddp_bucket_bytes(total_params, PRECISIONS[precision][1], ddp=sharding == "ddp"),
         "recompute": recompute,
         "root_gradients": root_gradient_bytes(root_params, lm_head_params, loss_gradient, PRECISIONS[precision][1],
                                               compute_bytes, grad_accum_steps, fsdp=bool(fsdp)),
         "optimizer_step": optimizer_step_bytes(total_params, np.maximum(lm_head_params, n_embd * d_ff), shards,
                                                optimizer_impl)}
    out = dict(c)
    phases = step_phases(c)
    for k in PHASES:
        out[f"phase_{k}"] = phases[k]
    out["peak"] = functools.reduce(np.maximum, (phases[k] for k in PHASES))
    # the first phase that reaches the peak, as an index into PHASES (training_memory names it)
    out["peak_phase"] = np.select([phases[k] == out["peak"] for k in PHASES], list(range(len(PHASES))))
    out["runtime_reserve"] = runtime_reserve_bytes(out["peak"], device)
    out["total"] = out["peak"] + out["runtime_reserve"]
    return out


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_element: int = 2) -> int:
    """Inference KV cache per token: K and V for every layer at the KV-head count (GQA-aware); under
    MLA the compressed latent (kv_lora_rank) plus the one shared RoPE key (qk_rope_head_dim) per layer,
    the point of MLA (DeepSeek-V2 section 2.1)."""
    if cfg.is_mla:
        return cfg.n_layer * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * bytes_per_element
    return 2 * cfg.n_layer * cfg.kv_dim * bytes_per_element


def mha_kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_element: int = 2) -> int:
    """What the cache would hold with a K and a V per query head: MHA's, at this model's head widths
    (under MLA: the expanded per-head keys, qk_nope_head_dim + qk_rope_head_dim, and values)."""
    if cfg.is_mla:
        per_head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
        return cfg.n_layer * cfg.n_head * per_head * bytes_per_element
    return 2 * cfg.n_layer * cfg.n_head * cfg.head_dim * bytes_per_element


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
