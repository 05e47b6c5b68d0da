"""ModelConfig: the one pure-Python description of a transformer architecture.

Everything scalelab says about a model (parameters, FLOPs, memory, time, predicted loss) and
the torch model itself are derived from this dataclass. No torch here: `scalelab count` and
`scalelab plan` import this module and must start instantly.

Field names follow the original system (and DESIGN.md): n_layer, n_head, n_embd,
num_key_value_heads, d_ff / ffn_expansion_ratio, ... MHA is num_key_value_heads == n_head,
MQA is 1, GQA anything in between that divides n_head.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from scalelab.errors import UserError

import tomllib  # Python >= 3.11, the floor pyproject.toml declares and CI runs

NORMALIZATIONS = ("layernorm", "rmsnorm")
POSITION_ENCODINGS = ("learned", "rope")
FFN_TYPES = ("gelu", "swiglu")
NORM_POSITIONS = ("pre", "post")
ROPE_SCALING_TYPES = ("linear", "llama3", "yarn")
SCORING_FUNCS = ("softmax", "sigmoid")  # router scores over all experts, before top-k
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")  # DeepSeek's config.json names

# The MoE fields, with the value that means "not set": on a dense model (n_routed_experts 0) each must
# keep it. (n_routed_experts itself is the switch.)
MOE_DEFAULTS: dict[str, Any] = {
    "num_experts_per_tok": None, "n_shared_experts": 0, "moe_intermediate_size": None,
    "first_k_dense_replace": 0, "scoring_func": "softmax", "topk_method": "greedy", "n_group": None,
    "topk_group": None, "norm_topk_prob": False, "routed_scaling_factor": 1.0, "router_aux_loss_coef": 0.0,
}
# The MLA fields other than kv_lora_rank (its switch); all None on a non-MLA model.
MLA_FIELDS = ("q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")

# Tokens per chunk of the model's chunked lm_head + cross-entropy (scalelab.model.LinearCrossEntropy),
# on by default for training (train.loss_chunk_tokens; 0 = unchunked). It says how the loss is
# computed, not what the architecture is, so it is not a ModelConfig field. One chunk holds an fp32
# [chunk × vocab] buffer: 0.5 GiB at LLaMA 3's 128,256-token vocabulary (0.75 GiB with its bf16
# form), against 11.7 GiB for the unchunked loss of one 8,192-token micro-batch
# (counting.loss_bytes), while each chunk's matmuls (1024 × n_embd × vocab) stay large enough to
# run at full matmul speed.
DEFAULT_LOSS_CHUNK_TOKENS = 1024

# Keys each rope_scaling type accepts (Hugging Face names), with defaults where HF has them.
ROPE_SCALING_KEYS: dict[str, dict[str, Any]] = {
    "linear": {"factor": None},
    "llama3": {"factor": None, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": None},
    "yarn": {"factor": None, "original_max_position_embeddings": None,
             "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": None,
             # DeepSeek-V2/V3: attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor,
             # mscale_all_dim) when both are set (transformers' _compute_yarn_parameters)
             "mscale": None, "mscale_all_dim": None},
}


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer. Sizes are validated on construction.

    d_ff: the FFN hidden width. If unset it is derived from ffn_expansion_ratio (default 4
    for GELU, 8/3 for SwiGLU) as LLaMA does: int(ratio * n_embd) rounded up to a multiple of
    `multiple_of`. Setting both is allowed only when they agree.

    sliding_window: if set, a query at position i attends to keys j with i - window < j <= i
    (Mistral-7B-v0.1's 4096; exactly transformers' definition), else to every j <= i. It changes
    what attention computes, not its parameters or (by our dense convention) its FLOPs.

    bias: every Linear except lm_head has a bias (and LayerNorm has one). qkv_bias: the query and
    key/value projections have one even when `bias` is false (Qwen2: not o_proj, not the FFN).

    head_dim: the width of one query/key head (and value head, outside MLA). None (the default)
    means n_embd // n_head, as before; set it when n_head · head_dim != n_embd (Qwen3). After
    construction it always holds the number. qk_norm: Qwen3's RMSNorm over head_dim applied to every
    query and key head (one weight of head_dim each, shared by the heads), before RoPE.

    Multi-head Latent Attention (DeepSeek-V2/V3), on when kv_lora_rank is set: the keys and values
    come from a kv_lora_rank latent (kv_a_proj_with_mqa: n_embd -> kv_lora_rank + qk_rope_head_dim,
    RMSNorm on the latent, kv_b_proj: kv_lora_rank -> n_head · (qk_nope_head_dim + v_head_dim)); one
    RoPE key of qk_rope_head_dim is shared by all heads. The query is full-rank (n_embd -> n_head ·
    (qk_nope_head_dim + qk_rope_head_dim)) or, with q_lora_rank, low-rank (q_a_proj, RMSNorm, q_b_proj).
    head_dim is then qk_nope_head_dim + qk_rope_head_dim; o_proj takes n_head · v_head_dim.

    Mixture-of-Experts feed-forward, on when n_routed_experts > 0 (Hugging Face's names):
    num_experts_per_tok routed experts of width moe_intermediate_size (None: d_ff, Mixtral's
    convention) per token, plus one shared SwiGLU of width n_shared_experts · moe_intermediate_size
    that every token passes; the first first_k_dense_replace layers keep the dense FFN of width d_ff.
    The router (n_embd -> n_routed_experts, no bias) scores every expert with scoring_func (softmax:
    Mixtral, Qwen3-MoE, DeepSeek-V2; sigmoid: DeepSeek-V3) before choosing the top k, by
    topk_method: greedy (top-k of the scores), group_limited_greedy (DeepSeek-V2: the experts split
    into n_group groups, a group scored by its best expert, top-k among the topk_group best groups)
    or noaux_tc (DeepSeek-V3: a per-expert e_score_correction_bias, not learned by gradient, is
    added to the scores for the choice only; a group is scored by the sum of its two best). The
    chosen experts' scores are the gate weights, divided by their sum when norm_topk_prob (Mixtral
    and Qwen3-30B-A3B renormalise, DeepSeek-V2-Lite does not), then times routed_scaling_factor.
    router_aux_loss_coef weights the load-balancing loss in training (0 = none).
    """

    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    block_size: int = 2048
    num_key_value_heads: int | None = None
    d_ff: int | None = None
    ffn_expansion_ratio: float | None = None
    multiple_of: int = 1
    normalization: str = "rmsnorm"
    norm_eps: float = 1e-5
    position_encoding: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    ffn_type: str = "swiglu"
    norm_position: str = "pre"
    bias: bool = False
    qkv_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None
    family: str = "custom"  # name prefix only: 'gpt2', 'llama2', 'llama3', 'mistral', ...
    head_dim: int | None = None  # None: n_embd // n_head (MLA: qk_nope_head_dim + qk_rope_head_dim)
    qk_norm: bool = False
    # Multi-head Latent Attention (kv_lora_rank None = not MLA)
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    # Mixture-of-Experts (n_routed_experts 0 = dense)
    n_routed_experts: int = 0
    num_experts_per_tok: int | None = None
    n_shared_experts: int = 0
    moe_intermediate_size: int | None = None
    first_k_dense_replace: int = 0
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    router_aux_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.n_head)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", default_head_dim(self))
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
        validate(self)

    # ---- derived sizes -------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def expert_hidden(self) -> int:
        """The width of one routed (and of one shared) expert: moe_intermediate_size, else d_ff."""
        return self.ffn_hidden if self.moe_intermediate_size is None else self.moe_intermediate_size

    @property
    def n_moe_layers(self) -> int:
        """Layers whose FFN is the MoE (the last n_layer - first_k_dense_replace); 0 for a dense model."""
        return self.n_layer - self.first_k_dense_replace if self.is_moe else 0

    @property
    def q_dim(self) -> int:
        """Width of the query projection's output: n_head · head_dim."""
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the K (and of the V) projection: num_key_value_heads * head_dim."""
        return self.num_key_value_heads * self.head_dim

    @property
    def ffn_hidden(self) -> int:
        """The FFN hidden width actually used (explicit d_ff wins, else derived)."""
        if self.d_ff is not None:
            return self.d_ff
        return derive_d_ff(self.n_embd, self.effective_ffn_ratio, self.multiple_of)

    @property
    def effective_ffn_ratio(self) -> float:
        if self.ffn_expansion_ratio is not None:
            return self.ffn_expansion_ratio
        if self.d_ff is not None:
            return self.d_ff / self.n_embd
        return 4.0 if self.ffn_type == "gelu" else 8.0 / 3.0

    @property
    def attention_type(self) -> str:
        """'MLA', 'MHA', 'MQA' or 'GQA<k>' (k = number of KV heads)."""
        if self.is_mla:
            return "MLA"
        if self.num_key_value_heads == self.n_head:
            return "MHA"
        if self.num_key_value_heads == 1:
            return "MQA"
        return f"GQA{self.num_key_value_heads}"

    def name(self) -> str:
        """e.g. 'llama3-32L-4096H-32A-GQA8' (layers, hidden, attention heads, attention type); a MoE adds
        its experts as '-E<routed>k<per token>' and '+<shared>s' (Mixtral 8x7B: '...-GQA8-E8k2')."""
        name = f"{self.family}-{self.n_layer}L-{self.n_embd}H-{self.n_head}A-{self.attention_type}"
        if self.is_moe:
            name += f"-E{self.n_routed_experts}k{self.num_experts_per_tok}"
            name += f"+{self.n_shared_experts}s" if self.n_shared_experts else ""
        return name

    def summary(self) -> list[tuple[str, str]]:
        """Rows for a human-readable table."""
        kv = self.num_key_value_heads
        attn = {"MHA": "MHA (multi-head)", "MQA": "MQA (multi-query, 1 KV head)",
                "MLA": f"MLA (latent KV {self.kv_lora_rank} + shared RoPE key {self.qk_rope_head_dim})"}.get(
            self.attention_type, f"GQA ({kv} KV heads, {self.n_head // kv}:1 Q:KV)")
        rows = [
            ("Name", self.name()),
            ("Layers", str(self.n_layer)),
            ("Hidden size", str(self.n_embd)),
            ("Attention heads", str(self.n_head)),
            ("KV heads", str(kv)),
            ("Attention Type", attn),
            ("Head dim", str(self.head_dim) + (", q/k RMSNorm" if self.qk_norm else "")),
        ]
        if self.is_mla:
            q = "full rank" if self.q_lora_rank is None else f"low rank {self.q_lora_rank}"
            rows.append(("MLA", f"query {q}; kv_lora_rank {self.kv_lora_rank}; q/k nope {self.qk_nope_head_dim} + "
                                f"rope {self.qk_rope_head_dim}; v {self.v_head_dim}"))
        rows.append(("FFN", f"{self.ffn_type}, d_ff {self.ffn_hidden} ({self.ffn_hidden / self.n_embd:.3g}x)"
                     + (f" in the first {self.first_k_dense_replace} layers" if self.is_moe else "")))
        if self.is_moe:
            shared = f" + {self.n_shared_experts} shared" if self.n_shared_experts else ""
            groups = (f", {self.topk_group} of {self.n_group} groups" if self.n_group else "")
            norm = ", renormalised" if self.norm_topk_prob else ""
            scale = f", x{self.routed_scaling_factor:g}" if self.routed_scaling_factor != 1 else ""
            rows += [("MoE", f"{self.n_moe_layers} layers: {self.num_experts_per_tok} of {self.n_routed_experts} "
                             f"routed experts{shared}, width {self.expert_hidden}"),
                     ("Router", f"{self.scoring_func}, {self.topk_method}{groups}{norm}{scale}"
                                + (f", aux loss {self.router_aux_loss_coef:g}" if self.router_aux_loss_coef else ""))]
        rows += [
            ("Vocabulary", str(self.vocab_size)),
            ("Context (block_size)", str(self.block_size)),
            ("Normalization", f"{self.normalization} ({self.norm_position}-norm, eps {self.norm_eps:g})"),
        ]
        if self.position_encoding == "rope":
            scaling = "" if not self.rope_scaling else f", scaling {self.rope_scaling}"
            rows.append(("Positions", f"RoPE (theta {self.rope_theta:g}{scaling})"))
        else:
            rows.append(("Positions", "learned"))
        rows.append(("Attention window", f"sliding, {self.sliding_window} tokens" if self.sliding_window
                     else "full causal"))
        bias = "q, k, v projections only" if self.qkv_bias and not self.bias else str(self.bias)
        rows += [("Bias", bias), ("Tied embeddings", str(self.tie_embeddings))]
        return rows

    # ---- (de)serialisation -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Fields with non-None values (TOML has no null), and no head_dim when it is the derived one."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if self.head_dim == default_head_dim(self):
            del out["head_dim"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "model config") -> "ModelConfig":
        return cls(**check_fields(data, where=where))

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_toml(cls, path: str | Path) -> "ModelConfig":
        data = load_toml(path)
        if "model" in data and isinstance(data["model"], dict):  # a training config
            from scalelab.presets import resolve_model_section

            return resolve_model_section(data["model"], where=f"{path} [model]")
        return cls.from_dict(data, where=str(path))

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with fields changed. Setting d_ff clears ffn_expansion_ratio and vice
        versa (the explicit one wins); changing n_head of an MHA model keeps it MHA."""
        changes = check_fields(changes, where="override", partial=True)
        if "d_ff" in changes and "ffn_expansion_ratio" not in changes:
            changes["ffn_expansion_ratio"] = None
        if "ffn_expansion_ratio" in changes and "d_ff" not in changes:
            changes["d_ff"] = None
        if ("n_head" in changes and "num_key_value_heads" not in changes
                and self.num_key_value_heads == self.n_head):
            changes["num_key_value_heads"] = None
        if "head_dim" not in changes and self.head_dim == default_head_dim(self):
            changes["head_dim"] = None  # a derived head_dim follows n_embd / n_head (or the MLA dims)
        return dataclasses.replace(self, **changes)

    def with_overrides(self, overrides: Iterable[str]) -> "ModelConfig":
        """Apply `--set FIELD=VALUE` strings (a leading 'model.' is accepted)."""
        changes = {}
        for item in overrides:
            key, value = parse_override(item)
            changes[key.removeprefix("model.")] = value
        return self.replace(**changes) if changes else self


