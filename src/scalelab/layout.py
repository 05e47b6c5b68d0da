"""How a training run is laid out over WORLD_SIZE processes: one description shared by the trainer
(scalelab.train.parallel.ParallelDims builds the DeviceMesh from it) and by counting (memory per
device, communication, pipeline bubble), so that what is counted is what is trained. No torch here.

The mesh is pp × dp_replicate × dp_shard × tp (outermost first, as torchtitan orders it):

- dp_replicate: full replicas (DDP when it is the only dimension; HSDP's replica dimension
  when dp_shard > 1 too).
- dp_shard: FSDP2 shards parameters, gradients and optimizer state over it. -1 = the rest of
  WORLD_SIZE once the other dimensions are taken.
- tp: tensor parallelism (DTensor): column-wise Q/K/V/gate/up, row-wise O/down; with
  sequence_parallel the norms and residual stream are split over the sequence between blocks.
- pp: pipeline stages (torch.distributed.pipelining), pp_stages_per_rank virtual stages per rank,
  pp_microbatches micro-batches per local batch, schedule pp_schedule.

The data loader shards by data-parallel rank only (dp = dp_replicate × dp_shard ranks see
different data; TP and PP peers see the same batch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from scalelab.errors import UserError

# torch.distributed.pipelining schedule names (torch 2.13), as get_schedule_class spells them.
PP_SCHEDULES = ("1F1B", "Interleaved1F1B", "GPipe", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble")
# The schedules the trainer runs (scalelab.train.pipeline); count and plan cost them all.
# ZBVZeroBubble is left out: its forward-only pass (the trainer's evaluation) fails in torch 2.13
# ("can't steal_bwd_input if this stage doesn't have backward").
TRAINED_PP_SCHEDULES = ("1F1B", "Interleaved1F1B", "GPipe", "LoopedBFS", "InterleavedZeroBubble")
# Schedules that run one stage per rank; the others run pp_stages_per_rank > 1 virtual stages.
SINGLE_STAGE_SCHEDULES = ("1F1B", "GPipe")
# ZBVZeroBubble places exactly two stages per rank in a V.
V_SCHEDULES = ("ZBVZeroBubble",)
# Schedules that split each backward into the inputs' gradients, then the weights' (zero bubble)
SPLIT_BACKWARD_SCHEDULES = ("InterleavedZeroBubble",)

MESH_KEYS = ("pp", "dp_replicate", "dp_shard", "tp")  # the mesh dimensions, outermost first
LAYOUT_KEYS = ("dp_replicate", "dp_shard", "tp", "pp", "pp_schedule", "pp_microbatches", "pp_stages_per_rank",
               "sequence_parallel", "loss_parallel")


@dataclass(frozen=True)
class Layout:
    dp_replicate: int = 1
    dp_shard: int = -1            # -1: the rest of WORLD_SIZE
    tp: int = 1
    pp: int = 1
    pp_schedule: str = "1F1B"
    pp_microbatches: int = 0      # 0: pp × pp_stages_per_rank
    pp_stages_per_rank: int = 1
    sequence_parallel: bool = True  # meaningful when tp > 1
    loss_parallel: bool = False

    # ---- derived ----------------------------------------------------------------------------
    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that see different data (needs a resolved dp_shard)."""
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        """Processes the layout uses (needs a resolved dp_shard)."""
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    @property
    def microbatches(self) -> int:
        """pp_microbatches with 0 resolved to pp × pp_stages_per_rank."""
        return self.pp_microbatches or self.pp * self.pp_stages_per_rank

    @property
    def stages(self) -> int:
        """Pipeline stages in all (pp × pp_stages_per_rank)."""
        return self.pp * self.pp_stages_per_rank

    def replace(self, **changes: Any) -> "Layout":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """A short name for logs: e.g. 'dp_shard 2 × tp 2' or 'none' for one process."""
        parts = [f"{name} {getattr(self, name)}" for name in ("pp", "dp_replicate", "dp_shard", "tp")
                 if getattr(self, name) != 1]
        return " × ".join(parts) or "none"

    # ---- checks -----------------------------------------------------------------------------
    def resolved(self, world_size: int) -> "Layout":
        """dp_shard = -1 filled in as the rest of world_size; UserError if the degrees do not
        multiply to world_size."""
        for name in ("dp_replicate", "tp", "pp", "pp_stages_per_rank"):
            if getattr(self, name) < 1:
                raise UserError(f"parallel.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise UserError(f"parallel.dp_shard must be ≥ 1 or -1 (the rest), got {self.dp_shard}")
        if self.pp_microbatches < 0:
            raise UserError(f"parallel.pp_microbatches must be ≥ 0 (0 = pp × pp_stages_per_rank), "
                            f"got {self.pp_microbatches}")
        others = self.dp_replicate * self.tp * self.pp
        if self.dp_shard == -1:
            if world_size % others:
                raise UserError(f"WORLD_SIZE {world_size} is not divisible by dp_replicate × tp × pp = "
                                f"{self.dp_replicate} × {self.tp} × {self.pp} = {others}; launch a multiple of "
                                f"{others} processes or change parallel.dp_replicate/tp/pp")
            return self.replace(dp_shard=world_size // others)
        if others * self.dp_shard != world_size:
            raise UserError(f"dp_replicate × dp_shard × tp × pp = {self.dp_replicate} × {self.dp_shard} × {self.tp} "
                            f"× {self.pp} = {others * self.dp_shard} but WORLD_SIZE is {world_size}; launch "
                            f"{others * self.dp_shard} processes or set parallel.dp_shard = -1 (the rest)")
        return self

    def validate(self, model_cfg: Any, world_size: int) -> "Layout":
        """UserError (one line naming the fix) unless this layout can run `model_cfg` (a
        scalelab.config.ModelConfig) on world_size processes. Returns the resolved layout."""
        lay = self.resolved(world_size)
        m = model_cfg
        if lay.pp_schedule not in PP_SCHEDULES:
            close = next((s for s in PP_SCHEDULES if s.lower() == str(lay.pp_schedule).lower()), None)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise UserError(f"parallel.pp_schedule {lay.pp_schedule!r} is unknown{hint}; choose one of "
                            f"{', '.join(PP_SCHEDULES)}")
        if lay.tp > 1:
            if m.n_head % lay.tp:
                raise UserError(f"parallel.tp = {lay.tp} does not divide the model's {m.n_head} attention heads "
                                f"(model.n_head); use a tp that divides {m.n_head}")
            if m.num_key_value_heads % lay.tp:
                raise UserError(f"parallel.tp = {lay.tp} does not divide the model's {m.num_key_value_heads} "
                                f"key/value heads (model.num_key_value_heads); use a tp that divides "
                                f"{m.num_key_value_heads}")
            if m.ffn_hidden % lay.tp:
                raise UserError(f"parallel.tp = {lay.tp} does not divide the FFN width {m.ffn_hidden} "
                                f"(model.d_ff); use a tp that divides it")
            if m.vocab_size % lay.tp:
                padded = -(-m.vocab_size // (64 * lay.tp)) * 64 * lay.tp
                raise UserError(f"parallel.tp = {lay.tp} shards the vocabulary but model.vocab_size "
                                f"{m.vocab_size} is not a multiple of {lay.tp}; pad it (e.g. "
                                f"model.vocab_size = {padded}) or use a tp that divides it")
        elif lay.loss_parallel:
            raise UserError("parallel.loss_parallel needs parallel.tp > 1 (it shards the vocabulary over tp); "
                            "set loss_parallel = false")
        if lay.dp_replicate > 1 and lay.dp_shard == 1 and (lay.tp > 1 or lay.pp > 1):
            raise UserError(f"parallel.dp_replicate = {lay.dp_replicate} with tp or pp needs dp_shard > 1 (HSDP: "
                            f"replicas of FSDP shards; DDP does not compose with tp/pp); set parallel.dp_shard = "
                            f"{lay.dp_replicate} and dp_replicate = 1 (FSDP), or both > 1")
        if lay.pp == 1 and (lay.pp_stages_per_rank != 1 or lay.pp_microbatches or lay.pp_schedule != "1F1B"):
            raise UserError("parallel.pp_schedule/pp_microbatches/pp_stages_per_rank apply to pipeline "
                            "parallelism; set parallel.pp > 1 or leave them at their defaults")
        if lay.pp > 1:
            if lay.pp_schedule in SINGLE_STAGE_SCHEDULES and lay.pp_stages_per_rank != 1:
                raise UserError(f"parallel.pp_schedule = {lay.pp_schedule} runs one stage per rank but "
                                f"pp_stages_per_rank = {lay.pp_stages_per_rank}; set pp_stages_per_rank = 1 or "
                                f"use Interleaved1F1B")
            if lay.pp_schedule not in SINGLE_STAGE_SCHEDULES and lay.pp_stages_per_rank < 2:
                raise UserError(f"parallel.pp_schedule = {lay.pp_schedule} runs several stages per rank; set "
                                f"parallel.pp_stages_per_rank = 2 (or more), or use 1F1B")
            if lay.pp_schedule in V_SCHEDULES and lay.pp_stages_per_rank != 2:
                raise UserError(f"parallel.pp_schedule = {lay.pp_schedule} places exactly 2 stages per rank; "
                                f"set parallel.pp_stages_per_rank = 2")
            if lay.stages > m.n_layer:
                raise UserError(f"pp × pp_stages_per_rank = {lay.pp} × {lay.pp_stages_per_rank} = {lay.stages} "
                                f"pipeline stages but the model has only {m.n_layer} layers; lower parallel.pp "
                                f"or parallel.pp_stages_per_rank (each stage needs at least one layer)")
            if getattr(m, "tie_embeddings", False):
                raise UserError("parallel.pp > 1 cannot tie embeddings (the token embedding lives on the first "
                                "pipeline stage, lm_head on the last); set model.tie_embeddings = false or "
                                "parallel.pp = 1")
            if lay.pp_microbatches and lay.pp_microbatches < lay.pp:
                raise UserError(f"parallel.pp_microbatches = {lay.pp_microbatches} leaves pipeline stages idle; "
                                f"use at least pp = {lay.pp} micro-batches (or 0 for the default)")
        return lay

    # ---- the old [parallel] strategy ---------------------------------------------------------
    @staticmethod
    def from_strategy(strategy: str, world_size: int) -> "Layout":
        """The degenerate layouts of `[parallel] strategy`: ddp (and auto under torchrun) =
        dp_replicate = world; fsdp = dp_shard = world; none (and auto in one process) = all ones."""
        if strategy == "auto":
            strategy = "ddp" if world_size > 1 else "none"
        if strategy == "ddp":
            return Layout(dp_replicate=world_size, dp_shard=1)
        if strategy == "fsdp":
            if world_size == 1:
                raise UserError("parallel.strategy = fsdp shards over processes: launch with torchrun "
                                "(torchrun --nproc_per_node=N -m scalelab train ...), or use parallel.strategy = "
                                "none (or auto) in one process")
            return Layout(dp_shard=world_size)
        if strategy == "none":
            if world_size > 1:
                raise UserError(f"parallel.strategy = none trains one process but WORLD_SIZE is {world_size}; "
                                f"use strategy = ddp or fsdp (or a layout: parallel.tp, parallel.dp_shard, ...)")
            return Layout(dp_shard=1)
        raise UserError(f"parallel.strategy must be one of auto, none, ddp, fsdp; got {strategy!r}")

    # ---- what each dimension means for wrappers (no torch) -------------------------------------
    @property
    def is_ddp(self) -> bool:
        """Only replicas: the whole model on every rank, gradients all-reduced (DDP)."""
        return self.dp_replicate > 1 and self.dp_shard == 1 and self.tp == 1 and self.pp == 1

    @property
    def uses_fsdp(self) -> bool:
        """fully_shard applies: over dp_shard, or over dp_replicate × dp_shard (HSDP)."""
        return self.dp_shard > 1

    @property
    def chunked_loss(self) -> bool:
        """Whether the model's chunked loss (train.loss_chunk_tokens) runs: not under tp (the
        vocabulary is sharded instead), nor on a pipeline's last stage under FSDP (lm_head's weight is
        whole only inside the stage's forward) or a zero-bubble schedule (its split backward runs
        through the loss twice): there the logits are formed whole."""
        return self.tp == 1 and not (self.pp > 1 and (self.uses_fsdp or self.pp_schedule in SPLIT_BACKWARD_SCHEDULES))


def stage_layers(n_layer: int, n_stages: int) -> list[range]:
    """The blocks of each of `n_stages` consecutive pipeline stages (stage 0 also holds the
    embeddings, the last stage the final norm, lm_head and the loss): n_layer // n_stages blocks
    each, the first n_layer % n_stages stages one more, so an uneven split leaves the last stage,
    which also scores the vocabulary, the lighter side."""
    if not 1 <= n_stages <= n_layer:
        raise UserError(f"{n_stages} pipeline stages cannot split {n_layer} layers (each stage needs one); "
                        f"lower parallel.pp or parallel.pp_stages_per_rank")
    base, extra = divmod(n_layer, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out
