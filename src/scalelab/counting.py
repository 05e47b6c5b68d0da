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
                               normalization="rmsnorm", rope=True, residual_bytes=4, compute_bytes=2,
                               autocast=False, attention="sdpa", q_dim=None, parts=False):
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
    q_dim = n_embd if q_dim is None else q_dim  # n_head · head_dim (Qwen3: not n_embd)
    stats = 4 * (2 if normalization == "layernorm" else 1)

    def norm(consumers):
        return r * n_embd + stats + c * n_embd * (consumers if autocast else 1)

    q_k = c * (q_dim + kv_dim) if rope else c * q_dim  # rotated Q and K (without RoPE: views of Q / [K|V])
    attn = norm(2) + q_k + 2 * c * kv_dim + c * q_dim + 4 * n_head
    if attention == "math":  # Q, K and V as the two matmuls keep them: K and V at n_head heads
        attn = norm(2) + 4 * c * q_dim + n_head * seq_len * (4 + (c if c != 4 else 0))
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
        normalization=a.normalization, rope=not a.learned_positions, residual_bytes=residual_bytes,
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
    copies = (2.0 * matmul_weights_arrays(n_layer, n_embd, n_head, num_key_value_heads, d_ff, vocab_size, **style)
              if autocast else np.zeros_like(total_params))
    a = Arch(*(np.asarray(x, dtype=np.float64) for x in (n_layer, n_embd, n_head, num_key_value_heads, d_ff,
                                                          vocab_size)), **style)
    unsharded = (2.0 * p["per_layer"] * compute_bytes if sharding == "fsdp" and num_devices > 1
                 else np.zeros_like(total_params))
    tokens = micro_batch * seq_len
    all_layers, largest_layer, head = layer_activation_bytes_per_token(
        a, seq_len, residual_bytes=residual, compute_bytes=compute_bytes, autocast=autocast, attention=attention)
    if activation_checkpointing:  # each block's input, plus one block's activations while it is recomputed
        layer_acts = tokens * (a.n_layer * residual * a.n_embd + largest_layer)
    else:
        layer_acts = tokens * all_layers
    activations = layer_acts + tokens * head + loss_bytes(tokens, a.vocab_size, compute_bytes, loss_chunk_tokens)
    out = {"weights": total_params * wb / shards, "gradients": total_params * gb / shards,
           "optimizer": total_params * ob / shards, "unsharded_buffers": unsharded, "weight_copies": copies,
           "activations": activations}
    out["total"] = sum(out.values())
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
