"""Mixture-of-Experts feed-forward: Mixtral, Qwen3-MoE, DeepSeek-V2 and DeepSeek-V3 from one module.

Each token is sent to `num_experts_per_tok` of `n_routed_experts` SwiGLU experts (token-choice
top-k), their outputs are summed with the routing weights, and `n_shared_experts` (DeepSeek)
add one always-on SwiGLU of n_shared_experts · moe_intermediate_size. Layers before
`first_k_dense_replace` keep the dense FeedForward (model.Block chooses).

Routing (`route`), the rules of the four reference models:
- softmax scoring (Mixtral, Qwen3-MoE, DeepSeek-V2): scores = softmax(router logits) over all
  experts, top-k of them; `norm_topk_prob` renormalises the k weights to sum to 1 (Mixtral always
  does, Qwen3-MoE per its config, DeepSeek-V2 never).
- sigmoid scoring (DeepSeek-V3, arXiv 2412.19437 §2.1.2): scores = sigmoid(logits); with
  topk_method noaux_tc experts are *chosen* by scores + e_score_correction_bias but *weighted* by
  the scores alone, then renormalised (norm_topk_prob).
- group-limited routing (`n_group` > 1): the experts form n_group equal groups, each token keeps
  its best `topk_group` groups and picks its k experts inside them. A group's score is its best
  expert's (topk_method group_limited_greedy, DeepSeek-V2) or the sum of its best two (noaux_tc,
  DeepSeek-V3, with the bias).
- then every weight is multiplied by `routed_scaling_factor`.
The router matmul runs in fp32 (as DeepSeek keeps it), whatever the model's dtype.

Experts are computed dropless (every assignment is kept; no capacity factor): the T·k
(token, expert) assignments are sorted by expert and each expert's rows go through one grouped
matmul (`torch._grouped_mm`, fp32 and bf16 on CPU in torch 2.13) with the expert weights held as
3-D parameters [E, in, out] (gate and up fused: [E, n_embd, 2·I]; down: [E, I, n_embd]), so FSDP
shards each as one tensor and the hot path has no Python loop over experts. The "math"
implementation (the FLOP-counting reference, as for attention) runs the same sorted layout
through one plain matmul per expert that has tokens, which FlopCounterMode counts (it has no
formula for _grouped_mm); devices/dtypes where _grouped_mm is unavailable use that loop too.

Balancing, two options:
- auxiliary-loss-free (DeepSeek-V3, topk_method noaux_tc): after each optimizer step every expert's
  bias moves by `rate` towards balance, b_i += rate · sign(mean load - load_i) (§2.1.2, rate
  0.001 in DeepSeek-V3), from the tokens each expert received during the step, summed over
  micro-batches and data-parallel ranks (`update_expert_bias`). Outside autograd; the bias is a
  persistent buffer, so checkpoints carry it and a resumed run continues exactly.
- the Switch/Mixtral load-balancing loss, router_aux_loss_coef · E · Σ_i f_i · P_i with f_i the
  fraction of the T·k assignments expert i received and P_i its mean routing probability, pooled
  over all MoE layers of the forward exactly as transformers' `load_balancing_loss_func`
  (model.Transformer adds it to the training loss; `aux_loss`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


def is_moe_layer(cfg, layer_idx: int) -> bool:
    """Whether layer `layer_idx` of `cfg` has routed experts (the first `first_k_dense_replace`
    layers of a MoE model stay dense)."""
    return bool(getattr(cfg, "n_routed_experts", 0)) and layer_idx >= (cfg.first_k_dense_replace or 0)


# ---- routing ----------------------------------------------------------------------------------

def route(logits: torch.Tensor, cfg, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights (T, k) fp32, experts (T, k) int64, scores (T, E) fp32) for router logits (T, E);
    `bias` (E,) is the noaux_tc router's e_score_correction_bias (None otherwise)."""
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + bias
    n_group = cfg.n_group or 1
    if n_group > 1:
        grouped = choice.view(choice.size(0), n_group, -1)
        if cfg.topk_method == "noaux_tc":
            group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_score = grouped.amax(dim=-1)
        keep = group_score.topk(cfg.topk_group or n_group, dim=-1, sorted=False).indices
        mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~mask.unsqueeze(-1).expand_as(grouped).reshape_as(choice), float("-inf"))
    experts = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, experts)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if cfg.routed_scaling_factor != 1.0:
        weights = weights * cfg.routed_scaling_factor
    return weights, experts, scores


