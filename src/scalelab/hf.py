"""Hugging Face checkpoint import/export, and scalelab's own checkpoint format.

A Hugging Face directory is `config.json` + `model.safetensors` (or shards listed in
`model.safetensors.index.json`). Supported: LlamaForCausalLM (LLaMA 2, 3, 3.1 with
rope_scaling, 3.2 with tied embeddings), MistralForCausalLM (sliding window included),
Qwen2ForCausalLM (Qwen2 / Qwen2.5: biases on q, k, v only), Qwen3ForCausalLM (explicit head_dim,
q/k RMSNorm) and GPT2LMHeadModel. Only `safetensors` and `json` are needed; `transformers` is never
imported (tests use it as the reference).

Each class is one row of the table ARCHS (HFArchitecture): its config map both ways and its
weight-name map, a list of Weights rules. A rule is a renaming, with two twists: our attention has
one K/V projection where HF has k_proj and v_proj (concatenate/split, weights and biases alike), and
GPT-2 stores its linear layers as `Conv1D` (weight is in×out, the transpose of nn.Linear) with Q, K
and V fused in `c_attn`.

Native checkpoints (what the trainer writes and `import-hf` produces): a directory with our
own state dict in `model.safetensors` and the ModelConfig in `model.toml`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from scalelab.config import MOE_DEFAULTS, ROPE_SCALING_KEYS, ModelConfig
from scalelab.errors import UserError
from scalelab.files import atomic_path, atomic_write_text
from scalelab import hf_moe
from scalelab.model import Transformer, split_fused_kv
from scalelab.moe import is_moe_layer

SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' default shard size
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Wrapper prefixes torch.compile, activation checkpointing and DDP add to state-dict keys.
WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "module.")


# ---- configs ----------------------------------------------------------------------------------

_REQUIRED = object()
_KIND_WORDS = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}


def config_field(hf: Mapping[str, Any], key: str, kind: type, default: Any = _REQUIRED, *,
                 where: str = "config.json") -> Any:
    """config.json's `key` as `kind` (int, float, bool or str); `default` when absent or null.
    A missing required field or a value of the wrong type is a one-line UserError naming the
    field and the file (never a ValueError from int("abc") deep inside the import)."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise UserError(f"{where}: required field '{key}' is missing; is this a complete Hugging Face config.json?")
        return default
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if ok and kind is float and not math.isfinite(value):
        ok = False
    if not ok:
        raise UserError(f"{where}: '{key}' must be {_KIND_WORDS[kind]}, got {value!r}; fix the file")
    return value


def architecture_of(hf_config: Mapping[str, Any], where: str = "config.json") -> str:
    """A key of ARCHS ('llama', 'qwen3', 'gpt2', ...) from a config.json's model_type (or architectures)."""
    kind = str(hf_config.get("model_type") or "").lower()
    if not kind:
        archs = hf_config.get("architectures")
        first = archs[0] if isinstance(archs, list) and archs else ""
        kind = {v: k for k, v in HF_CLASS.items()}.get(first, "") if isinstance(first, str) else ""
    if kind not in ARCHITECTURES:
        raise UserError(f"{where}: model_type {hf_config.get('model_type')!r} is not supported; "
                        f"scalelab imports {', '.join(HF_CLASS.values())}")
    return kind


