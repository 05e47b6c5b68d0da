"""Official model configurations (a flat, greppable registry) and the family *styles* that
the planner scales.

Every constant below is copied from the model's official Hugging Face `config.json`
(huggingface.co/<repo>/blob/main/config.json, repo named in the comment) or its paper.
tests/test_counting.py checks each total against transformers' own model class (built on the meta
device from the config.json values, restated there) and the published parameter count.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from scalelab.config import ModelConfig, check_fields, closest, load_toml
from scalelab.errors import UserError

# ---- family styles ------------------------------------------------------------------------
# Everything about an architecture except its size. `style_config` adds the size.
STYLES: dict[str, dict[str, Any]] = {
    # GPT-2 (Radford et al. 2019; openai-community/gpt2): LayerNorm with bias, learned
    # positions, GELU MLP 4x, biases everywhere, tied embeddings, 50257 BPE tokens.
    "gpt2": dict(family="gpt2", normalization="layernorm", norm_eps=1e-5, position_encoding="learned",
                 ffn_type="gelu", ffn_expansion_ratio=4.0, norm_position="pre", bias=True,
                 tie_embeddings=True, vocab_size=50257, block_size=1024),
    # LLaMA 2 (Touvron et al. 2023): MHA, RMSNorm, RoPE theta 1e4, SwiGLU 8/3 rounded up to a
    # multiple of 256, 32000 SentencePiece tokens, 4096 context.
    "llama2": dict(family="llama2", normalization="rmsnorm", norm_eps=1e-5, position_encoding="rope",
                   rope_theta=10000.0, ffn_type="swiglu", ffn_expansion_ratio=8 / 3, multiple_of=256,
                   norm_position="pre", bias=False, tie_embeddings=False, vocab_size=32000,
                   block_size=4096),
    # LLaMA 3 (Grattafiori et al. 2024): GQA with 8 KV heads, RoPE theta 500000, SwiGLU 3.5x
    # (14336 / 4096), 128256 tiktoken tokens, 8192 context. multiple_of 128 keeps the FFN
    # width tensor-core friendly; the planner's default widths give exactly 3.5x.
    "llama3": dict(family="llama3", normalization="rmsnorm", norm_eps=1e-5, position_encoding="rope",
                   rope_theta=500000.0, ffn_type="swiglu", ffn_expansion_ratio=3.5, multiple_of=128,
                   norm_position="pre", bias=False, tie_embeddings=False, vocab_size=128256,
                   block_size=8192, num_key_value_heads=8),
}


def style_config(style: str, n_layer: int, n_embd: int, n_head: int, **overrides: Any) -> ModelConfig:
    """A model of the given family style and size, e.g. style_config('llama3', 28, 1792, 14)."""
    if style not in STYLES:
        raise UserError(f"unknown style '{style}'{closest(style, STYLES)}; choose from {', '.join(STYLES)}")
    fields = dict(STYLES[style])
    fields.update(n_layer=n_layer, n_embd=n_embd, n_head=n_head)
    if "num_key_value_heads" not in overrides and "num_key_value_heads" in fields:
        # A style's KV-head count (8 for LLaMA 3) must divide n_head; small test models with
        # fewer heads get the largest count that does.
        fields["num_key_value_heads"] = math.gcd(n_head, fields["num_key_value_heads"])
    if "d_ff" in overrides:
        fields.pop("ffn_expansion_ratio", None)
    fields.update(overrides)
    return ModelConfig(**fields)


def _gpt2(n_layer: int, n_embd: int, n_head: int) -> ModelConfig:
    # GPT-2's FFN width is a rule, not a number: transformers' GPT2Config has n_inner = None, meaning
    # 4 * n_embd. Kept as the ratio, so `--set n_embd=...` follows the rule unless d_ff is given.
    # (LLaMA, Mistral and Qwen2 configs publish intermediate_size as a number, and transformers keeps
    # it when hidden_size changes; their presets do too. The llama2/llama3 *styles* derive it.)
    return style_config("gpt2", n_layer, n_embd, n_head)


def _llama(style: str, n_layer: int, n_embd: int, n_head: int, kv: int, d_ff: int, **kw: Any) -> ModelConfig:
    return style_config(style, n_layer, n_embd, n_head, num_key_value_heads=kv, d_ff=d_ff,
                        ffn_expansion_ratio=None, multiple_of=1, **kw)


# Qwen2 / Qwen2.5 (Qwen team 2024): LLaMA-shaped (RMSNorm, RoPE, SwiGLU, GQA) with biases on the
# q, k and v projections only, RMSNorm eps 1e-6, RoPE theta 1e6. Not a planner style: the
# planner's counting keywords carry no qkv_bias.
_QWEN2 = dict(family="qwen2", normalization="rmsnorm", norm_eps=1e-6, position_encoding="rope", rope_theta=1e6,
              ffn_type="swiglu", norm_position="pre", bias=False, qkv_bias=True)


def _qwen2(n_layer: int, n_embd: int, n_head: int, kv: int, d_ff: int, **kw: Any) -> ModelConfig:
    return ModelConfig(**_QWEN2, n_layer=n_layer, n_embd=n_embd, n_head=n_head, num_key_value_heads=kv,
                       d_ff=d_ff, **kw)


# Qwen3 (Qwen team 2025): LLaMA-shaped with head_dim 128 whatever the width, RMSNorm on every query
# and key head (qk_norm), no biases, RMSNorm eps 1e-6, RoPE theta 1e6, 40960 context.
_QWEN3 = dict(family="qwen3", normalization="rmsnorm", norm_eps=1e-6, position_encoding="rope", rope_theta=1e6,
              ffn_type="swiglu", norm_position="pre", bias=False, head_dim=128, qk_norm=True, vocab_size=151936,
              block_size=40960)


def _qwen3(n_layer: int, n_embd: int, n_head: int, kv: int, d_ff: int, **kw: Any) -> ModelConfig:
    return ModelConfig(**{**_QWEN3, **kw}, n_layer=n_layer, n_embd=n_embd, n_head=n_head, num_key_value_heads=kv,
                       d_ff=d_ff)


# DeepSeek-V2/V3 (DeepSeek-AI 2024): MLA attention, fine-grained MoE with shared experts after
# first_k_dense_replace dense layers, RMSNorm eps 1e-6, RoPE theta 1e4 with YaRN x40 over 4096.
def _deepseek(family: str, n_layer: int, n_embd: int, n_head: int, d_ff: int, *, mscale: float, **kw: Any):
    yarn = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
            "beta_slow": 1.0, "mscale": mscale, "mscale_all_dim": mscale}
    return ModelConfig(family=family, n_layer=n_layer, n_embd=n_embd, n_head=n_head, d_ff=d_ff,
                       normalization="rmsnorm", norm_eps=1e-6, position_encoding="rope", rope_theta=10000.0,
                       rope_scaling=yarn, ffn_type="swiglu", norm_position="pre", bias=False, block_size=163840,
                       kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, **kw)


_LLAMA31_SCALING = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}
_LLAMA32_SCALING = dict(_LLAMA31_SCALING, factor=32.0)

# ---- official models ----------------------------------------------------------------------
# name: (config, official parameter count, source). The count is what the released checkpoint
# holds (sum of tensor sizes in its safetensors; the figure on the model card / in the paper).
PRESETS: dict[str, ModelConfig] = {
    # openai-community/gpt2, gpt2-medium, gpt2-large, gpt2-xl (config.json: n_layer, n_embd, n_head)
    "gpt2": _gpt2(12, 768, 12),
    "gpt2-medium": _gpt2(24, 1024, 16),
    "gpt2-large": _gpt2(36, 1280, 20),
    "gpt2-xl": _gpt2(48, 1600, 25),
    # meta-llama/Llama-2-7b-hf, Llama-2-13b-hf, Llama-2-70b-hf
    "llama2-7b": _llama("llama2", 32, 4096, 32, 32, 11008),
    "llama2-13b": _llama("llama2", 40, 5120, 40, 40, 13824),
    "llama2-70b": _llama("llama2", 80, 8192, 64, 8, 28672),
    # meta-llama/Meta-Llama-3-8B
    "llama3-8b": _llama("llama3", 32, 4096, 32, 8, 14336),
    # meta-llama/Llama-3.1-8B, -70B, -405B (rope_scaling llama3, factor 8, 131072 context)
    "llama3.1-8b": _llama("llama3", 32, 4096, 32, 8, 14336, block_size=131072, rope_scaling=_LLAMA31_SCALING),
    "llama3.1-70b": _llama("llama3", 80, 8192, 64, 8, 28672, block_size=131072, rope_scaling=_LLAMA31_SCALING),
    "llama3.1-405b": _llama("llama3", 126, 16384, 128, 8, 53248, block_size=131072,
                            rope_scaling=_LLAMA31_SCALING),
    # meta-llama/Llama-3.2-1B, -3B (tied embeddings, rope_scaling factor 32)
    "llama3.2-1b": _llama("llama3", 16, 2048, 32, 8, 8192, block_size=131072, tie_embeddings=True,
                          rope_scaling=_LLAMA32_SCALING),
    "llama3.2-3b": _llama("llama3", 28, 3072, 24, 8, 8192, block_size=131072, tie_embeddings=True,
                          rope_scaling=_LLAMA32_SCALING),
    # mistralai/Mistral-7B-v0.1 (GQA 8, theta 1e4, 32000 vocab, sliding_window 4096)
    "mistral-7b": _llama("llama2", 32, 4096, 32, 8, 14336, block_size=32768, family="mistral",
                         sliding_window=4096),
    # Qwen/Qwen2.5-0.5B, -1.5B (tied embeddings) and -7B (untied; its vocabulary is padded to
    # 152064). config.json: use_sliding_window false, so every layer attends fully.
    "qwen2.5-0.5b": _qwen2(24, 896, 14, 2, 4864, vocab_size=151936, block_size=32768, tie_embeddings=True),
    "qwen2.5-1.5b": _qwen2(28, 1536, 12, 2, 8960, vocab_size=151936, block_size=131072, tie_embeddings=True),
    "qwen2.5-7b": _qwen2(28, 3584, 28, 4, 18944, vocab_size=152064, block_size=131072),
    # Qwen/Qwen3-0.6B (tied embeddings: 16 heads of 128 on a 1024-wide stream) and Qwen/Qwen3-8B
    "qwen3-0.6b": _qwen3(28, 1024, 16, 8, 3072, tie_embeddings=True),
    "qwen3-8b": _qwen3(36, 4096, 32, 8, 12288),
    # --- Mixture-of-Experts (count shows total and active parameters) ---
    # mistralai/Mixtral-8x7B-v0.1: 8 experts of width 14336 (= intermediate_size), top-2 of a softmax
    # over all 8, renormalised; GQA 8, theta 1e6, no sliding window (config.json sliding_window null)
    "mixtral-8x7b": _llama("llama2", 32, 4096, 32, 8, 14336, family="mixtral", block_size=32768, rope_theta=1e6,
                           n_routed_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                           router_aux_loss_coef=0.02),
    # Qwen/Qwen3-30B-A3B: Qwen3 attention (32 heads of 128, GQA 4), 128 experts of 768, top-8 renormalised,
    # every layer MoE (decoder_sparse_step 1, mlp_only_layers []); intermediate_size 6144 is unused
    "qwen3-30b-a3b": _qwen3(48, 2048, 32, 4, 6144, family="qwen3-moe", n_routed_experts=128, num_experts_per_tok=8,
                            moe_intermediate_size=768, norm_topk_prob=True, router_aux_loss_coef=0.001),
    # deepseek-ai/DeepSeek-V3 main model, WITHOUT its multi-token-prediction module (num_nextn_predict_layers 1:
    # one more layer in the released checkpoint, which is not part of the model that predicts the next token):
    # low-rank query 1536, 256 routed experts of 2048 + 1 shared, top-8 by sigmoid score within the 4 best of
    # 8 groups (noaux_tc), renormalised, x2.5; 3 dense layers of 18432
    "deepseek-v3": _deepseek("deepseek-v3", 61, 7168, 128, 18432, mscale=1.0, vocab_size=129280, q_lora_rank=1536,
                             n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1,
                             moe_intermediate_size=2048, first_k_dense_replace=3, scoring_func="sigmoid",
                             topk_method="noaux_tc", n_group=8, topk_group=4, norm_topk_prob=True,
                             routed_scaling_factor=2.5),
    # deepseek-ai/DeepSeek-V2-Lite: full-rank query, 64 routed experts of 1408 + 2 shared, top-6 of a softmax
    # (greedy; its n_group 1 / topk_group 1 limit nothing), not renormalised; 1 dense layer of 10944
    "deepseek-v2-lite": _deepseek("deepseek-v2", 27, 2048, 16, 10944, mscale=0.707, vocab_size=102400,
                                  n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
                                  moe_intermediate_size=1408, first_k_dense_replace=1),
}

# Official parameter counts (exact, from the released safetensors checkpoints).
OFFICIAL_PARAMS: dict[str, int] = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
    "mistral-7b": 7_241_732_096,
    # Qwen2.5 model cards: 0.49B, 1.54B, 7.61B (tied embeddings counted once)
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-7b": 7_615_616_512,
    # The parameters transformers builds for each official config.json (tied embeddings once), which the
    # model cards round: Qwen3 0.6B / 8.2B, Qwen3-30B-A3B 30.5B, Mixtral 46.7B, DeepSeek-V2-Lite 15.7B, and
    # DeepSeek-V3 671B: its released main model also stores 58 x 256 e_score_correction_bias entries (a
    # buffer, not a parameter), 671,026,419,200 tensor entries in all; the MTP module is not counted.
    "qwen3-0.6b": 596_049_920,
    "qwen3-8b": 8_190_735_360,
    "mixtral-8x7b": 46_702_792_704,
    "qwen3-30b-a3b": 30_532_122_624,
    "deepseek-v3": 671_026_404_352,
    "deepseek-v2-lite": 15_706_484_224,
}


def get_preset(name: str) -> ModelConfig:
    """An official model's config by name, e.g. get_preset('llama3.1-8b')."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise UserError(f"unknown model '{name}'{closest(name.lower(), PRESETS)}; known presets: "
                        f"{', '.join(PRESETS)} (or give a .toml file)") from None