# ---- helpers ---------------------------------------------------------------------------

def default_head_dim(cfg: ModelConfig) -> int | None:
    """head_dim when unset: qk_nope_head_dim + qk_rope_head_dim under MLA, else n_embd // n_head
    (None when that does not divide: validate says so)."""
    if cfg.kv_lora_rank is not None:
        if cfg.qk_nope_head_dim is None or cfg.qk_rope_head_dim is None:
            return None
        return cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if not isinstance(cfg.n_embd, int) or not isinstance(cfg.n_head, int) or cfg.n_head <= 0:
        return None
    return cfg.n_embd // cfg.n_head if cfg.n_embd % cfg.n_head == 0 else None


def derive_d_ff(n_embd: int, ratio: float, multiple_of: int = 1) -> int:
    """LLaMA's rule: int(ratio * n_embd), rounded up to a multiple of `multiple_of`."""
    hidden = int(ratio * n_embd)
    return multiple_of * math.ceil(hidden / multiple_of)


_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}
_INT_FIELDS = {"n_layer", "n_head", "n_embd", "vocab_size", "block_size", "num_key_value_heads",
               "d_ff", "multiple_of", "sliding_window", "head_dim", "q_lora_rank", "kv_lora_rank",
               "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
               "n_shared_experts", "moe_intermediate_size", "first_k_dense_replace", "n_group", "topk_group"}