def _hf_rope(hf: Mapping[str, Any], max_positions: int, where: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling in our form) from either key style: transformers 5 writes
    `rope_parameters` = {rope_type, rope_theta, ...}; older files have top-level `rope_theta`
    and `rope_scaling` = {type or rope_type, ...}. `max_positions` is the model's context
    (max_position_embeddings or its default), which llama3/yarn scaling falls back to for
    original_max_position_embeddings, as transformers does."""
    source = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    raw = hf.get(source) or {}
    if not isinstance(raw, Mapping):
        raise UserError(f"{where}: '{source}' must be an object such as {{\"rope_type\": \"llama3\", ...}}, "
                        f"got {raw!r}")
    params = dict(raw)
    theta = config_field(params, "rope_theta", float, None, where=f"{where} {source}")
    if theta is None:
        theta = config_field(hf, "rope_theta", float, 10000.0, where=where)
    params.pop("rope_theta", None)
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) not in (1, 1.0, None):
        raise UserError(f"{where}: partial_rotary_factor < 1 (RoPE on part of each head) is not supported")
    params.pop("partial_rotary_factor", None)
    if kind == "default":
        return theta, None
    if kind not in ROPE_SCALING_KEYS:
        raise UserError(f"{where}: rope scaling type {kind!r} is not supported; scalelab supports "
                        f"{', '.join(ROPE_SCALING_KEYS)}")
    allowed = ROPE_SCALING_KEYS[kind]
    ignorable = {"truncate": True}  # values that match our maths
    scaling: dict[str, Any] = {"type": kind}
    for key, value in params.items():
        if key in allowed:
            if value is not None:
                config_field(params, key, float, where=f"{where} {source}")  # a number, or one line
                scaling[key] = value
        elif key in ignorable and value in (ignorable[key], None):
            continue
        else:
            raise UserError(f"{where}: rope scaling ({kind}) key {key}={value!r} is not supported")
    if "original_max_position_embeddings" in scaling:
        scaling["original_max_position_embeddings"] = config_field(
            scaling, "original_max_position_embeddings", int, where=f"{where} {source}")
    elif kind in ("llama3", "yarn"):
        scaling["original_max_position_embeddings"] = max_positions  # as HF does
    return theta, scaling


# ---- the architecture table ---------------------------------------------------------------------
#
# One row per Hugging Face class: how its config.json maps to a ModelConfig and back, which configs
# it computes exactly, and the weight-name map. Adding an architecture is adding a row (see
# docs/interfaces.md, "Adding a Hugging Face architecture"); nothing below the table names one.


@dataclass(frozen=True)
class Weights:
    """One rule of a weight-name map: torch.cat(ours, dim) equals torch.cat(theirs, dim), each of
    theirs transposed first when `transpose` (GPT-2's Conv1D stores in x out). With several names on
    a side, that side's `*_sizes` gives each one's size along `dim`: GPT-2's c_attn is our
    [q_proj | k_proj | v_proj]."""
    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    transpose: bool = False
    our_sizes: tuple[int, ...] = ()
    their_sizes: tuple[int, ...] = ()
    dim: int = 0
    # When the two sides are not one concatenation: theirs -> ours and ours -> theirs, as lists of
    # tensors in the order of the names (a MoE's per-expert tensors stacked into one [E, in, out];
    # DeepSeek's interleaved RoPE rows reordered).
    convert: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
    revert: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None


def rename(ours: str, theirs: str, transpose: bool = False) -> Weights:
    return Weights((ours,), (theirs,), transpose)


@dataclass(frozen=True)
class HFArchitecture:
    """A Hugging Face class as scalelab maps it.

    config_in(hf, field, where) -> ModelConfig: from a config.json dict; `field(key, kind, default)`
      reads one key as config_field does (a missing or mistyped key is a one-line UserError). Refuse
      (UserError) anything our model would compute differently.
    config_out(cfg) -> dict: this class's own config.json keys (the common ones, vocab_size,
      tie_word_embeddings, dtype, ids, are added by config_to_hf); UserError when this class cannot
      compute `cfg` exactly, naming the class that can.
    weights(cfg) -> [Weights]: every tensor of both state dicts, in one list of rules.
    matches(cfg) -> bool: this is the class `export-hf` picks for cfg (the first row that matches).
    kind: rows of one kind compute the same block structure ("gpt2", "llama", and the MoE/MLA kinds),
      so a config of that kind may be exported as any of them that accepts it.
    not_weights: suffixes of HF keys that hold no weight (buffers some checkpoints carry); dropped.
    ignored: a function naming HF keys that are weights of something outside our model; dropped.
    optional_prefix: a prefix on every HF key but lm_head's that some checkpoints omit (GPT-2).
    """
    hf_class: str
    kind: str
    config_in: Callable[..., ModelConfig]
    config_out: Callable[[ModelConfig], dict[str, Any]]
    weights: Callable[[ModelConfig], list[Weights]]
    matches: Callable[[ModelConfig], bool]
    not_weights: tuple[str, ...] = ()
    optional_prefix: str = ""
    # HF keys to skip that are weights, but of no part of our model (DeepSeek-V3's multi-token
    # prediction layer): ignored(hf_keys, cfg) -> those keys.
    ignored: Callable[[Iterable[str], ModelConfig], list[str]] | None = None


# -- GPT-2 --

def _gpt2_config_in(hf: Mapping[str, Any], field, where: str) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"GPT-2 activation_function {act!r} is not supported; scalelab's GELU is the "
                        "tanh approximation (gelu_new)")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights", True) is False:
        raise UserError("GPT-2 configs with non-standard attention scaling are not supported")
    n_embd = field("n_embd", int, 768)
    return ModelConfig(
        family="gpt2", n_layer=field("n_layer", int, 12), n_head=field("n_head", int, 12), n_embd=n_embd,
        vocab_size=field("vocab_size", int, 50257), block_size=field("n_positions", int, 1024),
        d_ff=field("n_inner", int, 4 * n_embd), normalization="layernorm",
        norm_eps=field("layer_norm_epsilon", float, 1e-5), position_encoding="learned", ffn_type="gelu",
        norm_position="pre", bias=True, tie_embeddings=field("tie_word_embeddings", bool, True))


def _gpt2_config_out(cfg: ModelConfig) -> dict[str, Any]:
    if not cfg.bias:
        raise UserError("GPT-2 has biases in every linear layer and LayerNorm; this model has bias = false")
    if cfg.num_key_value_heads != cfg.n_head:
        raise UserError(f"GPT-2 has multi-head attention only; this model is {cfg.attention_type}")
    if cfg.q_dim != cfg.n_embd:
        raise UserError(f"GPT-2's heads are n_embd / n_head wide; this model has head_dim {cfg.head_dim}")
    return {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
            "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_inner": cfg.ffn_hidden,
            "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
            # our model has no dropout; HF's GPT-2 defaults to 0.1
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def _gpt2_weights(cfg: ModelConfig) -> list[Weights]:
    p = "transformer."
    rules = [rename("tok_embeddings.weight", f"{p}wte.weight"), rename("pos_embeddings.weight", f"{p}wpe.weight")]
    for i in range(cfg.n_layer):
        h, o = f"{p}h.{i}.", f"layers.{i}."
        for s in ("weight", "bias"):
            rules += [rename(f"{o}attn_norm.{s}", f"{h}ln_1.{s}"), rename(f"{o}ffn_norm.{s}", f"{h}ln_2.{s}"),
                      Weights((f"{o}attn.q_proj.{s}", f"{o}attn.k_proj.{s}", f"{o}attn.v_proj.{s}"),
                              (f"{h}attn.c_attn.{s}",), transpose=True,
                              our_sizes=(cfg.q_dim, cfg.kv_dim, cfg.kv_dim))]
            for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("ffn.up", "mlp.c_fc"), ("ffn.down", "mlp.c_proj")):
                rules.append(rename(f"{o}{ours}.{s}", f"{h}{theirs}.{s}", transpose=True))
    rules += [rename(f"norm.{s}", f"{p}ln_f.{s}") for s in ("weight", "bias")]
    return rules + _lm_head(cfg)


def _is_gpt2(cfg: ModelConfig) -> bool:
    return (cfg.normalization, cfg.position_encoding, cfg.ffn_type, cfg.norm_position) == \
        ("layernorm", "learned", "gelu", "pre")


# -- the LLaMA family: Llama, Mistral, Qwen2, Qwen3 (and the MoE/MLA rows build on its parts) --

def _is_llama_kind(cfg: ModelConfig) -> bool:
    return ((cfg.normalization, cfg.position_encoding, cfg.ffn_type, cfg.norm_position) ==
            ("rmsnorm", "rope", "swiglu", "pre") and not cfg.is_moe and not cfg.is_mla)


def llama_config_in(hf: Mapping[str, Any], field, where: str, *, family: str | None = None, bias: bool = False,
                    qkv_bias: bool = False, window: int | None = None, head_dim_default: int | None = None,
                    **fields: Any) -> ModelConfig:
    """The fields every LLaMA-like config.json shares (sizes, RoPE, norms, tying); `family` None
    picks llama2 or llama3 by rope_theta; `fields` adds ModelConfig fields (qk_norm, MoE, MLA ...)."""
    n_embd, n_head = field("hidden_size", int), field("num_attention_heads", int)
    if n_head < 1:
        raise UserError(f"num_attention_heads must be a positive integer, got {n_head}")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act {hf.get('hidden_act')!r} is not supported; LLaMA-style models use silu")
    block_size = field("max_position_embeddings", int, 2048)
    theta, scaling = _hf_rope(hf, block_size, where)
    return ModelConfig(
        family=family or ("llama3" if theta >= 500000 else "llama2"), n_layer=field("num_hidden_layers", int),
        n_head=n_head, n_embd=n_embd, num_key_value_heads=field("num_key_value_heads", int, n_head),
        head_dim=field("head_dim", int, head_dim_default), vocab_size=field("vocab_size", int),
        block_size=block_size, d_ff=field("intermediate_size", int),
        normalization="rmsnorm", norm_eps=field("rms_norm_eps", float, 1e-6), position_encoding="rope",
        rope_theta=theta, rope_scaling=scaling, ffn_type="swiglu", norm_position="pre", bias=bias,
        qkv_bias=qkv_bias, tie_embeddings=field("tie_word_embeddings", bool, False), sliding_window=window, **fields)


def _same_bias(field) -> bool:
    attention_bias, mlp_bias = field("attention_bias", bool, False), field("mlp_bias", bool, False)
    if attention_bias != mlp_bias:
        raise UserError("attention_bias and mlp_bias differ; scalelab has one `bias` switch for all linears")
    return attention_bias


def _qwen_window(hf: Mapping[str, Any], n_layer: int, where: str) -> int | None:
    """A Qwen2/Qwen3 config's sliding window: only with use_sliding_window, and then only on the layers
    layer_types marks (by default those from max_window_layers on). We model one window for all
    layers, so a window on some layers only is refused rather than imported as something else."""
    if not hf.get("use_sliding_window") or hf.get("sliding_window") is None:
        return None
    first = config_field(hf, "max_window_layers", int, n_layer, where=where)
    types = hf.get("layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                      for i in range(n_layer)]
    if not isinstance(types, list) or len(types) != n_layer:
        raise UserError(f"{where}: 'layer_types' must list one attention type per layer ({n_layer}), got {types!r}")
    sliding = sum(kind == "sliding_attention" for kind in types)
    if sliding == 0:
        return None
    if sliding < n_layer:
        raise UserError(f"{where}: this {hf.get('model_type', 'Qwen')} config slides the attention window on "
                        f"{sliding} of {n_layer} layers; scalelab has one window for all layers (set "
                        "max_window_layers to 0 or use_sliding_window to false)")
    return config_field(hf, "sliding_window", int, where=where)


def _qwen_window_out(cfg: ModelConfig) -> dict[str, Any]:
    window = cfg.sliding_window  # one window on every layer, or none
    return {"use_sliding_window": window is not None, "sliding_window": window,
            "max_window_layers": 0 if window is not None else cfg.n_layer,
            "layer_types": [("sliding_attention" if window is not None else "full_attention")] * cfg.n_layer}


def llama_config_out(cfg: ModelConfig) -> dict[str, Any]:
    """config.json keys every LLaMA-like class shares."""
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rope_scaling = None
    if cfg.rope_scaling:
        rope_scaling = {k: v for k, v in cfg.rope_scaling.items() if k not in ("type", "rope_type")}
        rope_scaling["rope_type"] = cfg.rope_scaling.get("type", cfg.rope_scaling.get("rope_type"))
        rope_parameters = {**rope_scaling, "rope_theta": cfg.rope_theta}
    return {"hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_hidden,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
            # Both key styles: transformers >= 5 reads rope_parameters, 4.x reads rope_theta/rope_scaling.
            "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling, "rope_parameters": rope_parameters,
            "attention_dropout": 0.0}


def _refuse_qk_norm(cfg: ModelConfig, hf_class: str) -> None:
    if cfg.qk_norm:
        raise UserError(f"{hf_class} has no q/k norms; this model has qk_norm = true (export as qwen3)")


def _refuse_qkv_bias(cfg: ModelConfig, hf_class: str) -> None:
    if cfg.qkv_bias and not cfg.bias:
        raise UserError(f"{hf_class} has no q, k, v-only biases; this model has qkv_bias = true (export as qwen2)")


def _llama_config_out(cfg: ModelConfig) -> dict[str, Any]:
    _refuse_qk_norm(cfg, "LlamaForCausalLM")
    _refuse_qkv_bias(cfg, "LlamaForCausalLM")
    if cfg.sliding_window is not None:
        raise UserError(f"LlamaForCausalLM has no sliding window; this model has sliding_window = "
                        f"{cfg.sliding_window} (export as mistral)")
    return {**llama_config_out(cfg), "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "pretraining_tp": 1}


def _mistral_config_out(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.bias:
        raise UserError("MistralForCausalLM has no biases; this model has bias = true (export as llama)")
    _refuse_qk_norm(cfg, "MistralForCausalLM")
    _refuse_qkv_bias(cfg, "MistralForCausalLM")
    return {**llama_config_out(cfg), "sliding_window": cfg.sliding_window}  # None: full-causal attention


def _qwen2_config_out(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.bias or not cfg.qkv_bias:
        raise UserError(f"Qwen2ForCausalLM has biases on q, k and v only; this model has bias = "
                        f"{str(cfg.bias).lower()}, qkv_bias = {str(cfg.qkv_bias).lower()} (export as "
                        f"{'llama' if cfg.bias else 'llama or mistral'})")
    _refuse_qk_norm(cfg, "Qwen2ForCausalLM")
    return {**llama_config_out(cfg), **_qwen_window_out(cfg)}


def _qwen3_config_in(hf: Mapping[str, Any], field, where: str) -> ModelConfig:
    if field("attention_bias", bool, False):
        raise UserError("Qwen3 attention_bias (biases on q, k, v and o_proj, none on the MLP) is not supported")
    return llama_config_in(hf, field, where, family="qwen3", qk_norm=True,
                           window=_qwen_window(hf, field("num_hidden_layers", int), where),
                           head_dim_default=128)  # Qwen3Config's default, not hidden_size / heads


def _qwen3_config_out(cfg: ModelConfig) -> dict[str, Any]:
    if not cfg.qk_norm:
        raise UserError("Qwen3ForCausalLM normalises every query and key head; this model has qk_norm = false "
                        "(export as llama)")
    if cfg.bias or cfg.qkv_bias:
        raise UserError("Qwen3ForCausalLM has no biases here (its attention_bias would add one to o_proj too); "
                        "this model has bias or qkv_bias = true")
    return {**llama_config_out(cfg), "attention_bias": False, **_qwen_window_out(cfg)}


def llama_attention_weights(cfg: ModelConfig, h: str, o: str) -> list[Weights]:
    """Dense attention of layer `o` (ours, 'layers.i.') as `h` ('model.layers.i.'): q, k, v, o,
    their biases, and Qwen3's q/k norms."""
    qkv = ("weight", "bias") if cfg.bias or cfg.qkv_bias else ("weight",)
    rules = []
    for s in qkv:
        rules += [rename(f"{o}attn.{name}.{s}", f"{h}self_attn.{name}.{s}") for name in ("q_proj", "k_proj", "v_proj")]
    rules += [rename(f"{o}attn.o_proj.{s}", f"{h}self_attn.o_proj.{s}")
              for s in (("weight", "bias") if cfg.bias else ("weight",))]
    if cfg.qk_norm:
        rules += [rename(f"{o}attn.q_norm.weight", f"{h}self_attn.q_norm.weight"),
                  rename(f"{o}attn.k_norm.weight", f"{h}self_attn.k_norm.weight")]
    return rules


