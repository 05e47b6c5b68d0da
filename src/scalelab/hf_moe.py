"""Hugging Face conversion of the MLA and MoE parts: MixtralForCausalLM, Qwen3MoeForCausalLM,
DeepseekV2ForCausalLM and DeepseekV3ForCausalLM (their config fields and their weight layouts).

The weights on disk are what the Hub holds and what
transformers' save_pretrained writes: one tensor per expert and projection (transformers 5 fuses
them only in memory). Here:

- experts: HF's per-expert gate (w1) / up (w3) / down (w2), nn.Linear layout (out × in), are
  transposed and stacked into our [E, n_embd, 2·I] gate_up and [E, I, n_embd] down, and split
  back on export;
- router: `gate.weight` is our `router.weight`; DeepSeek-V3's `gate.e_score_correction_bias` is
  `router.e_score_correction_bias`;
- MLA: the same projections (kv_a_proj_with_mqa -> kv_a_proj, q_a_layernorm -> q_a_norm,
  kv_a_layernorm -> kv_a_norm). DeepSeek's checkpoints (V2 always, V3 with rope_interleave, its
  default) rotate interleaved pairs (x0, x1), (x2, x3)... of the RoPE part; we rotate halves.
  Attention only ever takes q·k over the same layout for both, so the import reorders the RoPE
  rows of q_proj / q_b_proj and kv_a_proj to [x0, x2, x4, ..., x1, x3, ...] (a fixed permutation,
  exact) and the export restores the interleaved order (and writes rope_interleave = true), the
  layout every DeepSeek runtime expects.

The table rows themselves (hf.ARCHS) are in scalelab.hf; this module holds their MoE/MLA config
fields and tensor transforms.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from scalelab.errors import UserError

HF_CLASS = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
            "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


# ---- configs ----------------------------------------------------------------------------------

def moe_fields_from_hf(hf: Mapping[str, Any], arch: str, field: Callable) -> dict[str, Any]:
    """The ModelConfig MoE (and MLA) fields of a config.json of `arch`; `field(key, kind, default)`
    reads one value (hf.config_field bound to the file). Features our model does not compute are
    refused rather than imported as something else."""
    if arch == "mixtral":
        if field("router_jitter_noise", float, 0.0):
            raise UserError("router_jitter_noise > 0 (Mixtral's training-time router noise) is not supported; set it to 0")
        return {"n_routed_experts": field("num_local_experts", int), "num_experts_per_tok": field("num_experts_per_tok", int),
                "norm_topk_prob": True, "router_aux_loss_coef": field("router_aux_loss_coef", float, 0.0)}
    if arch == "qwen3_moe":
        if field("decoder_sparse_step", int, 1) != 1 or hf.get("mlp_only_layers"):
            raise UserError("Qwen3-MoE with decoder_sparse_step != 1 or mlp_only_layers (dense layers between "
                            "MoE layers) is not supported; scalelab's dense layers are the first first_k_dense_replace")
        # the Hub's files say num_experts; transformers 5 writes its attribute num_local_experts
        experts = field("num_experts", int, None) or field("num_local_experts", int)
        return {"n_routed_experts": experts, "num_experts_per_tok": field("num_experts_per_tok", int),
                "moe_intermediate_size": field("moe_intermediate_size", int),
                "norm_topk_prob": field("norm_topk_prob", bool, False),
                "router_aux_loss_coef": field("router_aux_loss_coef", float, 0.0)}
    # DeepSeek: transformers' V2 always scores with softmax and never renormalises; V3 always
    # scores with sigmoid and routes with the bias (noaux_tc), whatever else config.json says.
    if field("moe_layer_freq", int, 1) != 1:
        raise UserError("moe_layer_freq != 1 (dense layers between MoE layers) is not supported; scalelab's dense "
                        "layers are the first first_k_dense_replace")
    if hf.get("quantization_config"):
        raise UserError("this checkpoint is quantized (quantization_config; DeepSeek-V3's release is FP8 with "
                        "block scales): convert it to bf16 first, e.g. with DeepSeek's fp8_cast_bf16.py")
    v3 = arch == "deepseek_v3"
    method = "noaux_tc" if v3 else field("topk_method", str, "greedy")
    if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise UserError(f"topk_method {method!r} is not supported; use greedy, group_limited_greedy or noaux_tc")
    grouped = method != "greedy" and field("n_group", int, 1) > 1
    out = {"n_routed_experts": field("n_routed_experts", int), "num_experts_per_tok": field("num_experts_per_tok", int),
           "n_shared_experts": field("n_shared_experts", int, 0),
           "moe_intermediate_size": field("moe_intermediate_size", int),
           "first_k_dense_replace": field("first_k_dense_replace", int, 0),
           "scoring_func": "sigmoid" if v3 else "softmax", "topk_method": method,
           "n_group": field("n_group", int) if grouped else None,
           "topk_group": field("topk_group", int) if grouped else None,
           "norm_topk_prob": field("norm_topk_prob", bool, True) if v3 else False,
           "routed_scaling_factor": field("routed_scaling_factor", float, 1.0),
           "q_lora_rank": field("q_lora_rank", int, None), "kv_lora_rank": field("kv_lora_rank", int),
           "qk_nope_head_dim": field("qk_nope_head_dim", int), "qk_rope_head_dim": field("qk_rope_head_dim", int),
           "v_head_dim": field("v_head_dim", int)}
    if not field("n_routed_experts", int, 0) or out["first_k_dense_replace"] >= field("num_hidden_layers", int):
        # a dense DeepSeek (transformers builds no MoE layer)
        out = {k: v for k, v in out.items() if k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                                                     "qk_rope_head_dim", "v_head_dim")}
    return out


def moe_fields_to_hf(cfg, arch: str) -> dict[str, Any]:
    """The config.json keys of `arch` for cfg's MoE/MLA fields (UserError if `arch` cannot hold them)."""
    if cfg.is_mla != arch.startswith("deepseek"):
        what = "MLA (kv_lora_rank)" if cfg.is_mla else "standard attention"
        raise UserError(f"{HF_CLASS[arch]} cannot hold {what}; export a MLA model as deepseek_v2 or deepseek_v3")
    k, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    if arch == "mixtral":
        if (cfg.n_shared_experts, cfg.first_k_dense_replace, cfg.scoring_func, cfg.n_group,
                cfg.routed_scaling_factor, cfg.norm_topk_prob) != (0, 0, "softmax", None, 1.0, True) \
                or cfg.expert_hidden != cfg.ffn_hidden:
            raise UserError("MixtralForCausalLM routes softmax top-k renormalised over experts of width d_ff, no shared "
                            "or dense layers; this model differs (export as qwen3_moe or deepseek_v3)")
        return {"num_local_experts": E, "num_experts_per_tok": k, "router_aux_loss_coef": cfg.router_aux_loss_coef,
                "router_jitter_noise": 0.0, "output_router_logits": False}
    if arch == "qwen3_moe":
        if (cfg.n_shared_experts, cfg.first_k_dense_replace, cfg.scoring_func, cfg.n_group,
                cfg.routed_scaling_factor) != (0, 0, "softmax", None, 1.0):
            raise UserError("Qwen3MoeForCausalLM routes softmax top-k, no shared experts, groups, scaling or dense "
                            "layers; this model differs (export as deepseek_v3)")
        return {"num_experts": E, "num_experts_per_tok": k, "moe_intermediate_size": cfg.expert_hidden,
                "norm_topk_prob": cfg.norm_topk_prob, "router_aux_loss_coef": cfg.router_aux_loss_coef,
                "decoder_sparse_step": 1, "mlp_only_layers": [], "output_router_logits": False}
    v3 = arch == "deepseek_v3"
    if cfg.is_moe:
        wanted = ("sigmoid", "noaux_tc") if v3 else ("softmax",)
        if cfg.scoring_func != wanted[0] or (v3 and cfg.topk_method != "noaux_tc") or \
                (not v3 and (cfg.topk_method == "noaux_tc" or cfg.norm_topk_prob)):
            raise UserError(f"{HF_CLASS[arch]} routes with {' + '.join(wanted)}"
                            f"{'' if v3 else ', never renormalised'}; this model has {cfg.scoring_func}, "
                            f"{cfg.topk_method}{', norm_topk_prob' if cfg.norm_topk_prob else ''} "
                            f"(export as {'deepseek_v2' if v3 else 'deepseek_v3'} if that one matches)")
    out = {"q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
           "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
           # a dense MLA model: every layer dense (first_k_dense_replace = n_layer), with placeholder
           # integers where transformers' config wants them (no MoE layer is built from them)
           "n_routed_experts": E or 1, "num_experts_per_tok": k or 1, "n_shared_experts": cfg.n_shared_experts,
           "moe_intermediate_size": cfg.expert_hidden,
           "first_k_dense_replace": cfg.first_k_dense_replace if cfg.is_moe else cfg.n_layer,
           "topk_method": cfg.topk_method, "n_group": cfg.n_group or 1, "topk_group": cfg.topk_group or cfg.n_group or 1,
           "norm_topk_prob": cfg.norm_topk_prob, "routed_scaling_factor": cfg.routed_scaling_factor}
    if v3:
        out.update(scoring_func="sigmoid", rope_interleave=True, num_nextn_predict_layers=0)
    else:
        out["scoring_func"] = "softmax"
    return out


