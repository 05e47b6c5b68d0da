"""Run metrics: RUN_DIR/metrics.jsonl (one JSON object per logged step or eval), the console
line on stderr, and optional TensorBoard / Weights & Biases mirrors.

Records (units in the names):
  {"kind": "train", "step", "tokens", "flops", "loss", "lr", "grad_norm", "tokens_per_second",
   "tflops_per_second" (per device, model FLOPs), "mfu" (fraction, null when the peak is unknown),
   "hfu" (hardware FLOPs utilisation: what was executed, activation checkpointing's recomputation
   included, counting.executed_training_flops; equals mfu without checkpointing),
   "peak_memory_bytes", "elapsed_seconds"}
  {"kind": "eval", "step", "tokens", "flops", "val_loss", "val_bpb" (null when the tokenizer
   cannot measure bytes)}
`step` counts completed optimizer steps; `tokens` and `flops` are totals seen so far (flops by
scalelab.counting.training_flops, the exact matmul convention).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from scalelab.files import atomic_write_text
from scalelab.units import format_count, format_duration

METRICS = "metrics.jsonl"


def allocator_peak_bytes(step: Callable[[], Any]) -> tuple[int, Any]:
    """(the allocator's peak during step() above its level before it, step()'s result), measured by
    the PyTorch profiler (`profile_memory=True`): every allocation and free it records, summed in
    time order. Works on CPU, where `torch.cuda.max_memory_allocated` has no counterpart."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, result


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of RUN_DIR/metrics.jsonl (a torn last line from a crash is skipped)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLog:
    """Appends records to RUN_DIR/metrics.jsonl; mirrors scalars to TensorBoard / W&B if asked."""

    def __init__(self, run_dir: str | os.PathLike, *, keep_until_step: int | None, tensorboard: bool = False,
                 wandb_project: str = "", config: dict | None = None, warn=None):
        self.path = Path(run_dir) / METRICS
        warn = warn or (lambda msg: print(msg, file=sys.stderr))
        # Fresh run: start an empty file. Resumed run: drop what was logged after the checkpoint
        # (those steps are about to be recomputed), so every step appears exactly once.
        kept = [r for r in read_metrics(run_dir) if keep_until_step is not None and r.get("step", 0) <= keep_until_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")
        self._tb = self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                warn("scalelab train: warning: logging.tensorboard is set but tensorboard is not installed (pip install tensorboard); skipping")
        if wandb_project:
            try:
                import wandb

                self._wandb = wandb.init(project=wandb_project, config=config, dir=str(run_dir),
                                         name=Path(run_dir).name, resume="allow")
            except ImportError:
                warn("scalelab train: warning: logging.wandb_project is set but wandb is not installed (pip install wandb); skipping")

    def write(self, record: dict[str, Any]) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        scalars = {f"{record['kind']}/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "kind")}
        if self._tb is not None:
            for k, v in scalars.items():
                if v is not None:
                    self._tb.add_scalar(k, v, record["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def eta_seconds(training_seconds: float, steps_timed: int, steps_left: int) -> float:
    """Time to the end: the steps left at the mean step time of this process so far (its training
    time only: eval and checkpoint pauses excluded by the caller). A mean over the whole process,
    not the last logging window, so one slow window (a busy shared machine, the first steps'
    warm-up) moves it by its share of the run rather than by its own rate."""
    if steps_timed <= 0:
        return float("nan")
    return training_seconds / steps_timed * steps_left


def recorded_figures(records: list[dict[str, Any]], up_to_step: int) -> dict[str, float]:
    """The last train loss and eval figures that metrics.jsonl records at or before `up_to_step`
    (keys present only when recorded)."""
    out: dict[str, float] = {}
    for r in records:
        if r.get("step", 0) > up_to_step:
            continue
        if r.get("kind") == "train" and r.get("loss") is not None:
            out["loss"] = r["loss"]
        elif r.get("kind") == "eval" and r.get("val_loss") is not None:
            out["val_loss"] = r["val_loss"]
            if r.get("val_bpb") is not None:
                out["val_bpb"] = r["val_bpb"]
    return out


def console_line(r: dict[str, Any], total_steps: int, eta_seconds: float, memory_label: str) -> str:
    mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
    parts: Iterable[str] = (
        f"step {r['step']}/{total_steps}",
        f"loss {r['loss']:.4f}",
        f"lr {r['lr']:.2e}",
        f"grad {r['grad_norm']:.3f}",
        f"{format_count(r['tokens_per_second'])} tok/s",
        f"{r['tflops_per_second']:.3g} TFLOP/s/dev",
        f"mfu {mfu}" + (f" (hfu {100 * r['hfu']:.1f}%)" if r.get("hfu") is not None and r["hfu"] != r["mfu"] else ""),
        f"{memory_label} {r['peak_memory_bytes'] / 2**30:.2f} GiB",
        f"eta {format_duration(eta_seconds)}",
    )
    return " | ".join(parts)