def llama_mlp_weights(cfg: ModelConfig, h: str, o: str) -> list[Weights]:
    """The dense SwiGLU FFN: our ffn.{gate,up,down} as mlp.{gate,up,down}_proj."""
    suffixes = ("weight", "bias") if cfg.bias else ("weight",)
    return [rename(f"{o}ffn.{name}.{s}", f"{h}mlp.{name}_proj.{s}") for name in ("gate", "up", "down")
            for s in suffixes]


def llama_weights(cfg: ModelConfig, attention=llama_attention_weights, mlp=None) -> list[Weights]:
    """Embedding, per layer the two norms + attention(cfg, h, o) + mlp(cfg, h, o, layer), final norm,
    lm_head. `mlp` takes the layer index (a MoE model's first layers are dense); default dense."""
    rules = [rename("tok_embeddings.weight", "model.embed_tokens.weight")]
    for i in range(cfg.n_layer):
        h, o = f"model.layers.{i}.", f"layers.{i}."
        rules += [rename(f"{o}attn_norm.weight", f"{h}input_layernorm.weight"),
                  rename(f"{o}ffn_norm.weight", f"{h}post_attention_layernorm.weight")]
        rules += attention(cfg, h, o)
        rules += llama_mlp_weights(cfg, h, o) if mlp is None else mlp(cfg, h, o, i)
    return rules + [rename("norm.weight", "model.norm.weight")] + _lm_head(cfg)


