"""The time of one training step, from named parts, and hence MFU. No torch.

A step is one optimizer step of a resolved Layout (layout_cost's conventions). On the busiest
pipeline rank, each micro-step costs:

- matmuls: every GEMM of the rank's blocks (tp-local shapes) and lm_head, forward (1 GEMM) and
  backward (2 of the same FLOPs), each at max(FLOPs / MAMF, bytes / HBM): the accelerator's
  measured Maximum Achievable Matmul FLOPS (hardware.py) for large shapes, its memory bandwidth
  when a shape is too thin to reuse what it reads (roofline);
- attention: FlashAttention's causal FLOPs (half the S x S score matrix; backward 2.5x forward:
  five matmuls to two) at the accelerator's attention_fraction of peak;
- memory-bound ops (norms, RoPE, the SwiGLU product, residual adds, the loss's softmax) at HBM
  bandwidth, as bytes moved per token (ELEMENTWISE_PASSES, counted kernel by kernel for eager
  PyTorch without torch.compile); backward moves BACKWARD_PASSES times the forward's bytes;
- recomputation, per activation-checkpointing mode: full repeats each block's forward; torchtitan's
  selective-op policy saves the outputs of every other matmul and of attention and recomputes the
  rest (the 2nd, 4th, 6th matmul of a block: K, O and up; and every non-matmul op); selective-layer:K
  fully recomputes every K-th block;
- tensor-parallel collectives (layout_cost.communication), on the critical path (no async TP).

A step is m micro-steps stretched by the pipeline bubble (layout_cost.bubble_fraction), plus what
FSDP, HSDP, DDP and pipeline transfers leave exposed, plus the optimizer step (AdamW reads and
writes OPTIMIZER_BYTES_PER_PARAM per local parameter at HBM bandwidth). Collectives run at
COMM_EFFICIENCY of NVLink inside a node and of the network between nodes; FSDP's all-gathers hide
behind the micro-step's compute but for the first unit's, gradient reductions behind the last
micro-step's backward but for the last unit's.

Every constant lives in this module's CONSTANTS or in hardware.ACCELERATORS, with its source.
Calibrated, not measured: HBM_EFFICIENCY, COMM_EFFICIENCY and ELEMENTWISE_PASSES (see
docs/parallelism.md, "Step-time model", for which published runs set them and which are held out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scalelab import counting, layout_cost
from scalelab.config import ModelConfig
from scalelab.hardware import Accelerator
from scalelab.layout import Layout

# Fraction of the datasheet HBM bandwidth that streaming kernels reach. Assumed: PyTorch's
# elementwise kernels on large tensors reach 80-90% of peak (NVIDIA's STREAM-like bandwidthTest
# reports about 90% on A100/H100); 0.8 leaves room for the small tensors of a block.
HBM_EFFICIENCY = 0.8
# Fraction of the link bandwidth NCCL's ring collectives reach ("bus bandwidth" in nccl-tests):
# about 80% on NVLink and on 400 Gb/s InfiniBand for large messages. Assumed.
COMM_EFFICIENCY = 0.8
# Bytes moved by non-matmul kernels per token and block in one forward pass, in units of the
# activation dtype's size, per n_embd / kv_dim / ffn width, counted kernel by kernel for torchtitan's
# eager LLaMA block (no torch.compile), reads plus writes:
# - two RMSNorms, each x.float(), pow, mean, x * rsqrt, type_as, * weight: 36 bytes = 18 passes of n_embd;
# - RoPE on Q and on K through complex numbers (float, complex multiply, type_as): 14 passes each;
# - repeat_kv expanding K and V to every query head: read kv_dim, write n_embd, twice;
# - the attention output made contiguous again: 2 passes; two residual adds: 3 passes each;
# - SiLU (read, write) and the gate product (two reads, one write) over the FFN width: 5 passes.
ELEMENTWISE_PASSES = {"n_embd": 2 * 18 + 14 + 2 + 2 + 2 * 3, "kv_dim": 14 + 2, "ffn": 5}
BACKWARD_PASSES = 2.0  # backward of an elementwise op reads its saved inputs and the incoming gradient
# The loss's softmax per token and vocabulary entry: logits in the compute dtype read, fp32
# log-softmax written and read, its gradient written, read and cast back (fp32 4 + 4 + 4 + 4, 2 + 2 + 4).
LOSS_BYTES_PER_LOGIT = 24
# AdamW (foreach) per local parameter: reads param, grad, exp_avg, exp_avg_sq (fp32) and writes
# param and both moments (28 bytes), plus the gradient-norm read for clipping (4).
OPTIMIZER_BYTES_PER_PARAM = 32
# FSDP2's copies on the compute stream, bytes per unsharded element: copy-out after each all-gather
# (read and write the compute dtype: 2 + 2) and copy-in before the reduce-scatter (read the bf16
# gradient, write it in the fp32 reduce dtype: 2 + 4).
FSDP_COPY_BYTES = {"all-gather": 4, "reduce-scatter": 6}
# FlashAttention backward does five matmuls to forward's two.
ATTENTION_BACKWARD_RATIO = 2.5

CONSTANTS = {"HBM_EFFICIENCY": HBM_EFFICIENCY, "COMM_EFFICIENCY": COMM_EFFICIENCY,
             "ELEMENTWISE_PASSES": ELEMENTWISE_PASSES, "BACKWARD_PASSES": BACKWARD_PASSES,
             "LOSS_BYTES_PER_LOGIT": LOSS_BYTES_PER_LOGIT, "OPTIMIZER_BYTES_PER_PARAM": OPTIMIZER_BYTES_PER_PARAM,
             "ATTENTION_BACKWARD_RATIO": ATTENTION_BACKWARD_RATIO, "FSDP_COPY_BYTES": FSDP_COPY_BYTES}


def gemm_seconds(m: float, n: float, k: float, acc: Accelerator, dtype_bytes: int = 2) -> float:
    """One (m x k) @ (k x n) GEMM: compute-bound at MAMF, or memory-bound at HBM (roofline)."""
    flops = 2.0 * m * n * k
    moved = dtype_bytes * (m * k + k * n + m * n)
    return max(flops / acc.matmul_flops, moved / (acc.hbm_bytes_per_s * HBM_EFFICIENCY))


def block_gemms(cfg: ModelConfig, tp: int) -> list[tuple[str, int, int]]:
    """(name, out, in) of one block's matmuls on a tp rank, in the order the forward runs them."""
    h, kv, f = cfg.n_embd, cfg.kv_dim, cfg.ffn_hidden
    out = [("q", h // tp, h), ("k", kv // tp, h), ("v", kv // tp, h), ("o", h, h // tp)]
    ins = ("gate", "up") if cfg.ffn_type == "swiglu" else ("up",)
    return out + [(n, f // tp, h) for n in ins] + [("down", h, f // tp)]


def recompute_plan(layers: int, mode: str, option: str, n_gemms: int) -> tuple[float, set[int], bool]:
    """(share of blocks checkpointed, positions of the matmuls each recomputes, whether it recomputes
    attention) for a checkpointing mode. PyTorch's non-reentrant checkpoint stops recomputing once
    every tensor backward needs is back (set_checkpoint_early_stop, on by default), so a block's last
    matmul (down) never runs again; torchtitan's selective-by-op policy saves attention and the
    1st, 3rd, 5th ... matmul's outputs, so it recomputes the 2nd, 4th, 6th (K, O, up) and every
    non-matmul op. Every checkpointed block recomputes its non-matmul ops."""
    wrapped = layout_cost.wrapped_blocks(layers, mode, option) / max(layers, 1)
    if mode == "selective" and option == "op":
        return wrapped, set(range(1, n_gemms - 1, 2)), False
    return wrapped, set(range(n_gemms - 1)), mode != "none"


@dataclass
class StepTime:
    parts: dict[str, float]  # seconds per step by named part (exposed time)
    step_seconds: float
    tokens_per_step: float  # global
    tokens_per_second_per_device: float
    mfu: float
    hfu: float
    detail: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"parts": self.parts, "step_seconds": self.step_seconds, "tokens_per_step": self.tokens_per_step,
                "tokens_per_second_per_device": self.tokens_per_second_per_device, "mfu": self.mfu,
                "hfu": self.hfu, **self.detail}


def link_bandwidth(acc: Accelerator, group: int, stride: int) -> tuple[float, str]:
    """Bytes/s a ring collective reaches on a group of `group` ranks `stride` apart in rank order.
    Inside one node: NVLink. Across nodes, NCCL runs one ring per NIC, and each ring crosses a node
    boundary once per node, so the k members of the group on one node share their k NICs' bandwidth
    for the inter-node hops: min(NVLink, k × NIC) per GPU (k = 1 when the group has one GPU per node,
    e.g. data parallelism over tp = 8)."""
    if group * stride <= acc.gpus_per_node:
        return acc.nvlink_bytes_per_s * COMM_EFFICIENCY, "NVLink"
    per_node = max(1, min(group, acc.gpus_per_node // stride))
    return min(acc.nvlink_bytes_per_s, per_node * acc.network_bytes_per_s) * COMM_EFFICIENCY, "network"


def step_time(cfg: ModelConfig, acc: Accelerator, layout: Layout, *, micro_batch: int = 1,
              seq_len: int | None = None, accumulation: int = 1, precision: str = "bf16-mixed",
              activation_checkpointing: Any = "none", selective_ac_option: Any = "op",
              reshard_after_forward: bool = True) -> StepTime:
    """Predicted time of one optimizer step on a resolved layout (module docstring)."""
    s = cfg.block_size if seq_len is None else seq_len
    mode, option = layout_cost.checkpointing(activation_checkpointing, selective_ac_option)
    t, p = layout.tp, layout.pp
    m = layout_cost.micro_steps_of(layout, accumulation)
    T = micro_batch * s  # tokens per micro-step on this device
    c = counting.ACTIVATION_BYTES[precision]
    hbm = acc.hbm_bytes_per_s * HBM_EFFICIENCY
    gemms = block_gemms(cfg, t)
    fwd_gemm = [gemm_seconds(T, o, i, acc) for _, o, i in gemms]
    block_fwd = sum(fwd_gemm)
    block_bwd = sum(gemm_seconds(T, i, o, acc) + gemm_seconds(i, o, T, acc) for _, o, i in gemms)
    attn_fwd_flops = 2.0 * micro_batch * s * s * cfg.n_embd / t  # causal: half of 4·b·s²·h
    attn_rate = acc.attention_fraction * acc.peak_bf16_flops
    block_attention = attn_fwd_flops * (1 + ATTENTION_BACKWARD_RATIO) / attn_rate
    e = ELEMENTWISE_PASSES
    sp = layout.sequence_parallel and t > 1
    per_token = c * (e["n_embd"] * cfg.n_embd / (t if sp else 1) + (e["kv_dim"] * cfg.kv_dim + e["ffn"]
                                                                     * cfg.ffn_hidden) / t)
    block_elementwise = T * per_token / hbm
    # lm_head (forward and two backward GEMMs) and the loss's softmax, on the rank with the last stage
    vocab = cfg.vocab_size / t if (layout.loss_parallel or t == 1) else cfg.vocab_size
    head_matmul = gemm_seconds(T, cfg.vocab_size // t, cfg.n_embd, acc) * 3
    head_elementwise = T * LOSS_BYTES_PER_LOGIT * vocab / hbm

    def rank_costs(rank: layout_cost.RankParams) -> dict[str, float]:
        L = rank.layers
        wrapped, recomputed, attention_again = recompute_plan(L, mode, option, len(gemms))
        last = rank.pp_rank == p - 1
        return {
            "matmul": L * (block_fwd + block_bwd) + (head_matmul if last else 0.0),
            "attention": L * block_attention,
            "memory-bound ops": L * block_elementwise * (1 + BACKWARD_PASSES) + (head_elementwise if last else 0.0),
            "recomputation": L * wrapped * (sum(fwd_gemm[j] for j in recomputed)
                                            + attention_again * attn_fwd_flops / attn_rate + block_elementwise),
            "backward": (L * (block_bwd + block_attention * ATTENTION_BACKWARD_RATIO / (1 + ATTENTION_BACKWARD_RATIO)
                              + block_elementwise * BACKWARD_PASSES) + (head_matmul * 2 / 3 if last else 0.0)),
        }

    # the pipeline runs at the pace of its slowest rank (the most layers, or the last stage's lm_head)
    ranks = layout_cost.rank_params(cfg, layout)
    costs = [rank_costs(r) for r in ranks]
    slowest = max(range(len(ranks)), key=lambda i: sum(v for k, v in costs[i].items() if k != "backward"))
    busiest, cost = ranks[slowest], costs[slowest]
    wrapped, recomputed, attention_again = recompute_plan(busiest.layers, mode, option, len(gemms))

    collectives = layout_cost.communication(cfg, layout, micro_batch=micro_batch, seq_len=s, precision=precision,
                                            accumulation=accumulation, activation_checkpointing=mode,
                                            selective_ac_option=option, reshard_after_forward=reshard_after_forward)
    comm_rows = []
    tp_seconds = 0.0
    for col in collectives:
        bw, link = link_bandwidth(acc, col.group, col.stride)
        secs = col.bytes / bw
        comm_rows.append(dict(col.as_dict(), link=link, seconds=secs))
        if col.dimension == "tp":
            tp_seconds += secs / m

    compute_micro = sum(v for k, v in cost.items() if k != "backward")
    backward_micro = cost["backward"]
    micro = compute_micro + tp_seconds
    bubble = layout_cost.bubble_fraction(p, m, layout.pp_stages_per_rank, layout.pp_schedule)
    pipeline_seconds = m * micro / (1 - bubble)

    exposed: dict[str, float] = {}
    for row in comm_rows:
        if row["dimension"] == "tp":
            continue
        secs, calls = row["seconds"], max(row["calls"], 1)
        if row["collective"] == "all-gather":  # per micro-step, behind that micro-step's compute
            per_micro = secs / m
            exposed[row["name"]] = m * max(per_micro - compute_micro, 0.0) + secs / calls
        elif row["dimension"] == "pp":
            exposed[row["name"]] = max(secs - m * compute_micro, 0.0) + secs / calls
        elif row["dimension"] == "fsdp" and p == 1:  # FSDP's reduce-scatter, behind each micro-step's backward
            exposed[row["name"]] = m * max(secs / m - backward_micro, 0.0) + secs / calls
        else:  # other gradient reductions: behind the last micro-step's backward
            exposed[row["name"]] = max(secs - backward_micro, 0.0) + secs / calls
        row["exposed_seconds"] = exposed[row["name"]]

    optimizer = busiest.local * OPTIMIZER_BYTES_PER_PARAM / hbm
    fsdp_copies = sum(row["bytes"] / layout_cost.ring_factor(row["collective"], row["group"])
                      / (c if row["collective"] == "all-gather" else 4) * FSDP_COPY_BYTES[row["collective"]]
                      for row in comm_rows if row["dimension"] == "fsdp") / hbm
    parts = {
        **{k: m * v for k, v in cost.items() if k != "backward"},
        "TP communication": m * tp_seconds,
        "pipeline bubble": pipeline_seconds - m * micro,
        **{f"{k} (exposed)": v for k, v in exposed.items()},
        "FSDP copies": fsdp_copies,
        "optimizer step": optimizer,
    }
    total = sum(parts.values())
    tokens_per_step = float(T * m * layout.dp)
    fpt = counting.training_flops_per_token(cfg, s)
    model_flops = fpt * tokens_per_step
    full = block_gemms(cfg, 1)
    recompute_flops = tokens_per_step * cfg.n_layer * wrapped * (
        sum(2.0 * o * i for j, (_, o, i) in enumerate(full) if j in recomputed)
        + attention_again * 4.0 * s * cfg.n_embd)
    executed = model_flops + recompute_flops
    world = layout.world
    mfu = model_flops / (total * world * acc.peak_bf16_flops)
    hfu = executed / (total * world * acc.peak_bf16_flops)
    detail = {"micro_steps": m, "micro_batch": micro_batch, "seq_len": s, "bubble_fraction": bubble,
              "pp_rank": busiest.pp_rank,
              "activation_checkpointing": mode, "selective_ac_option": option, "gpu_type": acc.name, "num_devices": world,
              "layout": layout_cost.layout_dict(layout), "communication": comm_rows,
              "model_flops_per_step": model_flops, "executed_flops_per_step": executed,
              "constants": CONSTANTS}
    return StepTime(parts=parts, step_seconds=total, tokens_per_step=tokens_per_step,
                    tokens_per_second_per_device=tokens_per_step / total / world, mfu=mfu, hfu=hfu, detail=detail)

