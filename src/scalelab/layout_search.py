"""From flags to a costed layout, and the search for the fastest one that fits. No torch.

`count` and `plan` share these: `resolve_batch` turns a global batch into micro-steps (pipeline
micro-batches or gradient accumulation), `device_memory` is the one memory figure for a layout
(counting.training_memory for DDP / FSDP alone, layout_cost.layout_memory once tp, pp or HSDP
enter), and `search` ranks every feasible (dp_replicate, dp_shard, tp, pp, schedule, micro-batch,
checkpointing) by steptime's predicted step time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from scalelab import counting, layout_cost, steptime
from scalelab.config import DEFAULT_LOSS_CHUNK_TOKENS, ModelConfig
from scalelab.errors import UserError
from scalelab.hardware import Accelerator
from scalelab.layout import Layout

MICRO_BATCHES = (1, 2, 4, 8, 16)
CHECKPOINTING = (("none", "op"), ("selective", "op"), ("full", "op"))
SEARCH_SCHEDULES = (("1F1B", 1), ("Interleaved1F1B", 2))


def is_plain_data_parallel(layout: Layout) -> bool:
    """DDP or FSDP alone (or one process): counting.training_memory models these."""
    return layout.tp == 1 and layout.pp == 1 and (layout.dp_replicate == 1 or layout.dp_shard == 1)


def sharding_of(layout: Layout) -> str:
    if layout.dp_shard > 1:
        return "fsdp"
    return "ddp" if layout.dp_replicate > 1 else "none"


def device_memory(cfg: ModelConfig, layout: Layout, *, micro_batch: int, seq_len: int, precision: str,
                  activation_checkpointing: Any = "none", selective_ac_option: Any = "op", attention: str = "sdpa",
                  loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS, grad_accum_steps: int = 1) -> dict[str, Any]:
    """Memory per device of a resolved layout with `grad_accum_steps` accumulation micro-steps
    (resolve_batch's): the one figure count, plan and the emitted config share."""
    mode, option = layout_cost.checkpointing(activation_checkpointing, selective_ac_option)
    if is_plain_data_parallel(layout):
        out = counting.training_memory(cfg, micro_batch=micro_batch, seq_len=seq_len, num_devices=layout.world,
                                       sharding=sharding_of(layout), precision=precision,
                                       activation_checkpointing=mode, selective_ac_option=option,
                                       attention=attention, loss_chunk_tokens=loss_chunk_tokens,
                                       grad_accum_steps=grad_accum_steps)
        out["model"] = "counting.training_memory"
        return out
    out = layout_cost.layout_memory(cfg, layout, micro_batch=micro_batch, seq_len=seq_len, precision=precision,
                                    activation_checkpointing=mode, selective_ac_option=option, attention=attention,
                                    loss_chunk_tokens=loss_chunk_tokens, grad_accum_steps=grad_accum_steps)
    out["model"] = "layout_cost.layout_memory"
    return out


def resolve_batch(layout: Layout, *, micro_batch: int, seq_len: int,
                  global_batch_tokens: float | None) -> tuple[Layout, int, int]:
    """(layout with its pipeline micro-batches set, gradient-accumulation micro-steps, global batch in
    tokens). Each data-parallel rank runs global / (dp × micro_batch × seq_len) micro-steps: the
    pipeline's micro-batches when pp > 1 (pp_microbatches, if given, must agree), else accumulation.
    Without a global batch: one micro-step, or the layout's micro-batches under pp."""
    per_micro = layout.dp * micro_batch * seq_len
    if global_batch_tokens is None:
        steps = layout.microbatches if layout.pp > 1 else 1
        return layout, 1, steps * per_micro
    steps = global_batch_tokens / per_micro
    if steps < 1 or steps != int(steps):
        raise UserError(f"--global-batch-tokens {global_batch_tokens:,.0f} is not a whole number of micro-batches of "
                        f"dp {layout.dp} × micro-batch {micro_batch} × seq {seq_len} = {per_micro:,} tokens; use a "
                        f"multiple of {per_micro:,}")
    steps = int(steps)
    if layout.pp == 1:
        return layout, steps, int(global_batch_tokens)
    if layout.pp_microbatches and layout.pp_microbatches != steps:
        raise UserError(f"--pp-microbatches {layout.pp_microbatches} disagrees with --global-batch-tokens, which "
                        f"gives {steps} micro-batches of {micro_batch} sequences per data-parallel rank; give one")
    if steps < layout.pp:
        raise UserError(f"--global-batch-tokens gives {steps} micro-batches per data-parallel rank, fewer than the "
                        f"{layout.pp} pipeline stages; raise it or lower --micro-batch or --pp")
    return layout.replace(pp_microbatches=steps), 1, int(global_batch_tokens)


@dataclass
class Candidate:
    layout: Layout
    micro_batch: int
    accumulation: int
    activation_checkpointing: str
    selective_ac_option: str
    memory: dict[str, Any]
    time: steptime.StepTime

    def row(self) -> dict[str, Any]:
        return {"layout": layout_cost.layout_dict(self.layout), "describe": self.layout.describe(),
                "micro_batch": self.micro_batch, "accumulation": self.accumulation,
                "activation_checkpointing": self.activation_checkpointing,
                "selective_ac_option": self.selective_ac_option,
                "memory_bytes": self.memory["total"], "step_seconds": self.time.step_seconds,
                "tokens_per_second_per_device": self.time.tokens_per_second_per_device,
                "mfu": self.time.mfu, "hfu": self.time.hfu}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg: ModelConfig, acc: Accelerator, gpus: int) -> list[Layout]:
    """Every layout worth costing: tp inside a node dividing the heads, FFN and vocabulary; pp a
    divisor with at least one layer per stage; the data dimension as FSDP over all of it, as HSDP
    sharded inside a node, or (tp = pp = 1) as DDP."""
    out = []
    for tp in _divisors(gpus):
        if tp > acc.gpus_per_node or any(x % tp for x in (cfg.n_head, cfg.num_key_value_heads, cfg.ffn_hidden,
                                                          cfg.vocab_size)):
            continue
        for pp in _divisors(gpus // tp):
            dp = gpus // (tp * pp)
            shards = {dp, min(dp, max(1, acc.gpus_per_node // tp))}
            data = [(dp // n, n) for n in sorted(shards) if dp % n == 0]
            if tp == 1 and pp == 1 and dp > 1:
                data.append((dp, 1))
            schedules = SEARCH_SCHEDULES if pp > 1 else (("1F1B", 1),)
            for schedule, v in schedules:
                if pp * v > cfg.n_layer:
                    continue
                for r, n in data:
                    out.append(Layout(dp_replicate=r, dp_shard=n, tp=tp, pp=pp, pp_schedule=schedule,
                                      pp_stages_per_rank=v))
    return out


def resolved_candidates(cfg: ModelConfig, acc: Accelerator, gpus: int, *, seq_len: int, global_batch_tokens: float,
                        layouts: list[Layout] | None = None) -> Iterator[tuple[Layout, int, int]]:
    """(layout with its pipeline micro-batches, micro-batch, accumulation) for every candidate layout
    (`layouts`, in that order, else candidate_layouts') and micro-batch in MICRO_BATCHES that the
    global batch and the model allow, generated lazily."""
    for base in candidate_layouts(cfg, acc, gpus) if layouts is None else layouts:
        for b in MICRO_BATCHES:
            try:
                layout, accumulation, _ = resolve_batch(base, micro_batch=b, seq_len=seq_len,
                                                        global_batch_tokens=global_batch_tokens)
                layout = layout.validate(cfg, gpus)
            except UserError:
                continue
            if layout.pp > 1 and layout.pp_schedule != "1F1B" and layout.microbatches % max(
                    1, layout.microbatches // layout.pp):
                continue  # Interleaved1F1B needs micro-batches a multiple of its rounds
            yield layout, b, accumulation


def search(cfg: ModelConfig, acc: Accelerator, gpus: int, *, seq_len: int, global_batch_tokens: float,
           precision: str = "bf16-mixed", attention: str = "sdpa",
           loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS, top: int = 5,
           checkpointing: tuple[tuple[str, str], ...] = CHECKPOINTING) -> list[Candidate]:
    """The fastest `top` feasible layouts (memory total within the device), fastest first, trying
    the `checkpointing` modes from the least recomputation up."""
    found: list[Candidate] = []
    for layout, b, accumulation in resolved_candidates(cfg, acc, gpus, seq_len=seq_len,
                                                       global_batch_tokens=global_batch_tokens):
        for mode, option in checkpointing:
            memory = device_memory(cfg, layout, micro_batch=b, seq_len=seq_len, precision=precision,
                                   activation_checkpointing=mode, selective_ac_option=option,
                                   attention=attention, loss_chunk_tokens=loss_chunk_tokens,
                                   grad_accum_steps=accumulation)
            if memory["total"] > acc.memory_bytes:
                continue
            t = steptime.step_time(cfg, acc, layout, micro_batch=b, seq_len=seq_len, accumulation=accumulation,
                                   precision=precision, activation_checkpointing=mode,
                                   selective_ac_option=option)
            found.append(Candidate(layout, b, accumulation, mode, option, memory, t))
            break  # the least recomputation that fits is the fastest for this layout and micro-batch
    found.sort(key=lambda c: c.time.step_seconds)
    return found[:top]


def fits_any(cfg: ModelConfig, acc: Accelerator, gpus: int, *, seq_len: int, global_batch_tokens: float,
             precision: str = "bf16-mixed", attention: str = "sdpa",
             loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS,
             checkpointing: tuple[tuple[str, str], ...] = CHECKPOINTING) -> bool:
    """Whether `search` would find any layout that fits, without timing one: the last (most
    recomputing, least memory) of the `checkpointing` modes on every candidate, the most divided
    layouts first, stopping at the first that fits."""
    mode, option = checkpointing[-1]
    most_divided = sorted(candidate_layouts(cfg, acc, gpus), key=lambda lay: -lay.tp * lay.pp * lay.dp_shard)
    candidates = resolved_candidates(cfg, acc, gpus, seq_len=seq_len, global_batch_tokens=global_batch_tokens,
                                     layouts=most_divided)
    return any(device_memory(cfg, layout, micro_batch=b, seq_len=seq_len, precision=precision,
                             activation_checkpointing=mode, selective_ac_option=option, attention=attention,
                             loss_chunk_tokens=loss_chunk_tokens, grad_accum_steps=accumulation)["total"]
               <= acc.memory_bytes for layout, b, accumulation in candidates)