# ---- grouped matmul ---------------------------------------------------------------------------

@torch.compiler.disable  # a probe that runs once, eagerly
@functools.cache
def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs on this device type and dtype (checked once, on a tiny
    problem against plain matmuls)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.arange(24, dtype=dtype, device=device_type).view(3, 8) / 8
        w = torch.arange(128, dtype=dtype, device=device_type).view(2, 8, 8) / 64
        out = torch._grouped_mm(x, w, offs=torch.tensor([1, 3], dtype=torch.int32, device=device_type))
        return bool(torch.equal(out, torch.cat((x[:1] @ w[0], x[1:] @ w[1]))))
    except (RuntimeError, NotImplementedError):
        return False


def use_grouped_mm(x: torch.Tensor, w: torch.Tensor) -> bool:
    """_grouped_mm for rows x (N, in) and weights w (E, in, out): the kernel needs every row stride
    a multiple of 16 bytes (in and out of 4 fp32 or 8 bf16 numbers; any real model's widths), and
    torch.compile's tracing of it accepts bf16 only (torch 2.13)."""
    aligned = (x.size(-1) * x.element_size()) % 16 == 0 and (w.size(-1) * w.element_size()) % 16 == 0
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False
    return aligned and grouped_mm_works(x.device.type, x.dtype)


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, loop: bool) -> torch.Tensor:
    """Rows of x (N, in) sorted by expert, counts[e] of them for expert e, each times its w[e]
    (in, out) -> (N, out). One grouped matmul, or with `loop` (or where _grouped_mm cannot run) a
    plain matmul per expert with rows."""
    if torch.is_autocast_enabled(x.device.type):  # _grouped_mm has no autocast rule: cast as a matmul would
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    elif w.dtype != x.dtype:
        x = x.to(w.dtype)
    if not loop and use_grouped_mm(x, w):
        return torch._grouped_mm(x, w, offs=counts.cumsum(0).to(torch.int32))
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            outs.append(x[start:start + n] @ w[e])
            start += n
    return torch.cat(outs) if outs else x.new_zeros(0, w.size(-1))


# ---- the layer --------------------------------------------------------------------------------

class Router(nn.Module):
    """Router logits = x @ weightᵀ (E per token, computed in fp32), and for topk_method noaux_tc
    the e_score_correction_bias buffer that auxiliary-loss-free balancing adjusts."""

    def __init__(self, cfg):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.n_embd))
        if cfg.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())


class MoE(nn.Module):
    """Routed experts (+ shared experts); the same call signature as model.FeedForward.

    After each forward, `last_routing` holds (tokens per expert (E,) int64, routing probability
    summed over tokens (E,) fp32 with its graph, tokens) for the model's auxiliary loss and load
    accounting (model.Transformer reads it once per forward, so activation checkpointing's
    recomputation is not counted twice)."""

    def __init__(self, cfg, implementation: str = "sdpa"):
        super().__init__()
        from scalelab.model import FeedForward

        self.cfg = cfg
        self.loop = implementation == "math"
        E, H, I = cfg.n_routed_experts, cfg.n_embd, cfg.expert_hidden
        self.router = Router(cfg)
        self.gate_up = nn.Parameter(torch.empty(E, H, 2 * I))  # [gate | up] of each expert, x @ w
        self.down = nn.Parameter(torch.empty(E, I, H))
        n_shared = cfg.n_shared_experts or 0
        self.shared = FeedForward(cfg, hidden=n_shared * I) if n_shared else None
        self.last_routing: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self.step_load: torch.Tensor | None = None  # tokens per expert this optimizer step (record_load)

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float) -> None:
        """N(0, std) for the router and the experts' gate/up, N(0, residual_std) for down (it
        writes into the residual stream), bias 0. The shared expert is a FeedForward, which the
        model initialises with the others."""
        nn.init.normal_(self.router.weight, mean=0.0, std=std)
        nn.init.normal_(self.gate_up, mean=0.0, std=std)
        nn.init.normal_(self.down, mean=0.0, std=residual_std)
        if self.router.e_score_correction_bias is not None:
            self.router.e_score_correction_bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts, scores = route(self.router(x), self.cfg, self.router.e_score_correction_bias)
        k = experts.size(1)
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)  # assignments sorted by expert (token order within one)
        counts = torch.bincount(flat, minlength=self.cfg.n_routed_experts)
        token = order // k
        h = grouped_matmul(x[token], self.gate_up, counts, self.loop)
        gate, up = h.chunk(2, dim=-1)
        out = grouped_matmul(F.silu(gate) * up, self.down, counts, self.loop)
        # back to (token, k) order, then each token's weighted sum over its k experts: a gather and a
        # reduction (fp32, as the weights are), deterministic on every device where index_add_ is not
        unsort = torch.empty_like(order)
        unsort[order] = torch.arange(order.numel(), device=order.device)
        y = (out[unsort].view(-1, k, out.size(-1)) * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)
        self.last_routing = (counts, self._probabilities(scores).sum(dim=0), x.size(0))
        if self.shared is not None:
            y = y + self.shared(x)
        return y.reshape(shape)

    def _probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """Routing probabilities for the auxiliary loss: the softmax scores, or the sigmoid scores
        normalised to sum to 1 per token (DeepSeek-V3's complementary balance loss does the same)."""
        return scores if self.cfg.scoring_func != "sigmoid" else scores / scores.sum(dim=-1, keepdim=True)