def _lm_head(cfg: ModelConfig) -> list[Weights]:
    return [] if cfg.tie_embeddings else [rename("lm_head.weight", "lm_head.weight")]


LLAMA_NOT_WEIGHTS = ("self_attn.rotary_emb.inv_freq",)


# -- Mixture-of-Experts and Multi-head Latent Attention: Mixtral, Qwen3-MoE, DeepSeek-V2/V3 --
# (their MoE/MLA config fields and tensor transforms are in scalelab.hf_moe)

def _is_moe_kind(cfg: ModelConfig) -> bool:
    return ((cfg.normalization, cfg.position_encoding, cfg.ffn_type, cfg.norm_position) ==
            ("rmsnorm", "rope", "swiglu", "pre") and cfg.is_moe and not cfg.is_mla)


def _mixtral_config_in(hf: Mapping[str, Any], field, where: str) -> ModelConfig:
    return llama_config_in(hf, field, where, family="mixtral", bias=_same_bias(field),
                           window=field("sliding_window", int, None), **hf_moe.moe_fields_from_hf(hf, "mixtral", field))


def _mixtral_config_out(cfg: ModelConfig) -> dict[str, Any]:
    return {**_mistral_config_out(cfg.replace(n_routed_experts=0, **MOE_DEFAULTS)),
            **hf_moe.moe_fields_to_hf(cfg, "mixtral")}