# ---- weights ----------------------------------------------------------------------------------

def expert_names(arch: str) -> tuple[str, tuple[str, str, str]]:
    """(the MoE block's name in a layer, the gate/up/down names of one expert) on disk."""
    if arch == "mixtral":
        return "block_sparse_moe", ("w1", "w3", "w2")
    return "mlp", ("gate_proj", "up_proj", "down_proj")


def stack_gate_up(theirs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-expert [gate_0, up_0, gate_1, up_1, ...] (each I x n_embd) -> our gate_up [E, n_embd, 2I]."""
    return [torch.stack([torch.cat(theirs[e:e + 2]).t() for e in range(0, len(theirs), 2)])]


def split_gate_up(ours: list[torch.Tensor]) -> list[torch.Tensor]:
    """The inverse of stack_gate_up."""
    out = []
    for w in ours[0]:  # [n_embd, 2I]
        gate, up = w.t().chunk(2)
        out += [gate.contiguous(), up.contiguous()]
    return out


def stack_down(theirs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-expert down (n_embd x I each) -> our down [E, I, n_embd]."""
    return [torch.stack([t.t() for t in theirs])]


def split_down(ours: list[torch.Tensor]) -> list[torch.Tensor]:
    return [w.t().contiguous() for w in ours[0]]


def rope_rows(rows_per_block: int, blocks: int, offset: int, rope_dim: int, to_halves: bool) -> torch.Tensor:
    """A row order for a projection whose output is `blocks` blocks of `rows_per_block` rows, each
    with a RoPE part of rope_dim rows at `offset`: DeepSeek's interleaved pairs -> our halves
    ([0, 2, 4, ..., 1, 3, ...]) or, with to_halves False, back."""
    halves = torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])
    perm = halves if to_halves else halves.argsort()
    order = torch.arange(blocks * rows_per_block).view(blocks, rows_per_block)
    order[:, offset:offset + rope_dim] = order[:, offset:offset + rope_dim][:, perm]
    return order.reshape(-1)


def rope_interleaved(hf: Mapping[str, Any], arch: str) -> bool:
    """Whether a DeepSeek checkpoint's RoPE rows are interleaved pairs (V2 always; V3 unless
    rope_interleave is false)."""
    return arch == "deepseek_v2" or bool(hf.get("rope_interleave", True))


def extra_layer_keys(hf_keys, cfg) -> list[str]:
    """Keys of layers at or beyond n_layer: DeepSeek-V3's multi-token-prediction module (layer 61 of
    the release, num_nextn_predict_layers = 1), which the main model does not use (transformers
    skips it too)."""
    def layer(key: str) -> int | None:
        parts = key.split(".")
        return int(parts[2]) if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit() else None
    return [k for k in hf_keys if (layer(k) or 0) >= cfg.n_layer]