def aux_loss(moe_layers: list[MoE]) -> torch.Tensor:
    """The load-balancing loss of the last forward of `moe_layers`, E · Σ_i f_i · P_i pooled over
    the layers exactly as transformers' load_balancing_loss_func pools them: f_i = assignments to
    expert i / rows (rows = tokens summed over the layers; so Σ f_i = k), P_i = routing probability
    of expert i summed over the same rows / rows."""
    counts = sum(m.last_routing[0].float() for m in moe_layers)
    probs = sum(m.last_routing[1] for m in moe_layers)
    rows = sum(m.last_routing[2] for m in moe_layers)
    n_experts = counts.numel()
    return n_experts * ((counts / rows) * (probs / rows)).sum()


# ---- load accounting and balancing after the optimizer step ------------------------------------

def record_load(layers: list[MoE]) -> None:
    """Add each layer's tokens per expert of its last forward to its count for the current
    optimizer step (`MoE.step_load`, a plain attribute: DDP would overwrite a buffer with rank 0's)."""
    for m in layers:
        counts = m.last_routing[0]
        m.step_load = counts if m.step_load is None else m.step_load + counts


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def take_step_load(layers: list[MoE]) -> torch.Tensor | None:
    """(layers, E) int64: the tokens each expert received since the last call (zeros for a layer
    that ran no forward), and reset the counts; None without MoE layers."""
    if not layers:
        return None
    rows = [m.step_load if m.step_load is not None else torch.zeros(m.cfg.n_routed_experts, dtype=torch.long)
            for m in layers]
    device = next((r.device for r in rows if r.device.type != "cpu"), rows[0].device)
    for m in layers:
        m.step_load = None
    return torch.stack([r.to(device) for r in rows])


@torch.no_grad()
def update_expert_bias(layers: list[MoE], load: torch.Tensor, rate: float) -> None:
    """b_i += rate · sign(mean load - load_i) for each layer's noaux_tc router (DeepSeek-V3's
    auxiliary-loss-free balancing). `load` (layers, E): tokens each expert received this step."""
    for layer, counts in zip(layers, load):
        bias = layer.router.e_score_correction_bias
        if bias is not None and rate:
            counts = counts.to(bias.device, torch.float32)
            bias += rate * torch.sign(counts.mean() - counts)


def load_figures(load: torch.Tensor) -> dict[str, Any]:
    """Metrics of one step's expert load (MoE layers, E): the tokens each expert received, and
    the balance of the worst layer as max/mean (1 = perfectly balanced, E/k = every token on the
    same k experts) and the mean over layers of the coefficient of variation std/mean (0 = balanced)."""
    load = load.double()
    mean = load.mean(dim=1)
    return {"moe_tokens_per_expert": load.long().tolist(),
            "moe_load_max_over_mean": float((load.amax(dim=1) / mean).max()),
            "moe_load_cv": float((load.std(dim=1, unbiased=False) / mean).mean())}
