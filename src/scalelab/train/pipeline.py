"""Pipeline parallelism with `torch.distributed.pipelining`, as torchtitan does it.

The blocks are split into `pp × pp_stages_per_rank` consecutive stages (`layout.stage_layers`):
the first stage also holds the embeddings, the last the final norm, lm_head and the loss. Each
rank builds the whole model exactly as one process would (same seed, same weights), keeps only
what its stages own, and the modules it keeps have the full model's parameter names
(`layers.7.attn.q_proj.weight` stays that on whatever stage holds block 7), so a DCP checkpoint
written under any pipeline layout loads under any other, or in one process.

Per rank there is one `StageModule` holding everything the rank owns (the optimizer and the
checkpoint see it: `Pipeline.model`) and one view per virtual stage sharing its submodules (the
`PipelineStage`s run those). Virtual stages are assigned round robin ("loop" order: rank r owns
stages r, r + pp, r + 2·pp, ...), which is what the interleaved schedules expect.

One optimizer step runs the schedule once over the rank's whole local batch (micro-batch ×
gradient accumulation sequences), split into the pipeline's micro-batches. The last stage's loss
function is the model's own (chunked or not: `lm_loss`), the mean over a micro-batch's tokens; the
schedule scales gradients by 1 / micro-batches, so the step's gradients and its loss (the mean of
the micro-batch losses) are what one process computes with gradient accumulation. Weight tying
(lm_head = token embedding) is refused (Layout.validate): the two halves live on different stages.
The layout (schedule, stages, micro-batches) is checked by scalelab.layout.Layout.validate before
any process group exists.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from scalelab.layout import stage_layers
from scalelab.model import Transformer, chunked_cross_entropy
from scalelab.train.parallel import as_plain

# schedule name -> (torch class name, more than one stage per rank allowed)
SCHEDULES = {
    "1F1B": ("Schedule1F1B", False),
    "GPipe": ("ScheduleGPipe", False),
    "Interleaved1F1B": ("ScheduleInterleaved1F1B", True),
    "LoopedBFS": ("ScheduleLoopedBFS", True),
    "InterleavedZeroBubble": ("ScheduleInterleavedZeroBubble", True),
}



def rank_stages(pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    """The stage indices rank `pp_rank` of `pp` runs, in loop order (r, r + pp, r + 2·pp, ...), the
    order the interleaved schedules expect."""
    return [pp_rank + k * pp for k in range(stages_per_rank)]


def describe_stages(n_layer: int, n_stages: int) -> str:
    """The blocks of each stage for the log, e.g. '0-2 | 3-4' (an uneven split shows)."""
    return " | ".join(f"{r.start}-{r.stop - 1}" if len(r) > 1 else str(r.start) for r in stage_layers(n_layer, n_stages))


class Blocks(nn.ModuleDict):
    """A stage's blocks keyed by their index in the full model (so `layers.7...` keeps its name),
    iterating over the blocks, in order, as the full model's ModuleList does (so the wrappers in
    scalelab.train.parallel treat a stage as they treat a model)."""

    def __iter__(self):
        return iter(self.values())


class StageModule(nn.Module):
    """The part of a Transformer that some stages own, under the full model's names: the token
    (and position) embeddings when it holds stage 0, the blocks `layers.<i>` it owns, and the final
    norm and lm_head when it holds the last stage. forward(x): token ids (first stage) or hidden
    states -> hidden states; on the last stage the final norm's output when the loss is chunked
    (`lm_loss` then applies lm_head chunk by chunk), else the logits."""

    rope_cos_sin = Transformer.rope_cos_sin

    def __init__(self, source: Transformer | StageModule, layers: list[int] | range, first: bool, last: bool):
        """The parts of `source` (the full model, or a StageModule holding them) named by `layers`,
        `first` and `last`, shared with it, not copied."""
        super().__init__()
        self.config, self.loss_chunk_tokens = source.config, source.loss_chunk_tokens
        self.first, self.last = first, last
        self._rope = source._rope
        self.tok_embeddings = source.tok_embeddings if first else None
        self.pos_embeddings = source.pos_embeddings if first else None
        by_index = isinstance(source.layers, nn.ModuleList)
        self.layers = Blocks({str(i): source.layers[i if by_index else str(i)] for i in layers})
        self.norm = source.norm if last else None
        self.lm_head = source.lm_head if last else None
        # positions per sequence = this many × the hidden states' length (tp under sequence
        # parallelism: each rank holds a slice of the sequence between blocks)
        self.sequence_shards = 1

    def tie_weights(self) -> None:
        """Nothing to tie: a pipeline never ties lm_head to the embedding (Layout.validate)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:  # token ids (B, S)
            S = x.size(1)
            positions = torch.arange(S, device=x.device)
            x = self.tok_embeddings(x)
            if self.pos_embeddings is not None:
                x = x + self.pos_embeddings(positions)
        else:  # hidden states (B, S / sequence_shards, H)
            S = x.size(1) * self.sequence_shards
        rope = None if self._rope is None else self.rope_cos_sin(0, S, x.device, x.dtype)
        for block in self.layers:
            x = block(x, rope)
        if self.last and self.norm is not None:
            x = self.norm(x)
        if self.last and not self.loss_chunk_tokens:
            return self.lm_head(x)  # the logits, scored by lm_loss
        return x