def load_model_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ModelConfig:
    """MODEL as the CLI takes it: a preset name or a TOML file, then `--set` overrides."""
    if spec.endswith(".toml") or Path(spec).is_file():
        cfg = ModelConfig.from_toml(spec)
    else:
        cfg = get_preset(spec)
    return cfg.with_overrides(overrides)


def resolve_model_section(section: Mapping[str, Any], *, where: str = "[model]") -> ModelConfig:
    """A training config's [model] table: either full fields, or `preset = NAME` / `style = NAME`
    plus field overrides (style needs n_layer, n_embd, n_head)."""
    section = dict(section)
    preset = section.pop("preset", None)
    style = section.pop("style", None)
    if preset is not None and style is not None:
        raise UserError(f"{where}: give either preset or style, not both")
    if preset is not None:
        return get_preset(str(preset)).replace(**check_fields(section, where=where, partial=True))
    if style is not None:
        fields = check_fields(section, where=where, partial=True)
        missing = [k for k in ("n_layer", "n_embd", "n_head") if k not in fields]
        if missing:
            raise UserError(f"{where}: style '{style}' needs {', '.join(missing)}")
        return style_config(str(style), fields.pop("n_layer"), fields.pop("n_embd"), fields.pop("n_head"),
                            **fields)
    return ModelConfig.from_dict(section, where=where)


def load_toml_model(path: str | Path) -> ModelConfig:
    return resolve_model_section(load_toml(path), where=str(path))
