"""Hugging Face conversion of the MLA and MoE parts: MixtralForCausalLM, Qwen3MoeForCausalLM,
DeepseekV2ForCausalLM and DeepseekV3ForCausalLM (their config fields and their weight names).

scalelab.hf keeps the parts these share with LLaMA (embeddings, norms, lm_head, GQA attention,
dense FFN) and calls these per layer. The weights on disk are what the Hub holds and what
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
  exact) and the export restores the interleaved order, the layout every DeepSeek runtime expects.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from scalelab.errors import UserError

MOE_ARCHITECTURES = ("mixtral", "qwen3_moe", "deepseek_v2", "deepseek_v3")
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
        return {"n_routed_experts": field("num_experts", int), "num_experts_per_tok": field("num_experts_per_tok", int),
                "moe_intermediate_size": field("moe_intermediate_size", int),
                "norm_topk_prob": field("norm_topk_prob", bool, False),
                "router_aux_loss_coef": field("router_aux_loss_coef", float, 0.0)}
    # DeepSeek: transformers' V2 always scores with softmax and never renormalises; V3 always
    # scores with sigmoid and routes with the bias (noaux_tc), whatever else config.json says.
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
    if field("n_routed_experts", int, 0) == 0:  # a dense DeepSeek
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
           "n_routed_experts": E or None, "num_experts_per_tok": k, "n_shared_experts": cfg.n_shared_experts or None,
           "moe_intermediate_size": cfg.expert_hidden if cfg.is_moe else None,
           "first_k_dense_replace": cfg.first_k_dense_replace if cfg.is_moe else cfg.n_layer,
           "topk_method": cfg.topk_method, "n_group": cfg.n_group or 1, "topk_group": cfg.topk_group or cfg.n_group or 1,
           "norm_topk_prob": cfg.norm_topk_prob, "routed_scaling_factor": cfg.routed_scaling_factor}
    if v3:
        out.update(scoring_func="sigmoid", rope_interleave=True, num_nextn_predict_layers=0)
    else:
        out["scoring_func"] = "softmax"
    return out


# ---- weights: experts -------------------------------------------------------------------------

def _expert_names(arch: str, i: int) -> tuple[str, str, tuple[str, str, str]]:
    """(the layer's MoE prefix, the router's name, the gate/up/down names of one expert)."""
    if arch == "mixtral":
        return f"model.layers.{i}.block_sparse_moe.", "gate", ("w1", "w3", "w2")
    return f"model.layers.{i}.mlp.", "gate", ("gate_proj", "up_proj", "down_proj")


def moe_from_hf(take: Callable[[str], torch.Tensor], cfg, arch: str, i: int) -> dict[str, torch.Tensor]:
    """Our `layers.{i}.ffn.*` tensors of MoE layer i from HF tensors (`take(name)` returns one and
    marks it used)."""
    p, router, (g, u, d) = _expert_names(arch, i)
    o = f"layers.{i}.ffn."
    sd = {f"{o}router.weight": take(f"{p}{router}.weight")}
    if cfg.topk_method == "noaux_tc":
        sd[f"{o}router.e_score_correction_bias"] = take(f"{p}{router}.e_score_correction_bias")
    experts = range(cfg.n_routed_experts)
    sd[f"{o}gate_up"] = torch.stack([torch.cat([take(f"{p}experts.{e}.{g}.weight"), take(f"{p}experts.{e}.{u}.weight")]).t()
                                     for e in experts])
    sd[f"{o}down"] = torch.stack([take(f"{p}experts.{e}.{d}.weight").t() for e in experts])
    if cfg.n_shared_experts:
        for name in ("gate", "up", "down"):
            sd[f"{o}shared.{name}.weight"] = take(f"{p}shared_experts.{name}_proj.weight")
    return sd


def moe_to_hf(sd: Mapping[str, torch.Tensor], cfg, arch: str, i: int) -> dict[str, torch.Tensor]:
    """HF tensors of MoE layer i from our state dict; the inverse of moe_from_hf."""
    p, router, (g, u, d) = _expert_names(arch, i)
    o = f"layers.{i}.ffn."
    out = {f"{p}{router}.weight": sd[f"{o}router.weight"]}
    if cfg.topk_method == "noaux_tc":
        out[f"{p}{router}.e_score_correction_bias"] = sd[f"{o}router.e_score_correction_bias"]
    hidden = cfg.expert_hidden
    for e in range(cfg.n_routed_experts):
        gate_up = sd[f"{o}gate_up"][e].t()
        out[f"{p}experts.{e}.{g}.weight"] = gate_up[:hidden].contiguous()
        out[f"{p}experts.{e}.{u}.weight"] = gate_up[hidden:].contiguous()
        out[f"{p}experts.{e}.{d}.weight"] = sd[f"{o}down"][e].t().contiguous()
    if cfg.n_shared_experts:
        for name in ("gate", "up", "down"):
            out[f"{p}shared_experts.{name}_proj.weight"] = sd[f"{o}shared.{name}.weight"]
    return out


# ---- weights: MLA -----------------------------------------------------------------------------

def _rope_rows(cfg, rows_per_head: int, heads: int, offset: int, interleaved_to_halves: bool) -> torch.Tensor:
    """A row order for a projection whose output holds, for each of `heads` blocks of
    `rows_per_head`, a RoPE part of qk_rope_head_dim rows at `offset`: interleaved pairs ->
    halves ([0, 2, 4, ..., 1, 3, ...]) or back."""
    r = cfg.qk_rope_head_dim
    halves = torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2)])
    perm = halves if interleaved_to_halves else halves.argsort()
    order = torch.arange(heads * rows_per_head).view(heads, rows_per_head)
    order[:, offset:offset + r] = order[:, offset:offset + r][:, perm]
    return order.reshape(-1)


MLA_NAMES = (("q_proj", "q_proj"), ("q_a_proj", "q_a_proj"), ("q_a_norm", "q_a_layernorm"), ("q_b_proj", "q_b_proj"),
             ("kv_a_proj", "kv_a_proj_with_mqa"), ("kv_a_norm", "kv_a_layernorm"), ("kv_b_proj", "kv_b_proj"),
             ("o_proj", "o_proj"))


def rope_interleaved(hf: Mapping[str, Any], arch: str) -> bool:
    """Whether a DeepSeek checkpoint's RoPE rows are interleaved pairs (V2 always; V3 unless
    rope_interleave is false)."""
    return arch == "deepseek_v2" or bool(hf.get("rope_interleave", True))


def _permute_mla(sd: dict[str, torch.Tensor], cfg, prefix: str, q_name: str, kv_name: str, to_halves: bool) -> None:
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    q_order = _rope_rows(cfg, qk, cfg.n_head, cfg.qk_nope_head_dim, to_halves)
    kv_order = _rope_rows(cfg, cfg.kv_lora_rank + cfg.qk_rope_head_dim, 1, cfg.kv_lora_rank, to_halves)
    sd[f"{prefix}{q_name}.weight"] = sd[f"{prefix}{q_name}.weight"][q_order]
    sd[f"{prefix}{kv_name}.weight"] = sd[f"{prefix}{kv_name}.weight"][kv_order]


def mla_from_hf(take: Callable[[str], torch.Tensor], cfg, i: int, interleaved: bool) -> dict[str, torch.Tensor]:
    """Our `layers.{i}.attn.*` tensors of MLA layer i."""
    h, o = f"model.layers.{i}.self_attn.", f"layers.{i}.attn."
    low_rank = cfg.q_lora_rank is not None
    query = ("q_a_proj", "q_a_norm", "q_b_proj") if low_rank else ("q_proj",)
    sd = {f"{o}{ours}.weight": take(f"{h}{theirs}.weight") for ours, theirs in MLA_NAMES
          if ours in query or not ours.startswith("q_")}
    if interleaved:
        _permute_mla(sd, cfg, o, "q_b_proj" if low_rank else "q_proj", "kv_a_proj", to_halves=True)
    return sd


def mla_to_hf(sd: Mapping[str, torch.Tensor], cfg, i: int, interleaved: bool) -> dict[str, torch.Tensor]:
    h, o = f"model.layers.{i}.self_attn.", f"layers.{i}.attn."
    out = {f"{h}{theirs}.weight": sd[f"{o}{ours}.weight"] for ours, theirs in MLA_NAMES if f"{o}{ours}.weight" in sd}
    if interleaved:
        low_rank = cfg.q_lora_rank is not None
        _permute_mla(out, cfg, h, "q_b_proj" if low_rank else "q_proj", "kv_a_proj_with_mqa", to_halves=False)
    return out


def extra_layer_keys(hf_sd: Mapping[str, torch.Tensor], cfg) -> list[str]:
    """Tensors of layers beyond n_layer: DeepSeek-V3's multi-token-prediction module (layer 61 of
    the released checkpoint), which the main model does not use (transformers skips it too)."""
    return [k for k in hf_sd if k.startswith("model.layers.")
            and k.split(".")[2].isdigit() and int(k.split(".")[2]) >= cfg.n_layer]