def lm_loss(last: StageModule, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy against targets (-1 ignored) of the last stage's output, exactly as
    Transformer.forward scores it: with `loss_chunk_tokens`, output is the final hidden states and
    the loss forms lm_head's logits chunk by chunk; otherwise output is the logits."""
    if last.loss_chunk_tokens:
        return chunked_cross_entropy(output.reshape(-1, output.size(-1)), last.lm_head.weight, targets.reshape(-1),
                                     last.loss_chunk_tokens)
    return F.cross_entropy(output.float().view(-1, output.size(-1)), targets.reshape(-1), ignore_index=-1)


class Pipeline:
    """This rank's stages of the model and the schedule that runs them.

    `model`: the StageModule of everything this rank owns (optimizer, checkpoints, gradient
    clipping). `step(x, y)`: one forward+backward over the local batch, returns the sum of the
    micro-batch losses on a rank holding the last stage, else None. `eval_losses(x, y)`: the
    micro-batch losses, forward only (last stage), else None."""

    def __init__(self, full: Transformer, *, pp_rank: int, pp: int, stages_per_rank: int, schedule: str,
                 n_microbatches: int, group: dist.ProcessGroup, device: torch.device, wrap_stage=None):
        import torch.distributed.pipelining as pipelining

        n_stages = pp * stages_per_rank
        layers = stage_layers(full.config.n_layer, n_stages)
        self.stage_ids = rank_stages(pp_rank, pp, stages_per_rank)
        self.holds_last = n_stages - 1 in self.stage_ids
        owned = [i for s in self.stage_ids for i in layers[s]]
        self.model = StageModule(full, owned, 0 in self.stage_ids, self.holds_last).to(device)
        self.views = [StageModule(self.model, layers[s], s == 0, s == n_stages - 1) for s in self.stage_ids]
        if wrap_stage is not None:  # TP / FSDP per stage module, after the split (torchtitan's order)
            self.views = [wrap_stage(v) for v in self.views]
        self.stages = [pipelining.PipelineStage(v, s, n_stages, device, group=group)
                       for v, s in zip(self.views, self.stage_ids)]
        last_view = self.views[-1]
        cls = getattr(pipelining, SCHEDULES[schedule][0])
        stages = self.stages if SCHEDULES[schedule][1] else self.stages[0]
        self.n_microbatches = n_microbatches
        self.schedule = cls(stages, n_microbatches=n_microbatches,
                            loss_fn=lambda out, tgt: lm_loss(last_view, out, tgt), scale_grads=True)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        losses: list[torch.Tensor] = []
        self.schedule.step(x, target=y, losses=losses, return_outputs=False)
        return torch.stack([as_plain(l.detach()) for l in losses]).sum() if self.holds_last else None

    @torch.no_grad()
    def eval_losses(self, x: torch.Tensor, y: torch.Tensor) -> list[float] | None:
        losses: list[torch.Tensor] = []
        self.schedule.eval(x, target=y, losses=losses, return_outputs=False)
        return [float(as_plain(l)) for l in losses] if self.holds_last else None


def build_pipeline(cfg, dims, initial: dict[str, torch.Tensor] | None = None) -> Pipeline:
    """This rank's Pipeline for TrainConfig `cfg` under ParallelDims `dims` (a layout with pp > 1):
    the full model exactly as one process draws it (seed train.seed, or `initial`), split into
    stages, then each stage module wrapped by dims.parallelize (TP, activation checkpointing,
    compile, FSDP2 / HSDP on the data dimensions: torchtitan's order, after the split)."""
    t, lay = cfg.train, dims.layout
    torch.manual_seed(t.seed)
    full = Transformer(cfg.model, attention=t.attention, loss_chunk_tokens=t.loss_chunk_tokens)
    if initial is not None:
        full.load_state_dict(initial)

    def wrap(view: StageModule) -> StageModule:
        if lay.tp > 1 and lay.sequence_parallel:
            view.sequence_shards = lay.tp  # hidden states between stages hold S / tp positions
        if not lay.chunked_loss:
            # The chunked loss reads lm_head's weight outside the stage's forward, where FSDP holds
            # only its shard, and its backward runs once (a zero-bubble schedule runs backward
            # twice, for the inputs, then for the weights): the last stage forms the logits in its
            # forward instead (as TP does).
            view.loss_chunk_tokens = 0
        return dims.parallelize(view, dtype=t.dtype, compile=t.compile,
                                activation_checkpointing=t.activation_checkpointing,
                                selective_ac_option=t.selective_ac_option,
                                reshard_after_forward=cfg.parallel.reshard_after_forward)

    pp_mesh = dims.submesh("pp")
    return Pipeline(full, pp_rank=pp_mesh.get_local_rank(), pp=lay.pp, stages_per_rank=lay.pp_stages_per_rank,
                    schedule=lay.pp_schedule, n_microbatches=lay.microbatches, group=pp_mesh.get_group(),
                    device=dims.d.device, wrap_stage=wrap)