def _qwen3_moe_config_in(hf: Mapping[str, Any], field, where: str) -> ModelConfig:
    if field("attention_bias", bool, False):
        raise UserError("Qwen3-MoE attention_bias (biases on q, k, v and o_proj) is not supported")
    return llama_config_in(hf, field, where, family="qwen3_moe", qk_norm=True,
                           window=_qwen_window(hf, field("num_hidden_layers", int), where), head_dim_default=128,
                           **hf_moe.moe_fields_from_hf(hf, "qwen3_moe", field))


def _qwen3_moe_config_out(cfg: ModelConfig) -> dict[str, Any]:
    return {**_qwen3_config_out(cfg.replace(n_routed_experts=0, **MOE_DEFAULTS)),
            **hf_moe.moe_fields_to_hf(cfg, "qwen3_moe")}


def _deepseek_config_in(arch: str):
    def config_in(hf: Mapping[str, Any], field, where: str) -> ModelConfig:
        if arch == "deepseek_v3" and not hf_moe.rope_interleaved(hf, arch):
            raise UserError("rope_interleave = false is not supported (DeepSeek's checkpoints rotate interleaved "
                            "RoPE pairs, which scalelab reorders on import)")
        # transformers writes head_dim = qk_rope_head_dim (its RoPE width); ours is the q/k head width
        without_head_dim = {k: v for k, v in hf.items() if k != "head_dim"}

        def own_field(key: str, kind: type, default: Any = _REQUIRED) -> Any:
            return config_field(without_head_dim, key, kind, default, where=where)

        return llama_config_in(without_head_dim, own_field, where, family=arch,
                               **hf_moe.moe_fields_from_hf(without_head_dim, arch, own_field))
    return config_in


def _deepseek_config_out(arch: str):
    def config_out(cfg: ModelConfig) -> dict[str, Any]:
        out = {**llama_config_out(cfg), "attention_bias": False, **hf_moe.moe_fields_to_hf(cfg, arch)}
        del out["head_dim"]  # transformers derives its own (the RoPE width)
        return out
    return config_out


def mla_attention_weights(cfg: ModelConfig, h: str, o: str) -> list[Weights]:
    """MLA's projections; the RoPE rows of the query and of kv_a_proj reordered from DeepSeek's
    interleaved pairs to our halves (hf_moe.rope_rows)."""
    rules = []
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    q = ("q_a_proj", "q_a_norm", "q_b_proj") if cfg.q_lora_rank is not None else ("q_proj",)
    names = {"q_proj": "q_proj", "q_a_proj": "q_a_proj", "q_a_norm": "q_a_layernorm", "q_b_proj": "q_b_proj",
             "kv_a_proj": "kv_a_proj_with_mqa", "kv_a_norm": "kv_a_layernorm", "kv_b_proj": "kv_b_proj",
             "o_proj": "o_proj"}
    permuted = {q[-1]: (qk, cfg.n_head, cfg.qk_nope_head_dim),
                "kv_a_proj": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, 1, cfg.kv_lora_rank)}
    for ours in (*q, "kv_a_proj", "kv_a_norm", "kv_b_proj", "o_proj"):
        ours_key, theirs_key = f"{o}attn.{ours}.weight", f"{h}self_attn.{names[ours]}.weight"
        if ours not in permuted:
            rules.append(rename(ours_key, theirs_key))
            continue
        halves, back = (hf_moe.rope_rows(*permuted[ours], cfg.qk_rope_head_dim, to_halves=way) for way in (True, False))
        rules.append(Weights((ours_key,), (theirs_key,), convert=lambda ts, order=halves: [ts[0][order]],
                             revert=lambda ts, order=back: [ts[0][order]]))
    return rules


def moe_weights(arch: str) -> Callable[[ModelConfig], list[Weights]]:
    """The weight map of a MoE/MLA class: LLaMA's, with MLA's attention for DeepSeek and, from
    layer first_k_dense_replace on, the router, the experts (per-expert tensors stacked into our
    [E, in, out] parameters, hf_moe.stack_gate_up / stack_down) and the shared experts."""
    block, (g, u, d) = hf_moe.expert_names(arch)

    def mlp(cfg: ModelConfig, h: str, o: str, layer: int) -> list[Weights]:
        if not is_moe_layer(cfg, layer):
            return llama_mlp_weights(cfg, h, o)
        p, o = f"{h}{block}.", f"{o}ffn."
        rules = [rename(f"{o}router.weight", f"{p}gate.weight")]
        if cfg.topk_method == "noaux_tc":
            rules.append(rename(f"{o}router.e_score_correction_bias", f"{p}gate.e_score_correction_bias"))
        experts = range(cfg.n_routed_experts)
        rules += [Weights((f"{o}gate_up",), tuple(f"{p}experts.{e}.{n}.weight" for e in experts for n in (g, u)),
                          convert=hf_moe.stack_gate_up, revert=hf_moe.split_gate_up),
                  Weights((f"{o}down",), tuple(f"{p}experts.{e}.{d}.weight" for e in experts),
                          convert=hf_moe.stack_down, revert=hf_moe.split_down)]
        if cfg.n_shared_experts:
            rules += [rename(f"{o}shared.{n}.weight", f"{p}shared_experts.{n}_proj.weight") for n in ("gate", "up", "down")]
        return rules

    def weights(cfg: ModelConfig) -> list[Weights]:
        attention = mla_attention_weights if cfg.is_mla else llama_attention_weights
        return llama_weights(cfg, attention=attention, mlp=mlp)
    return weights

