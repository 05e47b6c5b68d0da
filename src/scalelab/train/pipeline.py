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
(lm_head = token embedding) is refused: the two halves live on different stages.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from scalelab.config import ModelConfig
from scalelab.errors import UserError
from scalelab.model import Transformer, chunked_cross_entropy

# schedule name -> (torch class name, more than one stage per rank allowed)
SCHEDULES = {
    "1F1B": ("Schedule1F1B", False),
    "GPipe": ("ScheduleGPipe", False),
    "Interleaved1F1B": ("ScheduleInterleaved1F1B", True),
    "LoopedBFS": ("ScheduleLoopedBFS", True),
    "InterleavedZeroBubble": ("ScheduleInterleavedZeroBubble", True),
}


def stage_layers(n_layer: int, n_stages: int) -> list[range]:
    """The blocks of each of `n_stages` consecutive stages: n_layer // n_stages each, the first
    n_layer % n_stages stages one more (the last stage also carries lm_head and the loss, so an
    uneven split leaves it the lighter side)."""
    base, extra = divmod(n_layer, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def rank_stages(pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    """The stage indices rank `pp_rank` of `pp` runs, in loop order."""
    return [pp_rank + k * pp for k in range(stages_per_rank)]


class StageModule(nn.Module):
    """The part of a Transformer that some stages own, under the full model's names: the token
    (and position) embeddings when it holds stage 0, the blocks `layers.<i>` it owns, and the final
    norm and lm_head when it holds the last stage. forward(x): token ids (first stage) or hidden
    states -> hidden states (after the final norm on the last stage; the loss function applies
    lm_head, see `lm_loss`)."""

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
        self.layers = nn.ModuleDict({str(i): source.layers[i if by_index else str(i)] for i in layers})
        self.norm = source.norm if last else None
        self.lm_head = source.lm_head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            S = x.size(1)
            positions = torch.arange(S, device=x.device)
            x = self.tok_embeddings(x)
            if self.pos_embeddings is not None:
                x = x + self.pos_embeddings(positions)
        rope = None if self._rope is None else self.rope_cos_sin(0, x.size(1), x.device, x.dtype)
        for block in self.layers.values():
            x = block(x, rope)
        if self.last and self.norm is not None:
            x = self.norm(x)
        return x


def lm_loss(last: StageModule, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of lm_head(hidden) against targets (-1 ignored), exactly as
    Transformer.forward scores it: chunked (`loss_chunk_tokens`) or from the full logits."""
    if last.loss_chunk_tokens:
        return chunked_cross_entropy(hidden.reshape(-1, hidden.size(-1)), last.lm_head.weight, targets.reshape(-1),
                                     last.loss_chunk_tokens)
    logits = last.lm_head(hidden)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def check_pipeline(cfg: ModelConfig, pp: int, stages_per_rank: int, schedule: str) -> None:
    """UserError for a pipeline this model cannot run (torch-free checks live in layout)."""
    if schedule not in SCHEDULES:
        raise UserError(f"parallel.pp_schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if stages_per_rank > 1 and not SCHEDULES[schedule][1]:
        multi = [name for name, (_, m) in SCHEDULES.items() if m]
        raise UserError(f"parallel.pp_schedule {schedule} runs one stage per rank but pp_stages_per_rank is "
                        f"{stages_per_rank}; set pp_stages_per_rank = 1 or use {' or '.join(multi)}")
    n_stages = pp * stages_per_rank
    if n_stages > cfg.n_layer:
        raise UserError(f"pp {pp} × pp_stages_per_rank {stages_per_rank} = {n_stages} pipeline stages but the model "
                        f"has {cfg.n_layer} layers; every stage needs a block: lower parallel.pp or "
                        "pp_stages_per_rank")
    if cfg.tie_embeddings:
        raise UserError("pipeline parallelism cannot tie embeddings (the token embedding is on the first stage, "
                        "lm_head on the last); set model.tie_embeddings = false or parallel.pp = 1")


class Pipeline:
    """This rank's stages of the model and the schedule that runs them.

    `model`: the StageModule of everything this rank owns (optimizer, checkpoints, gradient
    clipping). `step(x, y)`: one forward+backward over the local batch, returns the sum of the
    micro-batch losses on a rank holding the last stage, else None. `eval_losses(x, y)`: the
    micro-batch losses, forward only (last stage), else None."""

    def __init__(self, full: Transformer, *, pp_rank: int, pp: int, stages_per_rank: int, schedule: str,
                 n_microbatches: int, group: dist.ProcessGroup, device: torch.device,
                 wrap_stage=None):
        import torch.distributed.pipelining as pipelining

        check_pipeline(full.config, pp, stages_per_rank, schedule)
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
        return torch.stack([l.detach() for l in losses]).sum() if self.holds_last else None

    @torch.no_grad()
    def eval_losses(self, x: torch.Tensor, y: torch.Tensor) -> list[float] | None:
        losses: list[torch.Tensor] = []
        self.schedule.eval(x, target=y, losses=losses, return_outputs=False)
        return [float(l) for l in losses] if self.holds_last else None


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Clip the gradients of the whole model, whose parameters are spread over the pipeline's
    ranks (and may be DTensor shards): the global 2-norm is the square root of the sum over
    pipeline ranks of each rank's squared norm. Returns that norm (the same on every rank)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    if pp_group is not None:
        squared = norm.double() ** 2
        dist.all_reduce(squared, group=pp_group)
        norm = squared.sqrt().to(norm.dtype)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
