"""Multi-head Latent Attention (MLA, DeepSeek-V2 and V3; arXiv 2405.04434 §2.1).

Keys and values are not projected from the hidden state per head. The hidden state is first
compressed to one small latent per token (`kv_lora_rank` wide, RMS-normalised), and each head's
non-positional key part (`qk_nope_head_dim`) and value (`v_head_dim`) are expanded from that
latent by `kv_b_proj`. RoPE cannot pass through that expansion, so position is carried by a
separate key part (`qk_rope_head_dim`), projected from the hidden state beside the latent and
shared by every head (MQA-style); each head's query is [nope | rope] to match. The query may
itself go through a low-rank bottleneck (`q_lora_rank`, with its own RMSNorm) or be one
projection.

The KV cache stores what the keys and values are made from, the latent plus the rope key
(kv_lora_rank + qk_rope_head_dim numbers per token and layer, 576 for DeepSeek-V3, against
2 · 128 · 128 = 32,768 for the same heads as MHA): that is the point of MLA. Keys and values are
re-expanded from the cache at each step (the "absorbed" form, which folds kv_b_proj into the
query and output projections so attention runs in the latent space, is an inference optimisation
not done here).

Parameter names follow Hugging Face's DeepseekV3Attention (kv_a_proj_with_mqa is kv_a_proj here,
q_a_layernorm / kv_a_layernorm are q_a_norm / kv_a_norm). RoPE rotates the two halves of the
rope part, as everywhere in scalelab; DeepSeek's checkpoints rotate interleaved pairs, and the
import permutes those rows once (scalelab.hf_moe) so the two agree exactly.

Softmax scale: 1/sqrt(qk_nope_head_dim + qk_rope_head_dim), times mscale(factor, mscale_all_dim)²
when the RoPE is YaRN-scaled with `mscale_all_dim` (DeepSeek's correction for the attention
entropy at long context; HF's `yarn_apply_mscale`). The cos/sin are then scaled by
mscale(factor, mscale) / mscale(factor, mscale_all_dim) (model.rope_frequencies).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

# DeepSeek's reference code (and HF's) builds the two latent norms with RMSNorm's default eps,
# not the model's rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """DeepSeek's YaRN magnitude correction: 0.1 · mscale · ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(cfg) -> float:
    """The attention-logit scale of an MLA model (see the module docstring)."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    scaling = cfg.rope_scaling or {}
    if scaling.get("type", scaling.get("rope_type")) == "yarn" and scaling.get("mscale_all_dim"):
        m = yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"]))
        scale *= m * m
    return scale


class MLAttention(nn.Module):
    """Multi-head latent attention; the same call signature as model.Attention."""

    def __init__(self, cfg, layer_idx: int, implementation: str):
        super().__init__()
        self.layer_idx, self.implementation = layer_idx, implementation
        self.n_head = cfg.n_head
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        qk_head_dim = self.nope + self.rope
        self.scale = softmax_scale(cfg)
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(cfg.n_embd, cfg.q_lora_rank, bias=cfg.bias)
            self.q_a_norm = nn.RMSNorm(cfg.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, cfg.n_head * qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * qk_head_dim, bias=False)
        self.kv_a_proj = nn.Linear(cfg.n_embd, self.kv_rank + self.rope, bias=cfg.bias)  # [latent | rope key]
        self.kv_a_norm = nn.RMSNorm(self.kv_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_rank, cfg.n_head * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(cfg.n_head * self.v_dim, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_cache=None) -> torch.Tensor:
        from scalelab.model import apply_rope, causal_attention

        B, S, _ = x.shape
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x))) if hasattr(self, "q_a_proj") else self.q_proj(x)
        q_nope, q_rope = q.view(B, S, self.n_head, -1).transpose(1, 2).split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.kv_a_proj(x).split([self.kv_rank, self.rope], dim=-1)
        latent = self.kv_a_norm(latent).unsqueeze(1)  # (B, 1, S, kv_lora_rank): one "head"
        k_rope = k_rope.unsqueeze(1)  # (B, 1, S, rope): shared by every head
        q_rope, k_rope = apply_rope(q_rope, *rope), apply_rope(k_rope, *rope)
        if kv_cache is not None:  # the cache holds the latent and the rope key, never per-head K/V
            latent, k_rope = kv_cache.update(self.layer_idx, latent, k_rope)
        s_k = latent.size(2)
        k_nope, v = self.kv_b_proj(latent.squeeze(1)).view(B, s_k, self.n_head, -1).transpose(1, 2) \
            .split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, self.n_head, -1, -1)), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        y = causal_attention(q, k, v, self.implementation, scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))