ARCHS: dict[str, HFArchitecture] = {
    "gpt2": HFArchitecture(
        "GPT2LMHeadModel", "gpt2", _gpt2_config_in, _gpt2_config_out,
        _gpt2_weights, _is_gpt2,
        not_weights=(".attn.bias", ".attn.masked_bias"),  # the causal-mask buffers older checkpoints carry
        optional_prefix="transformer."),
    "qwen3": HFArchitecture(
        "Qwen3ForCausalLM", "llama",
        _qwen3_config_in, _qwen3_config_out, llama_weights, lambda cfg: _is_llama_kind(cfg) and cfg.qk_norm,
        not_weights=LLAMA_NOT_WEIGHTS),
    "qwen2": HFArchitecture(
        "Qwen2ForCausalLM", "llama",
        # fixed by the architecture: biases on q, k, v, none on o_proj or the MLP
        lambda hf, field, where: llama_config_in(
            hf, field, where, family="qwen2", qkv_bias=True,
            window=_qwen_window(hf, field("num_hidden_layers", int), where)),
        _qwen2_config_out, llama_weights,
        lambda cfg: _is_llama_kind(cfg) and (cfg.family == "qwen2" or (cfg.qkv_bias and not cfg.bias)),
        not_weights=LLAMA_NOT_WEIGHTS),
    "mistral": HFArchitecture(
        "MistralForCausalLM", "llama",
        # Mistral's window applies to every layer
        lambda hf, field, where: llama_config_in(hf, field, where, family="mistral", bias=_same_bias(field),
                                                 window=field("sliding_window", int, None)),
        _mistral_config_out, llama_weights,
        lambda cfg: _is_llama_kind(cfg) and (cfg.family == "mistral" or cfg.sliding_window is not None),
        not_weights=LLAMA_NOT_WEIGHTS),
    "llama": HFArchitecture(
        "LlamaForCausalLM", "llama",
        lambda hf, field, where: llama_config_in(hf, field, where, bias=_same_bias(field)),
        _llama_config_out, llama_weights, _is_llama_kind, not_weights=LLAMA_NOT_WEIGHTS),
    "qwen3_moe": HFArchitecture(
        "Qwen3MoeForCausalLM", "moe", _qwen3_moe_config_in, _qwen3_moe_config_out, moe_weights("qwen3_moe"),
        lambda cfg: _is_moe_kind(cfg) and cfg.qk_norm, not_weights=LLAMA_NOT_WEIGHTS),
    "mixtral": HFArchitecture(
        "MixtralForCausalLM", "moe", _mixtral_config_in, _mixtral_config_out, moe_weights("mixtral"),
        lambda cfg: _is_moe_kind(cfg) and not cfg.qk_norm, not_weights=LLAMA_NOT_WEIGHTS),
    "deepseek_v3": HFArchitecture(
        "DeepseekV3ForCausalLM", "deepseek", _deepseek_config_in("deepseek_v3"), _deepseek_config_out("deepseek_v3"),
        moe_weights("deepseek_v3"), lambda cfg: cfg.is_mla and (not cfg.is_moe or cfg.topk_method == "noaux_tc"),
        not_weights=LLAMA_NOT_WEIGHTS, ignored=hf_moe.extra_layer_keys),
    "deepseek_v2": HFArchitecture(
        "DeepseekV2ForCausalLM", "deepseek", _deepseek_config_in("deepseek_v2"), _deepseek_config_out("deepseek_v2"),
        moe_weights("deepseek_v2"), lambda cfg: cfg.is_mla, not_weights=LLAMA_NOT_WEIGHTS),
}


ARCHITECTURES = tuple(ARCHS)
HF_CLASS = {name: row.hf_class for name, row in ARCHS.items()}


