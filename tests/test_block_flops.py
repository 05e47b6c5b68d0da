"""FlopCounterMode on the math path equals counting's active-path FLOPs, exactly, for every block type of
the matmul list (counting.blocks): dense attention with an independent head_dim and q/k norms, MLA with a
full-rank or low-rank query, and the MoE feed-forward (router, k routed experts per token, shared experts,
dense first layers) under each routing rule. Forward + backward = 3 x forward. The counting side never sees
the model: it sums Matmul(d_in, d_out, copies, per_token) over the block list."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from scalelab import counting
from scalelab.config import ModelConfig
from scalelab.model import Transformer

V = 97
BASE = dict(n_layer=3, n_head=4, n_embd=64, vocab_size=V, block_size=64, d_ff=96)
MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12)
CONFIGS = {
    "qwen3-dense": dict(num_key_value_heads=2, head_dim=24, qk_norm=True),
    "mixtral-like": dict(num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
    "qwen3-moe-like": dict(num_key_value_heads=2, head_dim=24, qk_norm=True, n_routed_experts=8,
                           num_experts_per_tok=3, moe_intermediate_size=40, router_aux_loss_coef=0.01),
    "deepseek-v3-like": dict(**MLA, q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                             moe_intermediate_size=32, first_k_dense_replace=1, scoring_func="sigmoid",
                             topk_method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True,
                             routed_scaling_factor=2.5),
    "deepseek-v2-like": dict(**MLA, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
                             moe_intermediate_size=24, first_k_dense_replace=1, topk_method="group_limited_greedy",
                             n_group=2, topk_group=1),
    "mla-dense": dict(**MLA, q_lora_rank=20),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_flop_counter_equals_the_matmul_list(name):
    cfg = ModelConfig(**BASE, **CONFIGS[name])
    torch.manual_seed(0)
    model = Transformer(cfg, attention="math")
    B, S = 2, 20
    idx = torch.randint(0, V, (B, S))
    with FlopCounterMode(display=False) as forward:
        model(idx)
    assert forward.get_total_flops() == counting.forward_flops(cfg, B, S)
    with FlopCounterMode(display=False) as training:
        model(idx, idx)[1].backward()
    assert training.get_total_flops() == counting.training_flops(cfg, B, S) == 3 * counting.forward_flops(cfg, B, S)
    assert sum(p.numel() for p in model.parameters()) == counting.count_params(cfg).total


def test_moe_flops_written_out():
    """The MoE model's count, matmul by matmul, per token: the active path only."""
    cfg = ModelConfig(**BASE, **CONFIGS["deepseek-v3-like"])
    S, H, E, k, I = 20, 64, 8, 2, 32
    qk, v = 4 * (8 + 4), 4 * 12
    attention = H * 24 + 24 * qk + H * (16 + 4) + 16 * 4 * (8 + 12) + v * H + S * qk + S * v
    dense_ffn = 3 * H * 96
    moe = H * E + k * 3 * H * I + 3 * H * I  # router, k routed experts, one shared expert
    expected = 2 * (3 * attention + dense_ffn + 2 * moe + H * V)
    assert counting.forward_flops_per_token(cfg, S) == expected
    # the vectorised form (what a planner would call) agrees
    assert counting.forward_flops_per_token_arrays(*counting._shape_args(cfg), S,
                                                   **counting._style_kwargs(cfg)) == expected