_FLOAT_FIELDS = {"ffn_expansion_ratio", "norm_eps", "rope_theta", "routed_scaling_factor", "router_aux_loss_coef"}
_BOOL_FIELDS = {"bias", "qkv_bias", "tie_embeddings", "qk_norm", "norm_topk_prob"}
# `--set FIELD=none` (TOML has no null) resets these
_OPTIONAL_FIELDS = {"sliding_window", "head_dim", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                    "qk_rope_head_dim", "v_head_dim", "num_experts_per_tok", "moe_intermediate_size", "n_group",
                    "topk_group"}
_STR_FIELDS = {"normalization", "position_encoding", "ffn_type", "norm_position", "family", "scoring_func",
               "topk_method"}


def closest(name: str, options: Iterable[str]) -> str:
    """' (did you mean X?)' or '' — for error messages."""
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def check_fields(data: Mapping[str, Any], *, where: str, partial: bool = False) -> dict[str, Any]:
    """Check names and types of ModelConfig fields; return a clean dict (ints as int...)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _FIELDS:
            raise UserError(f"{where}: unknown field '{key}'{closest(key, _FIELDS)}")
        if value is None:
            out[key] = None
            continue
        if key in _OPTIONAL_FIELDS and isinstance(value, str) and value.lower() in ("none", ""):
            out[key] = None  # `--set sliding_window=none` (TOML has no null)
            continue
        if key in _INT_FIELDS:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{where}: {key} must be an integer, got {value!r}")
        elif key in _FLOAT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"{where}: {key} must be a number, got {value!r}")
            value = float(value)
        elif key in _BOOL_FIELDS:
            if not isinstance(value, bool):
                raise UserError(f"{where}: {key} must be true or false, got {value!r}")
        elif key in _STR_FIELDS:
            if not isinstance(value, str):
                raise UserError(f"{where}: {key} must be a string, got {value!r}")
        elif key == "rope_scaling":
            if isinstance(value, str) and value.lower() in ("none", ""):
                value = None
            elif not isinstance(value, Mapping):
                raise UserError(f"{where}: rope_scaling must be a table such as "
                                "{type = \"linear\", factor = 8.0}, or none")
        out[key] = value
    if not partial:
        missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size") if k not in out]
        if missing:
            raise UserError(f"{where}: missing required field(s) {', '.join(missing)}")
    return out


# Upper bounds on the integer sizes: far beyond any model built (LLaMA 3.1 405B: 126 layers, width
# 16384, FFN 53248, 128K vocabulary and context), and small enough that the exact int64 counts in
# counting.py cannot overflow (n_layer · 3 · n_embd · d_ff < 2^63 at the bounds).
INT_LIMITS: dict[str, int] = {
    "n_layer": 2**16, "n_head": 2**20, "n_embd": 2**20, "num_key_value_heads": 2**20, "d_ff": 2**24,
    "vocab_size": 2**24, "block_size": 2**27, "sliding_window": 2**27, "multiple_of": 2**20,
    "q_lora_rank": 2**20, "kv_lora_rank": 2**20, "qk_nope_head_dim": 2**16, "qk_rope_head_dim": 2**16,
    "v_head_dim": 2**16, "num_experts_per_tok": 2**16, "moe_intermediate_size": 2**24, "n_group": 2**16,
    "topk_group": 2**16,
    "head_dim": 2**16,  # last: under MLA it is derived from qk_nope_head_dim and qk_rope_head_dim, checked first
}
# Sizes where 0 means "none" (a dense model, no shared expert, no dense first layers).
COUNT_LIMITS: dict[str, int] = {"n_routed_experts": 2**16, "n_shared_experts": 2**16, "first_k_dense_replace": 2**16}
# Products of sizes that are one matrix's width: bounded like d_ff, so the int64 counts cannot overflow
# (DeepSeek-V3: n_head · head_dim 24,576; experts × width 524,288).
WIDTH_LIMIT = 2**24
FLOAT_LIMITS: dict[str, float] = {"ffn_expansion_ratio": 2.0**10, "norm_eps": 1.0, "rope_theta": 1e12,
                                  "routed_scaling_factor": 2.0**10}


def _shown(value: Any) -> str:
    """A value for an error message: huge integers as 1e+30, not 31 digits."""
    return f"{value:.3g}" if isinstance(value, (int, float)) and abs(value) >= 1e12 else repr(value)


def validate(cfg: ModelConfig) -> None:
    """Raise UserError naming the first problem found, and how to fix it."""
    for name, limit in INT_LIMITS.items():
        value = getattr(cfg, name)
        if value is None:  # d_ff (derived), sliding_window (full attention)
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{name} must be an integer, got {_shown(value)}")
        if not 1 <= value <= limit:
            extra = " (or none for full attention)" if name == "sliding_window" else ""
            raise UserError(f"{name} must be a positive integer at most {limit:,}{extra}, got {_shown(value)}")
    for name, limit in COUNT_LIMITS.items():
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{name} must be an integer, got {_shown(value)}")
        if not 0 <= value <= limit:
            raise UserError(f"{name} must be an integer from 0 to {limit:,}, got {_shown(value)}")
    for name, limit in FLOAT_LIMITS.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{name} must be a number, got {_shown(value)}")
        if not 0 < value <= limit:
            raise UserError(f"{name} must be positive and at most {limit:g}, got {_shown(value)}")
    coef = cfg.router_aux_loss_coef
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not 0 <= coef <= 1:
        raise UserError(f"router_aux_loss_coef must be a number from 0 to 1, got {_shown(coef)}")
    if cfg.d_ff is None and not 1 <= cfg.ffn_hidden <= INT_LIMITS["d_ff"]:
        raise UserError(f"ffn_expansion_ratio {cfg.effective_ffn_ratio:g} x n_embd {cfg.n_embd} gives d_ff "
                        f"{_shown(cfg.ffn_hidden)}; it must be between 1 and {INT_LIMITS['d_ff']:,}")
    for name, allowed in (("normalization", NORMALIZATIONS), ("position_encoding", POSITION_ENCODINGS),
                          ("ffn_type", FFN_TYPES), ("norm_position", NORM_POSITIONS)):
        value = getattr(cfg, name)
        if value not in allowed:
            raise UserError(f"{name} must be one of {', '.join(allowed)}; got '{value}'")
    validate_mla(cfg)
    if cfg.head_dim is None:  # unset and n_head does not divide n_embd (MLA's cases are above)
        raise UserError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head}); "
                        f"head_dim would be {cfg.n_embd / cfg.n_head:g} (or set head_dim explicitly)")
    if cfg.n_head * cfg.head_dim > WIDTH_LIMIT:
        raise UserError(f"n_head x head_dim ({cfg.n_head} x {cfg.head_dim}) must be at most {WIDTH_LIMIT:,}")
    if cfg.n_head % cfg.num_key_value_heads:
        raise UserError(f"n_head ({cfg.n_head}) must be divisible by num_key_value_heads "
                        f"({cfg.num_key_value_heads}); choose a divisor of {cfg.n_head}")
    if cfg.position_encoding == "rope" and not cfg.is_mla and cfg.head_dim % 2:
        derived = " (n_embd / n_head)" if cfg.head_dim == default_head_dim(cfg) else ""
        raise UserError(f"RoPE needs an even head_dim, got {cfg.head_dim}{derived}")
    validate_moe(cfg)
    if cfg.d_ff is not None and cfg.ffn_expansion_ratio is not None:
        derived = derive_d_ff(cfg.n_embd, cfg.ffn_expansion_ratio, cfg.multiple_of)
        if derived != cfg.d_ff:
            raise UserError(f"d_ff={cfg.d_ff} conflicts with ffn_expansion_ratio="
                            f"{cfg.ffn_expansion_ratio:g} (which gives {derived}); set only one")
    if cfg.rope_scaling is not None:
        validate_rope_scaling(cfg.rope_scaling)


def validate_mla(cfg: ModelConfig) -> None:
    """The MLA fields: all set together (q_lora_rank optional), and only with what MLA supports."""
    given = [name for name in MLA_FIELDS if getattr(cfg, name) is not None]
    if not cfg.is_mla:
        if given:
            raise UserError(f"{given[0]} applies only to MLA models; set kv_lora_rank too, or remove {given[0]}")
        return
    missing = [name for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim") if getattr(cfg, name) is None]
    if missing:
        raise UserError(f"MLA (kv_lora_rank set) needs {', '.join(missing)}")
    if cfg.qk_rope_head_dim % 2:
        raise UserError(f"RoPE needs an even qk_rope_head_dim, got {cfg.qk_rope_head_dim}")
    if cfg.head_dim != cfg.qk_nope_head_dim + cfg.qk_rope_head_dim:
        raise UserError(f"under MLA head_dim is qk_nope_head_dim + qk_rope_head_dim "
                        f"({cfg.qk_nope_head_dim + cfg.qk_rope_head_dim}), got {cfg.head_dim}; remove head_dim")
    for width in (cfg.n_head * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.n_head * cfg.v_head_dim):
        if width > WIDTH_LIMIT:
            raise UserError(f"n_head x (qk_nope_head_dim + v_head_dim) must be at most {WIDTH_LIMIT:,}, got {width:,}")
    refused = [(cfg.num_key_value_heads != cfg.n_head, "num_key_value_heads (MLA has one key and value per head)"),
               (cfg.position_encoding != "rope", "learned positions (MLA's decoupled key is a RoPE key)"),
               (cfg.qk_norm, "qk_norm"), (cfg.bias or cfg.qkv_bias, "bias / qkv_bias"),
               (cfg.sliding_window is not None, "sliding_window")]
    for bad, what in refused:
        if bad:
            raise UserError(f"MLA (kv_lora_rank) does not support {what}; remove it or remove kv_lora_rank")


def validate_moe(cfg: ModelConfig) -> None:
    """The MoE fields: only on a MoE model, top-k within the experts and the chosen groups."""
    if not cfg.is_moe:
        for name, default in MOE_DEFAULTS.items():
            if getattr(cfg, name) != default:
                raise UserError(f"{name} applies only to MoE models; set n_routed_experts (> 0), or remove {name}")
        return
    experts, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    if k is None:
        raise UserError("a MoE model (n_routed_experts > 0) needs num_experts_per_tok (the top-k)")
    if k > experts:
        raise UserError(f"num_experts_per_tok ({k}) must be at most n_routed_experts ({experts})")
    if cfg.ffn_type != "swiglu":
        raise UserError(f"MoE experts are SwiGLU; set ffn_type = \"swiglu\" (got '{cfg.ffn_type}')")
    if cfg.bias:
        raise UserError("MoE experts have no biases; set bias = false")
    if cfg.first_k_dense_replace >= cfg.n_layer:
        raise UserError(f"first_k_dense_replace ({cfg.first_k_dense_replace}) must be below n_layer "
                        f"({cfg.n_layer}), or no layer is MoE")
    for what, width in (("n_routed_experts x moe_intermediate_size", experts * cfg.expert_hidden),
                        ("n_shared_experts x moe_intermediate_size", cfg.n_shared_experts * cfg.expert_hidden)):
        if width > WIDTH_LIMIT:
            raise UserError(f"{what} must be at most {WIDTH_LIMIT:,}, got {width:,}")
    for name, allowed in (("scoring_func", SCORING_FUNCS), ("topk_method", TOPK_METHODS)):
        if getattr(cfg, name) not in allowed:
            raise UserError(f"{name} must be one of {', '.join(allowed)}; got '{getattr(cfg, name)}'")
    if cfg.topk_group is not None and cfg.n_group is None:
        raise UserError("topk_group needs n_group (the number of expert groups)")
    if cfg.n_group is not None:
        if cfg.topk_method == "greedy":
            raise UserError("n_group needs topk_method = \"group_limited_greedy\" or \"noaux_tc\" "
                            "(greedy routing has no groups)")
        if experts % cfg.n_group:
            raise UserError(f"n_group ({cfg.n_group}) must divide n_routed_experts ({experts})")
        per_group = experts // cfg.n_group
        topk_group = cfg.n_group if cfg.topk_group is None else cfg.topk_group
        if topk_group > cfg.n_group:
            raise UserError(f"topk_group ({topk_group}) must be at most n_group ({cfg.n_group})")
        if k > topk_group * per_group:
            raise UserError(f"num_experts_per_tok ({k}) must be at most topk_group x experts per group "
                            f"({topk_group} x {per_group})")
        if cfg.topk_method == "noaux_tc" and per_group < 2:
            raise UserError(f"noaux_tc scores a group by its two best experts; n_group ({cfg.n_group}) leaves "
                            f"{per_group} per group")


def validate_rope_scaling(scaling: Mapping[str, Any]) -> None:
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind not in ROPE_SCALING_TYPES:
        raise UserError(f"rope_scaling.type must be one of {', '.join(ROPE_SCALING_TYPES)}; got {kind!r}")
    allowed = ROPE_SCALING_KEYS[kind]
    for key, value in scaling.items():
        if key in ("type", "rope_type"):
            continue
        if key not in allowed:
            raise UserError(f"rope_scaling ({kind}): unknown key '{key}'{closest(key, allowed)}; "
                            f"allowed: {', '.join(allowed)}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value < math.inf):
            raise UserError(f"rope_scaling.{key} must be a positive finite number, got {value!r}")
        # factor × original_max_position_embeddings is the context covered: both bounded like block_size
        # (a factor of 1e300 over 1e30 positions made that product inf, an OverflowError in eval).
        limit = INT_LIMITS["block_size"]
        if key in ("factor", "original_max_position_embeddings") and value is not None and value > limit:
            raise UserError(f"rope_scaling.{key} must be at most {limit:,} (the largest block_size), got "
                            f"{_shown(value)}")
        if key == "original_max_position_embeddings" and value is not None and value != int(value):
            raise UserError(f"rope_scaling.original_max_position_embeddings must be a whole number of positions, "
                            f"got {value!r}")
    for key, default in allowed.items():
        if default is None and key not in ("attention_factor", "mscale", "mscale_all_dim") and scaling.get(key) is None:
            if kind == "yarn" and key == "original_max_position_embeddings":
                continue
            raise UserError(f"rope_scaling ({kind}) needs '{key}'")
    if scaling["factor"] < 1:
        raise UserError(f"rope_scaling.factor must be at least 1 (the new context over the original one), "
                        f"got {scaling['factor']!r}")
    low, high = scaling.get("low_freq_factor") or 1.0, scaling.get("high_freq_factor") or 4.0
    if kind == "llama3" and not low < high:
        raise UserError("rope_scaling (llama3): low_freq_factor must be below high_freq_factor (the band between "
                        f"them is interpolated), got {low!r} and {high!r}")


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: malformed TOML: {e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None


def parse_value(text: str) -> Any:
    """A command-line value as TOML would read it: 4096 -> int, 1e-5 -> float, true -> bool,
    {type="linear", factor=8} -> dict; anything else is a string."""
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_override(item: str) -> tuple[str, Any]:
    """'KEY=VALUE' -> (KEY, parsed VALUE)."""
    if "=" not in item:
        raise UserError(f"--set expects KEY=VALUE, got '{item}'")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"--set expects KEY=VALUE, got '{item}'")
    return key, parse_value(value)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply dotted `--set a.b=value` strings to a nested dict (in place) and return it."""
    for item in overrides:
        key, value = parse_override(item)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {key}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data