def config_from_hf(hf: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json dict (any class in ARCHS). `where` names the
    file in error messages.

    Raises UserError for features our model does not have, rather than importing a model
    that would compute something else, and for fields that are missing or of the wrong type."""
    if not isinstance(hf, Mapping):
        raise UserError(f"{where}: expected a JSON object, got {type(hf).__name__}")
    arch = architecture_of(hf, where)

    def field(key: str, kind: type, default: Any = _REQUIRED) -> Any:
        return config_field(hf, key, kind, default, where=where)

    try:
        return ARCHS[arch].config_in(hf, field, where)
    except UserError as e:  # ModelConfig's own validation: say which file it came from
        raise e if str(e).startswith(where) else UserError(f"{where}: {e}") from None


def default_architecture(cfg: ModelConfig) -> str:
    """The HF architecture that computes exactly what this config does (UserError if none)."""
    for name, row in ARCHS.items():
        if row.matches(cfg):
            return name
    what = " + MoE" if cfg.is_moe else ""
    what += " + MLA" if cfg.is_mla else ""
    raise UserError(f"no Hugging Face architecture matches {cfg.normalization} + {cfg.position_encoding} "
                    f"positions + {cfg.ffn_type} + {cfg.norm_position}-norm{what}; export supports "
                    f"{', '.join(row.hf_class for row in ARCHS.values())}")


def config_to_hf(cfg: ModelConfig, arch: str | None = None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The config.json for `cfg` as architecture `arch` (default: the one that matches)."""
    natural = default_architecture(cfg)
    arch = arch or natural
    if arch not in ARCHS:
        raise UserError(f"architecture must be one of {', '.join(ARCHITECTURES)}; got {arch!r}")
    if ARCHS[arch].kind != ARCHS[natural].kind:
        raise UserError(f"this model ({cfg.normalization}, {cfg.position_encoding}, {cfg.ffn_type}) cannot be "
                        f"exported as {arch}; use --arch {natural}")
    dtype_name = str(dtype).removeprefix("torch.")
    common = {"architectures": [HF_CLASS[arch]], "model_type": arch, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": dtype_name, "dtype": dtype_name,
              "initializer_range": 0.02, "use_cache": True,
              # Token ids belong to the tokenizer, which a ModelConfig does not know (save() fills
              # them in when it exports one).
              "bos_token_id": None, "eos_token_id": None}
    return {**common, **ARCHS[arch].config_out(cfg)}


# ---- weights ----------------------------------------------------------------------------------

def _transposed(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(-2, -1) if t.dim() >= 2 else t  # a Conv1D bias is the same either way


def _native_from_hf(hf_sd: Mapping[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """Our state dict from HF tensors (by name), by the row's weight map. Unknown keys are an
    error, not silently dropped."""
    row = ARCHS[arch]
    p = row.optional_prefix
    if p and not any(k.startswith(p) for k in hf_sd):  # e.g. GPT-2 saved as its base model's keys
        hf_sd = {(k if k.startswith("lm_head.") else p + k): v for k, v in hf_sd.items()}
    sd: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str, transpose: bool) -> torch.Tensor:
        if key not in hf_sd:
            raise UserError(f"checkpoint is missing tensor '{key}' (does config.json match the weights?)")
        used.add(key)
        return _transposed(hf_sd[key]) if transpose else hf_sd[key]

    for rule in row.weights(cfg):
        theirs = [take(key, rule.transpose) for key in rule.theirs]
        if rule.convert is not None:
            sd.update(zip(rule.ours, rule.convert(theirs)))
            continue
        full = theirs[0] if len(theirs) == 1 else torch.cat(theirs, rule.dim)
        parts = [full] if len(rule.ours) == 1 else full.split(list(rule.our_sizes), rule.dim)
        sd.update(zip(rule.ours, parts))
    if cfg.tie_embeddings:
        used.update(k for k in ("lm_head.weight",) if k in hf_sd)  # a redundant copy of the embedding
    if row.not_weights:
        used.update(k for k in hf_sd if k.endswith(row.not_weights))
    if row.ignored is not None:
        used.update(row.ignored(hf_sd, cfg))
    unused = sorted(set(hf_sd) - used)
    if unused:
        raise UserError(f"checkpoint has {len(unused)} tensor(s) the {row.hf_class} mapping does not use, "
                        f"e.g. '{unused[0]}' (does config.json match the weights?)")
    return sd


def _hf_from_native(sd: Mapping[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """HF tensors (by name) from our state dict; the inverse of _native_from_hf."""
    out: dict[str, torch.Tensor] = {}
    for rule in ARCHS[arch].weights(cfg):
        ours = [sd[key] for key in rule.ours]
        if rule.revert is not None:
            out.update(zip(rule.theirs, rule.revert(ours)))
            continue
        full = ours[0] if len(ours) == 1 else torch.cat(ours, rule.dim)
        parts = [full] if len(rule.theirs) == 1 else full.split(list(rule.their_sizes), rule.dim)
        out.update((key, _transposed(t) if rule.transpose else t) for key, t in zip(rule.theirs, parts))
    return out


# ---- safetensors files ------------------------------------------------------------------------

def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or a one-line UserError (unreadable, not JSON, not an object)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor in `model.safetensors`, or in the shards named by model.safetensors.index.json."""
    directory = Path(directory)
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index}: no weight_map; re-save the checkpoint")
        files = sorted(set(map(str, weight_map.values())))
        bad = [name for name in files if Path(name).name != name]
        if bad:
            raise UserError(f"{index}: weight_map names {bad[0]!r}, not a file beside the index")
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        other = [p.name for p in directory.glob("*.bin")] if directory.is_dir() else []
        hint = " (found PyTorch .bin weights; convert them to safetensors first)" if other else ""
        raise UserError(f"{directory}: no model.safetensors or {SAFETENSORS_INDEX}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise UserError(f"{path}: shard listed in {SAFETENSORS_INDEX} is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors


def write_safetensors(tensors: Mapping[str, torch.Tensor], directory: str | Path,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write tensors as model.safetensors, or as model-0000i-of-0000n.safetensors shards plus
    an index when they exceed max_shard_bytes (as transformers does). Returns the file names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.detach().to("cpu").contiguous()
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        with atomic_path(directory / name) as tmp:
            tmp.write_bytes(safetensors_bytes(shard, metadata={"format": "pt"}))
    index = directory / SAFETENSORS_INDEX
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        atomic_write_text(index, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                            indent=2) + "\n")
    elif index.exists():
        index.unlink()  # a stale index would point the reader at old shards
    return names


def _build(cfg: ModelConfig, state_dict: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None,
           device: str | torch.device, attention: str) -> Transformer:
    """A Transformer holding exactly these tensors: built on the meta device (no random init of
    weights that are about to be replaced), then the tensors are assigned."""
    with torch.device("meta"):
        model = Transformer(cfg, attention=attention)
    expected = set(model.state_dict())
    if cfg.tie_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise UserError(f"checkpoint does not match its config: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}")
    tensors = {}
    params = model.state_dict()
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(params[key].shape):
            raise UserError(f"checkpoint tensor '{key}' has shape {tuple(tensor.shape)}, the config needs "
                            f"{tuple(params[key].shape)}")
        tensors[key] = tensor.to(device=device, dtype=dtype or tensor.dtype).contiguous()
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    return model


# ---- public API -------------------------------------------------------------------------------

def load(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
         attention: str = "sdpa", overrides: Iterable[str] = ()) -> Transformer:
    """Import a Hugging Face checkpoint directory (config.json + safetensors) as a Transformer.
    Tensors keep the checkpoint's dtype unless `dtype` is given; `overrides` are `--set`
    strings applied to the imported ModelConfig (e.g. block_size=4096)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a Hugging Face checkpoint directory (no config.json)")
    hf_config = read_json(path / "config.json")
    arch = architecture_of(hf_config, str(path / "config.json"))
    cfg = config_from_hf(hf_config, str(path / "config.json"))
    weights = _native_from_hf(read_safetensors(path), cfg, arch)
    cfg = cfg.with_overrides(overrides)
    return _build(cfg, weights, dtype=dtype, device=device, attention=attention)


def save(model: Transformer, path: str | Path, *, arch: str | None = None, dtype: torch.dtype | None = None,
         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer=None) -> str:
    """Export as a Hugging Face checkpoint directory that transformers' from_pretrained loads.
    With `tokenizer` (a scalelab.data.tokenizer.Tokenizer) the directory also holds its
    transformers files (tokenizer.json, tokenizer_config.json, special_tokens_map.json) and
    generation_config.json, and config.json names its BOS/EOS ids, so AutoTokenizer and
    AutoModelForCausalLM both load it. Returns the architecture written."""
    cfg = model.config
    arch = arch or default_architecture(cfg)
    sd = {k: v if dtype is None else v.to(dtype) for k, v in model.state_dict().items()}
    hf_config = config_to_hf(cfg, arch, dtype or next(iter(sd.values())).dtype)  # validates before writing
    extra: dict[str, str] = {}
    if tokenizer is not None:
        extra = tokenizer_files(tokenizer, cfg)
        hf_config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    tensors = _hf_from_native(sd, cfg, arch)
    write_safetensors(tensors, path, max_shard_bytes)
    for name, text in extra.items():
        atomic_write_text(Path(path) / name, text)
    atomic_write_text(Path(path) / "config.json", json.dumps(hf_config, indent=2) + "\n")
    return arch


def tokenizer_files(tokenizer, cfg: ModelConfig) -> dict[str, str]:
    """transformers' tokenizer files and generation_config.json for `tokenizer` on this model
    (a UserError if its ids do not fit the model's vocabulary)."""
    from scalelab.data.tokenizer import transformers_tokenizer_files

    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"tokenizer {tokenizer.spec} has {tokenizer.vocab_size} ids, more than the model's "
                        f"vocab_size {cfg.vocab_size}; export with the tokenizer the model was trained with")
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                  "pad_token_id": tokenizer.eos_id, "max_length": cfg.block_size}
    return {**transformers_tokenizer_files(tokenizer, cfg.block_size),
            "generation_config.json": json.dumps(generation, indent=2) + "\n"}


def save_native(model: Transformer, path: str | Path) -> None:
    """scalelab's checkpoint: our state dict in model.safetensors plus model.toml (the ModelConfig).
    A tied lm_head is stored once, as the token embedding."""
    sd = dict(model.state_dict())
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    write_safetensors(sd, path, max_shard_bytes=2**62)
    atomic_write_text(Path(path) / "model.toml", model.config.to_toml())


def native_config(path: str | Path) -> ModelConfig | None:
    """The ModelConfig of a native checkpoint directory (model.toml, or a config.json holding
    ModelConfig fields or a training config's [model] table), or None if it is not one."""
    path = Path(path)
    if (path / "model.toml").is_file():
        return ModelConfig.from_toml(path / "model.toml")
    if (path / "config.json").is_file():
        data = read_json(path / "config.json")
        if "model_type" in data or "architectures" in data:
            return None  # a Hugging Face config
        if isinstance(data.get("model"), dict):
            from scalelab.presets import resolve_model_section

            return resolve_model_section(data["model"], where=f"{path / 'config.json'} model")
        return ModelConfig.from_dict(data, where=str(path / "config.json"))
    return None


def strip_wrapper_prefixes(key: str) -> str:
    """`key` without the wrapper prefixes torch.compile (`_orig_mod.`), DDP (`module.`) and
    activation checkpointing (`_checkpoint_wrapped_module.`) put at its *start* when a whole
    model is wrapped (in any order, any number). Only leading prefixes: a name that merely
    contains one of them further in (`layers.0.submodule.weight`) is a real parameter name."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def load_native(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                attention: str = "sdpa", overrides: Iterable[str] = ()) -> Transformer:
    """Load a checkpoint written by save_native (or the trainer)."""
    path = Path(path)
    cfg = native_config(path)
    if cfg is None:
        raise UserError(f"{path}: not a scalelab checkpoint (expected model.safetensors + model.toml)")
    cfg = cfg.with_overrides(overrides)
    sd = split_fused_kv({strip_wrapper_prefixes(k): v for k, v in read_safetensors(path).items()})
    return _build(cfg, sd, dtype=dtype, device=device, attention=attention)


def load_checkpoint(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    attention: str = "sdpa", overrides: Iterable[str] = ()) -> tuple[Transformer, str]:
    """Either kind of checkpoint directory -> (model, 'scalelab' or the HF architecture)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such checkpoint directory")
    if native_config(path) is not None:
        model = load_native(path, dtype=dtype, device=device, attention=attention, overrides=overrides)
        return model, "scalelab"
    if (path / "config.json").is_file():
        arch = architecture_of(read_json(path / "config.json"), str(path / "config.json"))
        return load(path, dtype=dtype, device=device, attention=attention, overrides=overrides), arch
    raise UserError(f"{path}: not a checkpoint (expected model.safetensors with model.toml, or a Hugging "
                    "Face config.json)")


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = text.strip().upper()
    number = s.rstrip("KMGIB")
    unit = s[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise UserError(f"size {text!r} not understood; use e.g. 5GB, 500MB or a number of bytes") from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"size must be positive, got {text!r}")
    return int(value)
