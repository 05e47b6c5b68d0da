"""What a Layout costs per device: parameters held, memory, pipeline bubble and in-flight
micro-batches, and the bytes each collective moves in one optimizer step. No torch.

Conventions (docs/parallelism.md):
- A step is one optimizer step. Each data-parallel rank (dp = dp_replicate × dp_shard) runs
  `micro_steps` micro-batches of `micro_batch` sequences of `seq_len` tokens: the pipeline's
  micro-batches when pp > 1, gradient-accumulation micro-steps otherwise.
- Parameters are counted per tensor, as the parallelized model holds them: tp shards Q, K, V,
  gate and up by output rows (column-wise), O and down by input columns (row-wise), and the
  vocabulary of the embedding and lm_head (always, when tp > 1); norms, row-wise biases and
  learned position embeddings are replicated over tp. FSDP2 then shards each tensor's dim 0 over
  dp_shard, padding it to a multiple of dp_shard: every rank allocates ceil(dim0 / dp_shard) rows
  (the last ranks' local tensors are shorter, the storage is not).
- Pipeline stages take consecutive layers (stage_layers); the first stage also holds the
  embeddings, the last the final norm and lm_head. Interleaved schedules give rank r the virtual
  stages r, r + pp, r + 2·pp, ...
- Collective volumes are the bytes one device sends (= receives) with NCCL's ring algorithms on a
  group of n: all-gather and reduce-scatter of a buffer of S bytes move (n-1)/n · S, all-reduce
  2(n-1)/n · S (reduce-scatter then all-gather). FSDP2's buffers are its padded shards: S = n ×
  the padded shard, so each rank moves (n-1) padded shards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from scalelab import counting
from scalelab.config import DEFAULT_LOSS_CHUNK_TOKENS, ModelConfig
from scalelab.errors import UserError
from scalelab.layout import Layout

# ---- pipeline schedules -----------------------------------------------------------------------

# Which bubble formula each schedule follows (Narayanan et al. 2021, "Efficient Large-Scale Language
# Model Training on GPU Clusters Using Megatron-LM", SC'21, sec. 2.2: the bubble takes (p-1)/m of the
# ideal time for GPipe and 1F1B, (p-1)/(v·m) with v interleaved stages per rank; Lamy-Poirier 2023,
# "Breadth-First Pipeline Parallelism", the same for looped BFS). Zero-bubble schedules (Qi et al.
# 2024, "Zero Bubble Pipeline Parallelism", ZB-H1) split the weight gradient off the backward to fill
# the bubble, leaving about a third of 1F1B's: modelled as the interleaved bubble / 3.
BUBBLE_DIVISOR = {"1F1B": 1.0, "GPipe": 1.0, "Interleaved1F1B": 1.0, "LoopedBFS": 1.0,
                  "InterleavedZeroBubble": 3.0, "ZBVZeroBubble": 3.0}


def bubble_fraction(pp: int, microbatches: int, stages_per_rank: int = 1, schedule: str = "1F1B") -> float:
    """Share of a step's time the pipeline's ranks idle: (p-1) / (v·m + p-1) (divided further for
    zero-bubble schedules, BUBBLE_DIVISOR). 0 without a pipeline."""
    if pp <= 1:
        return 0.0
    idle = (pp - 1) / BUBBLE_DIVISOR[schedule]
    return idle / (stages_per_rank * microbatches + idle)


def in_flight_chunks(schedule: str, pp: int, microbatches: int, stages_per_rank: int, rank: int) -> int:
    """How many (micro-batch, local stage) forward activations pipeline rank `rank` holds at its peak,
    as torch.distributed.pipelining (torch 2.13, schedules.py) orders the work:
    - GPipe: every forward before any backward: all m.
    - 1F1B (Schedule1F1B._step_microbatches): `warmup_chunks = min(m, num_stages - stage_index)`
      forwards, then one backward before each further forward: min(m, p - rank).
    - Interleaved1F1B / InterleavedZeroBubble (_get_warmup_ops, multiply_factor 2): warmup
      (v-1)·mpr + 2·(p-1-rank) forward chunks, capped at v·m, with mpr = m // max(1, m // p)
      micro-batches per round; the steady state runs one more forward before its first backward.
    - LoopedBFS: all forwards of each local stage before the backwards: v·m.
    - ZBVZeroBubble (ScheduleZBVZeroBubble): 2(p - rank) - 1 forwards before the first backward,
      then the second stage's warm-up: taken as the interleaved count with v = 2.
    """
    if pp <= 1:
        return 1
    m, v = microbatches, stages_per_rank
    if schedule == "GPipe":
        return m
    if schedule == "1F1B":
        return min(m, pp - rank)
    if schedule == "LoopedBFS":
        return v * m
    per_round = m // max(1, m // pp)
    warmup = min((v - 1) * per_round + 2 * (pp - 1 - rank), v * m)
    return min(warmup + 1, v * m)


def stage_layers(n_layer: int, n_stages: int) -> list[int]:
    """Layers per pipeline stage: as even as possible, the first stages taking the remainder."""
    base, extra = divmod(n_layer, n_stages)
    return [base + (1 if i < extra else 0) for i in range(n_stages)]


# ---- parameters -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    """One parameter as the parallelized model holds it on one rank, before FSDP: rows (dim 0)
    and the size of the rest, after tensor parallelism."""
    name: str
    rows: int
    rest: int

    def numel(self, dp_shard: int = 1) -> int:
        """Elements one rank allocates once FSDP2 shards dim 0 over dp_shard (padded)."""
        return math.ceil(self.rows / dp_shard) * self.rest


def block_tensors(cfg: ModelConfig, tp: int) -> list[Tensor]:
    """One transformer block's parameters on a tp rank (row-wise shards split the input columns)."""
    h, kv, f = cfg.n_embd, cfg.kv_dim, cfg.ffn_hidden
    bias, qkv_bias = cfg.bias, cfg.bias or cfg.qkv_bias
    norm = [Tensor("norm.weight", h, 1)] + ([Tensor("norm.bias", h, 1)] if cfg.normalization == "layernorm"
                                            and cfg.bias else [])
    out = [*norm, Tensor("q.weight", h // tp, h), Tensor("k.weight", kv // tp, h), Tensor("v.weight", kv // tp, h),
           Tensor("o.weight", h, h // tp)]
    if qkv_bias:
        out += [Tensor("q.bias", h // tp, 1), Tensor("k.bias", kv // tp, 1), Tensor("v.bias", kv // tp, 1)]
    if bias:
        out.append(Tensor("o.bias", h, 1))
    out += norm
    ins = ("gate", "up") if cfg.ffn_type == "swiglu" else ("up",)
    out += [Tensor(f"{n}.weight", f // tp, h) for n in ins] + [Tensor("down.weight", h, f // tp)]
    if bias:
        out += [Tensor(f"{n}.bias", f // tp, 1) for n in ins] + [Tensor("down.bias", h, 1)]
    return out


def first_stage_tensors(cfg: ModelConfig, tp: int) -> list[Tensor]:
    out = [Tensor("tok_embeddings", cfg.vocab_size // tp, cfg.n_embd)]
    if cfg.position_encoding == "learned":
        out.append(Tensor("pos_embeddings", cfg.block_size, cfg.n_embd))
    return out


def last_stage_tensors(cfg: ModelConfig, tp: int) -> list[Tensor]:
    out = []
    if cfg.norm_position == "pre":
        out.append(Tensor("norm.weight", cfg.n_embd, 1))
        if cfg.normalization == "layernorm" and cfg.bias:
            out.append(Tensor("norm.bias", cfg.n_embd, 1))
    if not cfg.tie_embeddings:
        out.append(Tensor("lm_head", cfg.vocab_size // tp, cfg.n_embd))
    return out


@dataclass
class RankParams:
    """What one pipeline rank holds: its layers, and elements per tp × dp_shard rank."""
    pp_rank: int
    layers: int
    block: int  # one block's elements before FSDP (tp-local)
    blocks: int  # all its blocks, FSDP-sharded (padded)
    root: int  # embeddings / final norm / lm_head on this rank, FSDP-sharded (padded)
    root_unsharded: int  # the same before FSDP
    largest: int  # its largest tensor, FSDP-sharded (AdamW's for-loop temporaries scale with it)
    local: int = field(init=False)

    def __post_init__(self) -> None:
        self.local = self.blocks + self.root


def rank_params(cfg: ModelConfig, layout: Layout) -> list[RankParams]:
    """Parameters held by each pipeline rank (all its virtual stages), per device."""
    p, v = layout.pp, layout.pp_stages_per_rank
    per_stage = stage_layers(cfg.n_layer, p * v)
    block = block_tensors(cfg, layout.tp)
    first, last = first_stage_tensors(cfg, layout.tp), last_stage_tensors(cfg, layout.tp)
    if cfg.tie_embeddings and p > 1:  # the tied lm_head lives on the last stage too
        last = last + [Tensor("lm_head", cfg.vocab_size // layout.tp, cfg.n_embd)]
    n = layout.dp_shard
    out = []
    for r in range(p):
        stages = [r + k * p for k in range(v)]
        layers = sum(per_stage[s] for s in stages)
        root = (first if 0 in stages else []) + (last if p * v - 1 in stages else [])
        out.append(RankParams(pp_rank=r, layers=layers, block=sum(t.numel() for t in block),
                              blocks=layers * sum(t.numel(n) for t in block),
                              root=sum(t.numel(n) for t in root), root_unsharded=sum(t.numel() for t in root),
                              largest=max(t.numel(n) for t in (root + block if layers else root))))
    return out


# ---- memory -----------------------------------------------------------------------------------


def layout_memory(cfg: ModelConfig, layout: Layout, *, micro_batch: int = 1, seq_len: int | None = None,
                  precision: str = "bf16-mixed", activation_checkpointing: Any = "none",
                  selective_ac_option: Any = "op", attention: str = "sdpa",
                  loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS, optimizer_impl: str = "fused",
                  device: str = "cuda", grad_accum_steps: int = 1) -> dict[str, Any]:
    """Memory per device for a resolved layout, on the pipeline rank that needs the most (`pp_rank`),
    in counting.training_memory's terms (docs/memory.md): the same named components
    (counting.MEMORY_COMPONENTS), the same moments of the step (counting.step_phases), the
    allocated `peak` and its `peak_phase`, the `runtime_reserve` (CUDA context and allocator
    fragmentation; none on the CPU) and `total` = peak + reserve, what the device must have. For
    tp = pp = 1 it is training_memory's figure (up to FSDP's padding of uneven rows).

    What a layout changes: weights, gradients and optimizer state are the rank's exact local
    elements (rank_params). Activations: one micro-batch of the rank's layers
    (counting.activation_bytes_per_token), times the chunks its schedule keeps in flight
    (in_flight_chunks), with tensor parallelism dividing what is split over heads or the FFN width
    and, under sequence parallelism, the residual stream and norms too; the inputs of the
    column-wise projections (gathered over the sequence) stay whole. The last stage adds the final
    norm, lm_head's input and the loss (counting.loss_bytes: unchunked where Layout.chunked_loss
    says the trainer forms the logits whole, over vocab / tp with loss_parallel). FSDP's gathered
    root unit and blocks are those of the rank's own stages, tp-local.

    Several micro-batches per step: `grad_accum_steps` accumulation micro-steps when pp = 1 (the
    gradients so far are live in the later ones: counting.accumulated_gradient_bytes; the trainer's
    FSDP2 reduce-scatters every micro-step, so they are sharded); under pp the pipeline's own
    micro-batches (grad_accum_steps must be 1), between which torch.distributed.pipelining turns
    FSDP2's gradient sync off: each local parameter's gradient stays unsharded over dp_shard, in
    fp32, until the last. Not modelled: pipelining also keeps a stage's parameters unsharded from
    one backward to the next forward."""
    s = cfg.block_size if seq_len is None else seq_len
    mode, option = checkpointing(activation_checkpointing, selective_ac_option)
    if optimizer_impl not in counting.OPTIMIZER_IMPLS or device not in counting.DEVICES:
        raise ValueError(f"optimizer_impl must be one of {counting.OPTIMIZER_IMPLS} and device one of "
                         f"{counting.DEVICES}")
    if grad_accum_steps > 1 and layout.pp > 1:
        raise ValueError("under pp the micro-batches are the pipeline's (layout.pp_microbatches): "
                         "grad_accum_steps must be 1")
    wb, gb, ob = counting.PRECISIONS[precision]
    fsdp = layout.uses_fsdp
    autocast = precision == "bf16-mixed" and not fsdp
    residual = 4 if precision == "fp32" or autocast else 2
    c = counting.ACTIVATION_BYTES[precision]
    t = layout.tp
    split = t if layout.sequence_parallel else 1  # what sequence parallelism splits: residual stream, norms
    per_layer, head = counting.activation_bytes_per_token(
        cfg.n_embd, cfg.kv_dim, cfg.ffn_hidden, cfg.n_head, s, ffn_type=cfg.ffn_type,
        normalization=cfg.normalization, residual_bytes=residual,
        compute_bytes=c, autocast=autocast, attention=attention, q_dim=cfg.n_head * cfg.head_dim)
    if t > 1:
        # gathered inputs of the attention and FFN projections stay whole; with sequence parallelism
        # everything else is split, without it the residual stream and norms are replicated too
        whole = 2 * c * cfg.n_embd
        if not layout.sequence_parallel:
            stats = 4 * (2 if cfg.normalization == "layernorm" else 1)
            whole += 2 * (residual * cfg.n_embd + stats)
        per_layer = (per_layer - whole) / t + whole
        if layout.sequence_parallel:  # the final norm runs on its slice; lm_head's gathered input and the ids stay whole
            final_norm = residual * cfg.n_embd + 4 * (2 if cfg.normalization == "layernorm" else 1)
            head = head - final_norm + final_norm / t
    if device == "cpu" and cfg.normalization == "rmsnorm":
        # PyTorch's CPU RMSNorm is a composite that keeps more (as training_memory)
        norm_extra = counting.cpu_rms_norm_extra_bytes(residual) * cfg.n_embd / split
        per_layer += 2 * norm_extra
        head += norm_extra
    tokens = micro_batch * s
    if not layout.chunked_loss:
        loss_chunk_tokens = 0
    vocab = cfg.vocab_size / t if layout.loss_parallel else cfg.vocab_size
    kept = (counting.selective_op_saved_per_token(cfg.n_embd, cfg.kv_dim, cfg.ffn_hidden, cfg.n_head,
                                                  ffn_type=cfg.ffn_type, residual_bytes=residual, compute_bytes=c,
                                                  attention=attention) / t
            if mode == "selective" and option == "op" else residual * cfg.n_embd / split)
    per_stage = stage_layers(cfg.n_layer, layout.pp * layout.pp_stages_per_rank)
    best: dict[str, Any] | None = None
    for rp in rank_params(cfg, layout):
        stages = [rp.pp_rank + k * layout.pp for k in range(layout.pp_stages_per_rank)]
        is_last = stages[-1] == len(per_stage) - 1
        chunks = in_flight_chunks(layout.pp_schedule, layout.pp, layout.microbatches, layout.pp_stages_per_rank,
                                  rp.pp_rank)
        # a chunk is one micro-batch of one local stage: their mean layers and checkpointed blocks
        layers_per_chunk = rp.layers / len(stages)
        wrapped = sum(wrapped_blocks(per_stage[i], mode, option) for i in stages) / len(stages)
        saved = tokens * chunks * ((layers_per_chunk - wrapped) * per_layer + wrapped * kept)
        lm_head = cfg.vocab_size * cfg.n_embd / t if is_last else 0.0  # tp-local, before FSDP
        chunked = bool(loss_chunk_tokens) and is_last
        loss_gradient = lm_head * (c if fsdp else gb) if chunked else 0.0
        c_parts = {
            "weights": rp.local * wb, "gradients": rp.local * gb, "optimizer": rp.local * ob,
            # autocast's bf16 copy of each matmul weight, kept but in checkpointed blocks
            "weight_copies": 2.0 * ((rp.layers - wrapped * len(stages)) * _block_matmul_elements(cfg, t) + lm_head)
            if autocast else 0.0,
            "activations": saved + (tokens * head if is_last else 0.0),
            "loss": (float(counting.loss_bytes(tokens, vocab, c, loss_chunk_tokens))
                     + counting.chunked_loss_weight_transients(lm_head, loss_chunk_tokens, autocast=autocast))
            if is_last else 0.0,
            "loss_gradient": loss_gradient,
            "ddp_buckets": counting.ddp_bucket_bytes(rp.local, gb, ddp=layout.is_ddp),
            # backward meets the stage's last block first; when it is checkpointed it is recomputed whole
            "recompute": tokens * per_layer * float(counting.last_block_wrapped(per_stage[stages[-1]], mode, option)),
            # as training_memory: FSDP2's unsharded lm_head gradient, else the root's gradients,
            # less what the chunked loss formed in forward
            "root_gradients": (lm_head * c if fsdp else rp.root * gb) - loss_gradient,
            "optimizer_step": counting.optimizer_step_bytes(rp.local, rp.largest, 1, optimizer_impl),
        }
        c_parts["fsdp_unsharded"], c_parts["fsdp_unsharded_backward"] = counting.fsdp_unsharded_bytes(
            float(rp.block), float(rp.root_unsharded), c, sharded=fsdp)
        c_parts["fsdp_reduce_scatter"] = counting.fsdp_reduce_scatter_bytes(float(rp.root_unsharded), sharded=fsdp,
                                                                            device=device)
        steady_state = chunks < layout.pp_stages_per_rank * layout.microbatches
        pipelined_fsdp = layout.pp > 1 and fsdp and layout.dp_shard > 1
        if layout.pp == 1:  # the trainer's accumulation micro-steps (sharded under FSDP)
            accumulated = float(counting.accumulated_gradient_bytes(rp.local * gb, grad_accum_steps))
        elif pipelined_fsdp and steady_state:  # pipelining's micro-batches, FSDP2 sync off: unsharded fp32
            accumulated = 4.0 * (rp.layers * rp.block + rp.root_unsharded)
        else:  # a pipeline without FSDP: the steady-state gradients are added to the phases below
            accumulated = 0.0
        c_parts["accumulated_gradients"] = accumulated
        out: dict[str, Any] = {k: float(c_parts[k]) for k in counting.MEMORY_COMPONENTS}
        phases = counting.step_phases(out)
        if layout.pp > 1 and steady_state and not pipelined_fsdp:
            # a pipeline's steady state runs forwards and backwards of other micro-batches while
            # this rank's gradients (the root's among them), formed by its first backward, accumulate
            for k in ("forward_end", "loss_backward"):
                phases[k] += out["gradients"]
            phases["backward"] += out["gradients"] - out["loss_gradient"] - out["root_gradients"]
        out.update({f"phase_{k}": float(v) for k, v in phases.items()})
        out["peak"] = max(phases.values())
        out["peak_phase"] = next(k for k in counting.PHASES if phases[k] == out["peak"])
        out["runtime_reserve"] = float(counting.runtime_reserve_bytes(out["peak"], device))
        out["total"] = out["peak"] + out["runtime_reserve"]
        if best is None or out["total"] > best["total"]:
            best = dict(out, pp_rank=rp.pp_rank, layers=rp.layers, in_flight=chunks, local_params=rp.local)
    assert best is not None
    best.update(micro_batch=micro_batch, seq_len=s, precision=precision, layout=layout_dict(layout),
                num_devices=layout.world, activation_checkpointing=mode, selective_ac_option=option,
                loss_chunk_tokens=loss_chunk_tokens, optimizer_impl=optimizer_impl, device=device,
                grad_accum_steps=grad_accum_steps)
    return best


def _block_matmul_elements(cfg: ModelConfig, tp: int) -> float:
    """One block's matmul weights on a tp rank (autocast keeps a bf16 copy of each), not FSDP-sharded."""
    h, kv, f = cfg.n_embd, cfg.kv_dim, cfg.ffn_hidden
    n_in = 2 if cfg.ffn_type == "swiglu" else 1
    return (2 * h * h + 2 * h * kv + (n_in + 1) * h * f) / tp


def layout_dict(layout: Layout) -> dict[str, Any]:
    return {"dp_replicate": layout.dp_replicate, "dp_shard": layout.dp_shard, "tp": layout.tp, "pp": layout.pp,
            "pp_schedule": layout.pp_schedule, "pp_microbatches": layout.microbatches,
            "pp_stages_per_rank": layout.pp_stages_per_rank, "sequence_parallel": layout.sequence_parallel,
            "loss_parallel": layout.loss_parallel}


# ---- communication ----------------------------------------------------------------------------


def ring_factor(collective: str, n: int) -> float:
    """Bytes one rank sends per byte of the full buffer, ring algorithm on n ranks."""
    if n <= 1:
        return 0.0
    return (2.0 if collective == "all-reduce" else 1.0) * (n - 1) / n


@dataclass
class Collective:
    """One kind of collective in a step: `bytes` is what one device sends over the step (all calls),
    `calls` how many times it runs, `group` the ranks taking part, `stride` the distance between
    them in rank order (the mesh is pp × dp_replicate × dp_shard × tp, tp innermost), which says
    whether the group stays inside a node."""
    name: str
    dimension: str  # fsdp, hsdp, ddp, tp, pp
    collective: str  # all-gather, reduce-scatter, all-reduce, send/recv
    group: int
    stride: int
    calls: int
    bytes: float
    overlaps: str  # what it overlaps with (steptime decides how much hides)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def micro_steps_of(layout: Layout, accumulation: int = 1) -> int:
    return layout.microbatches if layout.pp > 1 else accumulation


def communication(cfg: ModelConfig, layout: Layout, *, micro_batch: int = 1, seq_len: int | None = None,
                  precision: str = "bf16-mixed", accumulation: int = 1,
                  activation_checkpointing: Any = "none", selective_ac_option: Any = "op",
                  reshard_after_forward: bool = True) -> list[Collective]:
    """Every collective of one optimizer step, as bytes one device sends (see the module docstring),
    on pipeline rank 0 (the first stage; other ranks differ only by which root tensors they hold).

    - FSDP over dp_shard (FSDP2, MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) as the
      trainer sets it): each unit (block, root) is all-gathered in the compute dtype before its
      forward on every micro-step, and again before its backward when resharded after forward
      (not the last block nor the root, nor anything under pp, where torchtitan keeps them);
      gradients are reduce-scattered in fp32 on every accumulation micro-step (the trainer keeps
      FSDP2's gradient sync on, so that only sharded gradients accumulate), and once per step under
      pp (torch.distributed.pipelining turns the sync off between its micro-batches).
    - HSDP (dp_replicate × dp_shard): the sharded fp32 gradients are all-reduced over replicas.
    - DDP (replicas only): the fp32 gradients are all-reduced once per step, in buckets.
    - TP, per block and micro-step: forward all-gathers the sequence-sharded input of the attention
      and of the FFN and reduce-scatters their outputs (sequence parallel), or all-reduces the two
      outputs (without): the same bytes; backward the mirror image; a fully recomputed block repeats
      its forward's four, a selective-by-op one its two all-gathers (torchtitan saves the
      reduce-scatters' outputs). The embedding's output and lm_head's input add one pair each way,
      and without loss_parallel the logits are all-gathered over the vocabulary.
    - PP: each micro-step sends the activations [micro_batch, seq, n_embd] (split over tp under
      sequence parallelism) forward and their gradient backward, at each stage boundary of this rank.
    """
    s = cfg.block_size if seq_len is None else seq_len
    mode, option = checkpointing(activation_checkpointing, selective_ac_option)
    wb, _, _ = counting.PRECISIONS[precision]
    c = counting.ACTIVATION_BYTES[precision]
    param_bytes = c if layout.uses_fsdp else wb  # FSDP gathers in the compute dtype
    grad_bytes = 4 if precision != "bf16" else 2
    m = micro_steps_of(layout, accumulation)
    rp = rank_params(cfg, layout)[0]
    unsharded = rp.layers * rp.block + rp.root_unsharded  # tp-local elements of this rank
    t, n, r, p = layout.tp, layout.dp_shard, layout.dp_replicate, layout.pp
    out: list[Collective] = []
    if layout.uses_fsdp and n > 1:
        # FSDP2 all-gathers and reduce-scatters padded shards: (n-1) shards of ceil(rows / n) rows
        block_shard = rp.blocks / max(rp.layers, 1)
        units = rp.layers + (1 if rp.root_unsharded else 0)
        regathered = 0 if (p > 1 or not reshard_after_forward) else max(rp.layers - 1, 0)
        gathered = (rp.local + regathered * block_shard) * m
        out.append(Collective("FSDP all-gather (parameters)", "fsdp", "all-gather", n, t, (units + regathered) * m,
                              (n - 1) * gathered * param_bytes, "forward/backward compute (prefetch one unit ahead)"))
        reductions = 1 if p > 1 else m
        out.append(Collective("FSDP reduce-scatter (gradients)", "fsdp", "reduce-scatter", n, t, units * reductions,
                              (n - 1) * rp.local * grad_bytes * reductions, "backward compute of each micro-step"))
        if r > 1:
            out.append(Collective("HSDP all-reduce over replicas", "hsdp", "all-reduce", r, t * n, units,
                                  ring_factor("all-reduce", r) * rp.local * grad_bytes,
                                  "backward compute of the last micro-step"))
    elif r > 1:
        out.append(Collective("Replica all-reduce (gradients)", "ddp", "all-reduce", r, t * n, 1,
                              ring_factor("all-reduce", r) * unsharded * grad_bytes,
                              "backward compute of the last micro-step (buckets)"))
    if t > 1:
        act = micro_batch * s * cfg.n_embd * c
        again = 2 if mode == "selective" and option == "op" else 4  # recomputed forward collectives
        calls_per_block = 8 + again * wrapped_blocks(rp.layers, mode, option) / max(rp.layers, 1)
        per_block = calls_per_block * ring_factor("all-gather", t) * act
        layers_calls = round(rp.layers * m * calls_per_block)
        out.append(Collective("TP all-gather/reduce-scatter in blocks" if layout.sequence_parallel else
                              "TP all-reduce in blocks", "tp", "all-gather/reduce-scatter"
                              if layout.sequence_parallel else "all-reduce", t, 1, layers_calls,
                              per_block * rp.layers * m, "nothing (on the critical path)"))
        ends = (2 if p == 1 else 1) * 2  # embedding output and lm_head input, forward and backward
        head_bytes = ends * ring_factor("all-gather", t) * act * m
        if not layout.loss_parallel and p == 1:
            head_bytes += ring_factor("all-gather", t) * micro_batch * s * cfg.vocab_size * c * m
        out.append(Collective("TP embedding / lm_head" + ("" if layout.loss_parallel else " (logits gathered)"),
                              "tp", "all-gather/reduce-scatter", t, 1, ends * m, head_bytes,
                              "nothing (on the critical path)"))
    if p > 1:
        act = micro_batch * s * cfg.n_embd * c / (t if layout.sequence_parallel and t > 1 else 1)
        v = layout.pp_stages_per_rank
        sends = (2 * v - 1) * m  # rank 0: every local stage sends forward, all but stage 0 backward
        out.append(Collective("PP send/recv (activations, gradients)", "pp", "send/recv", 2, t * n * r, sends,
                              sends * act, "the other micro-batches' compute (asynchronous P2P)"))
    return out


AC_MODES = ("none", "full", "selective")


def checkpointing(mode: Any, option: Any = "op") -> tuple[str, str]:
    """(mode, selective option) as train.activation_checkpointing / selective_ac_option spell them
    (none / full / selective; "op" or every k-th block): a bool is the old key (true = full)."""
    if isinstance(mode, bool) or mode is None:
        mode = "full" if mode else "none"
    option = str(option)
    if mode not in AC_MODES or (option != "op" and not (option.isdigit() and int(option) >= 1)):
        raise UserError(f"activation checkpointing {mode!r} (option {option!r}) is unknown; use none, full, or "
                        "selective with option op or a whole k >= 1 (every k-th block)")
    return mode, option


def wrapped_blocks(layers: int, mode: str, option: str) -> int:
    """Blocks checkpointed: all under full and selective-by-op, every k-th under selective by layer."""
    if mode == "none":
        return 0
    if mode == "selective" and option != "op":
        return layers // int(option)
    return layers
