"""The training loop: one process, or many under torchrun (any Layout: DDP, FSDP2 / HSDP, TP).

    train(cfg, run_dir) -> summary dict

Per optimizer step: set the learning rate (a pure function of the step), run
`grad_accum_steps` micro-batches (ParallelDims.grad_sync says when gradients are reduced), clip the global gradient
norm, check that loss and gradient norm are finite, step AdamW. Every `logging.every` steps a
console line (stderr) and a metrics.jsonl record; every `eval.every` steps the held-out loss;
every `checkpoint.every` steps, at the end, and on SIGTERM/SIGINT an atomic checkpoint.

Exact resume: the data order is a pure function of (seed, step) (TokenLoader), the schedule a
pure function of the step, and the checkpoint holds model, optimizer, grad scaler, RNG states,
step, tokens and FLOPs. Restarting from step k therefore recomputes steps k+1.. bit for bit
(fp32, deterministic kernels).

Non-finite loss or gradient norm: the run stops before the optimizer step with a
`TrainingDiverged` error naming the step and the last good checkpoint (left intact; nothing is
written after the bad step). We chose stopping over skipping: a NaN almost always means a
learning rate or precision problem that skipping hides. fp16 is the exception for gradients:
there an overflowing gradient is normal and GradScaler skips that step and lowers its scale.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import gc
import json
import math
import os
import resource
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from scalelab.counting import MEMORY_COMPONENTS, count_params, executed_training_flops, training_flops, training_memory
from scalelab.errors import UserError, describe_os_error
from scalelab.files import atomic_directory, atomic_write_text
from scalelab.units import format_bytes
from scalelab.train import checkpoint as ckpt
from scalelab.train import init_from
from scalelab.layout import Layout
from scalelab.train.config import (TrainConfig, grad_accum_steps, layout_of, resume_differences, schedule_problem,
                                   schedule_settings, sequences_per_step, total_steps)
from scalelab.train.metrics import MetricsLog, console_line, eta_seconds, read_metrics, recorded_figures
from scalelab.train.parallel import (Dist, ParallelDims, agree, all_reduce_sum, as_plain, decide_on_main,
                                     destroy_distributed, init_distributed, unwrap)
from scalelab.train.schedule import learning_rate

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TrainingDiverged(RuntimeError):
    """Loss or gradient norm became NaN/inf; the message names the step and the last checkpoint."""


def default_run_dir(cfg: TrainConfig, config_path: str | os.PathLike | None) -> Path:
    if cfg.logging.run_dir:
        return Path(cfg.logging.run_dir)
    return Path("runs") / (Path(config_path).stem if config_path else "run")


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on matrices (dim ≥ 2) only; fused kernels on CUDA."""
    t = cfg.train
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs: dict[str, Any] = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps, **kwargs)


def peak_flops_per_device(cfg: TrainConfig, device: torch.device) -> float | None:
    """Dense bf16 peak for MFU: logging.peak_tflops, else the hardware table's entry for the GPU."""
    if cfg.logging.peak_tflops > 0:
        return cfg.logging.peak_tflops * 1e12
    if device.type == "cuda":
        from scalelab.hardware import detect_accelerator

        acc = detect_accelerator(torch.cuda.get_device_name(device))
        return acc.peak_bf16_flops if acc else None
    return None


def predicted_memory(cfg: TrainConfig, strategy: str, world_size: int, layout: Layout | None = None,
                     device_type: str = "cuda") -> dict[str, Any]:
    """Bytes per device for this run's shape, precision, parallelism, checkpointing, gradient
    accumulation (train_step's micro-batches per step, from train.global_batch_tokens) and device:
    counting.training_memory for one process, DDP and FSDP (`strategy`), and layout_cost.layout_memory
    for a `layout` with tp, pp or HSDP (its busiest pipeline rank; under pp the micro-batches are the
    pipeline's): the same components, peak and runtime reserve. AdamW is fused on CUDA and a
    per-parameter loop elsewhere (make_optimizer); only CUDA has a runtime reserve."""
    t = cfg.train
    precision = "fp32" if t.dtype == "fp32" else "bf16-mixed"
    where = dict(optimizer_impl="fused" if device_type == "cuda" else "for-loop",
                 device="cuda" if device_type == "cuda" else "cpu")
    accum = grad_accum_steps(cfg, layout.dp if layout is not None else world_size)
    if layout is not None and (layout.tp > 1 or layout.pp > 1 or (layout.dp_replicate > 1 and layout.uses_fsdp)):
        from scalelab.layout_cost import layout_memory

        m = layout_memory(cfg.model, layout, micro_batch=t.micro_batch_size, seq_len=t.seq_len, precision=precision,
                          activation_checkpointing=t.activation_checkpointing,
                          selective_ac_option=t.selective_ac_option, attention=t.attention,
                          loss_chunk_tokens=t.loss_chunk_tokens, grad_accum_steps=1 if layout.pp > 1 else accum,
                          **where)
        return dict(m, model="layout_cost.layout_memory")
    m = training_memory(cfg.model, micro_batch=t.micro_batch_size, seq_len=t.seq_len, num_devices=world_size,
                        sharding={"fsdp": "fsdp", "ddp": "ddp"}.get(strategy, "none"), precision=precision,
                        activation_checkpointing=t.activation_checkpointing,
                        selective_ac_option=t.selective_ac_option, attention=t.attention,
                        loss_chunk_tokens=t.loss_chunk_tokens, grad_accum_steps=accum, **where)
    return m


def resolved_dtype(dtype: str, device: torch.device) -> str:
    """train.dtype with `auto` made concrete: bf16 on CUDA, fp32 elsewhere."""
    if dtype != "auto":
        return dtype
    return "bf16" if device.type == "cuda" else "fp32"


def meminfo_available(meminfo: str) -> float | None:
    """MemAvailable in bytes from the text of /proc/meminfo (None when absent)."""
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return float(line.split()[1]) * 1024  # kB
    return None


def free_memory(device: torch.device) -> tuple[float, str] | None:
    """(bytes free now, what they are) on `device`: free GPU memory on CUDA, the host's MemAvailable
    otherwise; None where it cannot be read (e.g. no /proc on macOS)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free), f"free on {torch.cuda.get_device_name(device)} ({device})"
    try:
        available = meminfo_available(Path("/proc/meminfo").read_text())
    except OSError:
        return None
    return None if available is None else (available, "available on this host (MemAvailable)")


def memory_problem(cfg: TrainConfig, strategy: str, world_size: int, free: tuple[float, str] | None,
                   ranks_sharing: int = 1, layout: Layout | None = None, device_type: str = "cuda") -> str | None:
    """Why this run cannot fit, or None: counting's predicted peak per device (× the ranks sharing
    one host's memory on CPU) against the free memory, with the ways to need less."""
    if not cfg.train.check_memory or free is None:
        return None
    t = cfg.train
    m = predicted_memory(cfg, strategy, world_size, layout, device_type)
    need = m["total"] * ranks_sharing
    if need <= free[0]:
        return None
    parts = ", ".join(f"{k.replace('_', ' ')} {format_bytes(m[k])}" for k in (*MEMORY_COMPONENTS, "runtime_reserve")
                      if m[k] > 0) + f"; peak at {m['peak_phase'].replace('_', ' ')}"
    ways = [f"lower train.micro_batch_size ({t.micro_batch_size})" if t.micro_batch_size > 1 else "",
            f"lower train.seq_len ({t.seq_len})",
            "" if t.activation_checkpointing == "full" else "set train.activation_checkpointing = \"full\" (or "
            "\"selective\")",
            "" if strategy == "fsdp" else "shard over more GPUs with parallel.strategy = \"fsdp\" under torchrun",
            f"accumulate fewer micro-batches per step (train.global_batch_tokens {t.global_batch_tokens}: the "
            f"gradients accumulated so far, {format_bytes(m['accumulated_gradients'])}, are live through every "
            "later micro-batch)" if m.get("accumulated_gradients") else "",
            "use a smaller [model]"]
    who = f" × {ranks_sharing} ranks on this host" if ranks_sharing > 1 else " per device"
    return (f"the run needs {format_bytes(need)}{who} ({m.get('model', 'counting.training_memory')} per device: "
            f"{parts}) but "
            f"{format_bytes(free[0])} is "
            f"{free[1]}; {', '.join(w for w in ways if w)}; or set train.check_memory = false to start anyway")


def peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), "mem"
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "rss"  # Linux reports KiB


class _StopFlag:
    """SIGTERM/SIGINT set a flag the loop checks after each step; a second signal interrupts at once."""

    def __init__(self, enabled: bool):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        if enabled:
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            # torchrun re-sends the signal it got to its workers, so after Ctrl-C each worker sees
            # SIGINT twice at once: only a repeat that comes later is the user insisting.
            if time.monotonic() - self._first > 3.0:
                raise KeyboardInterrupt
            return
        self.signum, self._first = signum, time.monotonic()
        print(f"scalelab train: got {signal.Signals(signum).name}; checkpointing after this step "
              "(send again after 3 s to abort)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# The first line of RUN_DIR/config.toml: what makes a directory a run directory (see is_run_dir).
RUN_MARKER = "# scalelab run directory: written by `scalelab train` (the resolved config of this run)"
LOCK = ".lock"


def is_run_dir(path: Path) -> bool:
    """Whether `path` holds a run that `scalelab train` created: its config.toml begins with
    RUN_MARKER (runs from before the marker: config.toml, model.toml and data.json, which only
    `scalelab train` writes together)."""
    try:
        with open(path / "config.toml", encoding="utf-8") as f:
            if f.readline().rstrip("\n") == RUN_MARKER:
                return True
    except (OSError, UnicodeDecodeError):
        return False
    return (path / "model.toml").is_file() and (path / "data.json").is_file()


def enclosing_run_dir(path: Path) -> Path | None:
    """The run directory `path` is or lies in (itself, RUN/final or RUN/checkpoints/step_N: up to
    two levels up), or None."""
    for d in [path, *list(Path(path).resolve().parents)[:2]]:
        if is_run_dir(d):
            return d
    return None


def check_run_dir(path: Path) -> None:
    """UserError unless `path` is new, empty (a leftover .lock aside) or a run directory: train
    never writes into a directory it did not create (a prepared data set, a demo's output...)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"run directory {path} is a file; give a new or existing run directory with --run-dir")
    if path.is_dir() and any(p.name != LOCK for p in path.iterdir()) and not is_run_dir(path):
        raise UserError(f"{path} is not empty and is not a run directory (its config.toml, if any, was not "
                        f"written by scalelab train); left it untouched: give a new or empty --run-dir")


def lock_run_dir(path: Path) -> IO:
    """Hold RUN_DIR/.lock (an exclusive flock, released when the process ends however it ends)
    with this process's pid in it; UserError naming the holder when another process has it."""
    path.mkdir(parents=True, exist_ok=True)
    f = open(path / LOCK, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().split()
        f.close()
        who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "a process that has just started"
        raise UserError(f"{path} is in use by another scalelab train ({who}, holding {path / LOCK}); wait for "
                        "it to finish or stop it, or give another --run-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()} {socket.gethostname()}\n")
    f.flush()
    return f


def _prepare_run_dir(run_dir: Path, cfg: TrainConfig, loader) -> None:
    """config.toml (resolved, starting with RUN_MARKER), model.toml (the ModelConfig: N for the fit),
    data.json and the tokenizer (so samples and exports need nothing outside the run directory)."""
    atomic_write_text(run_dir / "config.toml", RUN_MARKER + "\n" + cfg.to_toml())
    atomic_write_text(run_dir / "model.toml", cfg.model.to_toml())
    atomic_write_text(run_dir / "data.json", json.dumps(dict(loader.metadata, data_dir=str(Path(cfg.data.dir).resolve())),
                                                        indent=2) + "\n")
    src = Path(cfg.data.dir) / "tokenizer"
    if src.is_dir():
        with atomic_directory(run_dir / "tokenizer") as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)


class _Evaluator:
    """Mean held-out loss over fixed val batches, and bits per byte (bpb = loss/ln2 × tokens/bytes,
    bytes of the decoded target text, as scalelab.evaluate.target_bytes counts them)."""

    def __init__(self, cfg: TrainConfig, dims: ParallelDims, log: Callable[[str], None], pipeline=None):
        """Under a `pipeline` the val batches go through it `accum` at a time (the pipeline's local
        batch, so its micro-batches have the training shape): eval.batches is rounded up to a
        multiple of that, and only the last stage's ranks count loss and bytes."""
        from scalelab.data.loader import TokenLoader
        from scalelab.evaluate import target_bytes

        self.pipeline, self.group = pipeline, 1
        self.batches = cfg.eval.batches
        if pipeline is not None:
            self.group = grad_accum_steps(cfg, dims.dp)
            self.batches = -(-self.batches // self.group) * self.group
        counts = pipeline is None or pipeline.holds_last
        self.d = d = dims.d
        self.loader = None
        self.bytes = None
        no_eval = no_bpb = None
        n = 0
        try:
            self.loader = TokenLoader(cfg.data.dir, cfg.data.val_split, seq_len=cfg.train.seq_len,
                                      micro_batch_size=cfg.train.micro_batch_size, rank=dims.dp_rank,
                                      world_size=dims.dp, seed=cfg.train.seed)
            tok = self.loader.tokenizer()
            if counts:
                n = sum(target_bytes(tok, self.loader.get_batch(i)[1]) for i in range(self.batches))
        except UserError as e:
            no_eval = str(e) if self.loader is None else None
            no_bpb = None if self.loader is None else str(e)
        except Exception as e:  # a tokenizer that cannot decode: loss only
            no_bpb = f"{type(e).__name__}: {e}"
        # Every rank takes part in the one collective, whatever failed where.
        ranks_without_eval, ranks_without_bpb, total = all_reduce_sum(
            [float(no_eval is not None), float(no_bpb is not None), float(n)], d)
        if ranks_without_eval:
            self.loader = None
            if d.is_main:
                log(f"scalelab train: warning: no eval ({no_eval or 'the val split is missing on another rank'})")
        elif ranks_without_bpb:
            if d.is_main:
                log(f"scalelab train: warning: bits per byte unavailable ({no_bpb or 'on another rank'})")
        else:
            self.bytes = total if total > 0 else None

    @torch.no_grad()
    def __call__(self, model: nn.Module, autocast, loss_context) -> dict[str, float | None]:
        model.eval()
        total, count = 0.0, 0.0
        for i in range(0, self.batches, self.group):
            batches = [self.loader.get_batch(j) for j in range(i, i + self.group)]
            x, y = (torch.from_numpy(np.concatenate(a)).to(self.d.device) for a in zip(*batches))
            with autocast(), loss_context():
                if self.pipeline is None:
                    losses = [float(as_plain(model(x, y)[1]))]
                else:  # the last stage's micro-batch means (micro-batches of equal size); none elsewhere
                    losses = self.pipeline.eval_losses(x, y) or []
            total += sum(losses) * y.numel() / max(len(losses), 1)
            count += y.numel() if losses else 0
        model.train()
        total, count = all_reduce_sum([total, count], self.d)
        val_loss = total / count
        bpb = None if self.bytes is None else total / (math.log(2) * self.bytes)
        return {"val_loss": val_loss, "val_bpb": bpb}


def check_microbatches(local_sequences: int, microbatches: int) -> None:
    """UserError unless a pipeline's local batch splits evenly into its micro-batches."""
    if local_sequences % microbatches:
        raise UserError(f"the pipeline splits each data-parallel rank's {local_sequences} sequences per step "
                        f"(train.micro_batch_size × gradient accumulation) into parallel.pp_microbatches = "
                        f"{microbatches} micro-batches, which does not divide them; use a pp_microbatches that "
                        f"divides {local_sequences}, or change train.micro_batch_size / global_batch_tokens")


def build_model(cfg: TrainConfig, dims: ParallelDims,
                initial: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The initial model, identical whatever the number of processes: the weights are those that
    `Transformer(cfg)` draws on the CPU after `torch.manual_seed(train.seed)`, or `initial`, a full
    state dict (train.init_from; under FSDP only rank 0's is used).

    Under a sharded layout (FSDP, TP) only rank 0 materialises them (on the CPU); the other ranks
    build the model on the meta device, every rank shards it, and rank 0's weights are broadcast shard by shard
    (`set_model_state_dict(..., broadcast_from_rank0=True)`), so host memory holds one full copy
    per node at most, not one per GPU."""
    from scalelab.model import Transformer

    t, d = cfg.train, dims.d
    torch.manual_seed(t.seed)
    if not dims.sharded:
        model = Transformer(cfg.model, attention=t.attention, loss_chunk_tokens=t.loss_chunk_tokens)
        if initial is not None:
            model.load_state_dict(initial)
        model = model.to(d.device)
        return dims.parallelize(model, dtype=t.dtype, compile=t.compile,
                                activation_checkpointing=t.activation_checkpointing,
                                selective_ac_option=t.selective_ac_option)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not d.is_main:
        full = {}
    else:
        full = initial if initial is not None else Transformer(cfg.model, attention=t.attention).state_dict()
    with torch.device("meta"):
        model = Transformer(cfg.model, attention=t.attention, loss_chunk_tokens=t.loss_chunk_tokens)
    model = dims.parallelize(model, dtype=t.dtype, compile=t.compile,
                             activation_checkpointing=t.activation_checkpointing,
                             selective_ac_option=t.selective_ac_option,
                             reshard_after_forward=cfg.parallel.reshard_after_forward)
    model.to_empty(device=d.device)
    model.tie_weights()
    # strict: every key of the model is in rank 0's state dict and nothing else is. Tied embeddings
    # are one parameter under two names on both sides (state_dict keeps both; tie_weights above
    # re-ties the meta-built model), so both names match.
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                               strict=True))
    return model


def train(cfg: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False,
          log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train under `cfg` in `run_dir`, resuming from its latest checkpoint if there is one.

    `resume=True` insists on a checkpoint (UserError if none). Returns a summary dict with
    `exit_code` 0, or 128 + signal number when stopped by SIGTERM/SIGINT (after checkpointing).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    run_dir = Path(run_dir)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # A layout that cannot run is refused by every rank alike before any process-group work.
    layout = layout_of(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    d = init_distributed(cfg.train.device, cfg.parallel.backend)
    # The run's own copy, with dtype resolved once the device is known (config.toml records the
    # choice); the caller's cfg is left as it was.
    cfg = copy.deepcopy(cfg)
    cfg.train.dtype = resolved_dtype(cfg.train.dtype, d.device)
    trainer = Trainer(cfg, run_dir, d, log, ParallelDims(layout, d))
    try:
        done = trainer.build(resume)
        return done if done is not None else trainer.fit()
    finally:
        trainer.close()
        del trainer
        # Free the model (FSDP's hooks and states form reference cycles that only the collector
        # breaks) while the process group it communicates over still exists, then destroy it.
        gc.collect()
        destroy_distributed()


class Trainer:
    """One training run, in torchtitan's split: `build` (data, model, optimizer, resume state,
    metrics), `train_step` (one optimizer step), `evaluate`, `checkpoint`, `finish` (final eval,
    checkpoint and weights), with `fit` as the loop that calls them and `close` to release the
    signal handlers and the metrics file."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, d: Dist, log: Callable[[str], None],
                 dims: ParallelDims | None = None):
        """`dims`: the layout on this rank (default: the config's, `layout_of(cfg, d.world_size)`)."""
        dims = dims or ParallelDims(layout_of(cfg, d.world_size), d)
        self.cfg, self.run_dir, self.dims, self.d, self.log = cfg, run_dir, dims, d, log
        self.strategy = dims.strategy
        self.stop: _StopFlag | None = None
        self.metrics: MetricsLog | None = None
        self.lock: IO | None = None
        self.evaluator: _Evaluator | None = None
        self.last_loss = float("nan")
        self.last_eval: dict | None = None
        self.init_source: Path | None = None  # train.init_from, resolved and checked (a run not yet started)
        self.init_weights: dict[str, torch.Tensor] | None = None  # its full state dict (FSDP: rank 0's only)
        self.initialised_from = ""  # the weights this run started from, as every checkpoint records it

    # ---- build --------------------------------------------------------------------------------

    def build(self, resume: bool) -> dict[str, Any] | None:
        """Everything before the first step. Returns the summary instead when the run in the
        directory is already complete (nothing is built or written then)."""
        from scalelab.data.loader import TokenLoader

        cfg, d, t, run_dir, log = self.cfg, self.d, self.cfg.train, self.run_dir, self.log
        # Each rank checks its own view (its data, its device's free memory: on CPU the ranks of a
        # host share its memory) before anything is allocated or written; if any rank finds a
        # problem, all raise the same error (none is left waiting in a collective).
        try:
            dims = self.dims  # the data loader shards by data-parallel rank: tp and pp peers see the same batch
            self.accum = accum = grad_accum_steps(cfg, dims.dp)
            if dims.layout.pp > 1:
                check_microbatches(t.micro_batch_size * accum, dims.layout.microbatches)
            self.loader = TokenLoader(cfg.data.dir, cfg.data.train_split, seq_len=t.seq_len,
                                      micro_batch_size=t.micro_batch_size, grad_accum_steps=accum, rank=dims.dp_rank,
                                      world_size=dims.dp, seed=t.seed)
            self.loader.check_vocab(cfg.model.vocab_size)
            # A run that already has checkpoints resumes them and needs its source no more.
            if t.init_from and not ckpt.list_checkpoints(run_dir):
                self.init_source = init_from.check_source(t.init_from, cfg.model, self.loader.metadata)
            seqs_per_step = t.micro_batch_size * accum * dims.dp
            self.tokens_per_step = seqs_per_step * t.seq_len
            self.flops_per_step = training_flops(cfg.model, seqs_per_step, t.seq_len)
            # what the device executes, activation checkpointing's recomputation included (HFU)
            self.executed_flops_per_step = executed_training_flops(
                cfg.model, seqs_per_step, t.seq_len, activation_checkpointing=t.activation_checkpointing,
                selective_ac_option=t.selective_ac_option, attention=t.attention)
            self.steps = total_steps(cfg, self.tokens_per_step, self.flops_per_step)
            self.schedule = schedule_settings(cfg.to_dict()["train"], self.steps)
            if (why := schedule_problem(self.schedule)) is not None:
                raise UserError(f"{cfg.source or 'config'}: {why}")
            ranks_sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if d.device.type == "cpu" else 1
            problem = memory_problem(cfg, self.strategy, d.world_size, free_memory(d.device), ranks_sharing,
                                     dims.layout, d.device.type)
            # sharded: rank 0 broadcasts them; a pipeline's ranks each build the whole model first
            if problem is None and self.init_source is not None and (not dims.sharded or d.is_main
                                                                      or dims.layout.pp > 1):
                self.init_weights = init_from.load_weights(self.init_source)
        except UserError as e:
            problem = str(e)
        except OSError as e:
            problem = describe_os_error(e)
        agree(problem, d)
        # Rank 0 claims the run directory and decides; every rank gets the verdict.
        claim = decide_on_main(lambda: self._claim_run_dir(resume), d)
        if claim["complete"] is not None:
            return claim["complete"]
        latest = None if claim["latest"] is None else Path(claim["latest"])
        branch = None if claim["branch"] is None else Path(claim["branch"])

        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        self.pipeline = None
        if self.dims.layout.pp > 1:
            from scalelab.train.pipeline import build_pipeline

            self.pipeline = build_pipeline(cfg, self.dims, self.init_weights if latest is None else None)
            self.model = self.pipeline.model
        else:
            self.model = build_model(cfg, self.dims, self.init_weights if latest is None else None)
        self.init_weights = None  # the model holds them now
        if self.init_source is not None and latest is None:
            self.initialised_from = str(self.init_source.resolve())
            if d.is_main:
                log(f"scalelab train: initialised from {self.init_source} (weights only: new optimizer and "
                    "schedule, step 0)")
        self.optimizer = make_optimizer(self.model, cfg, d.device)
        self.scaler = torch.amp.GradScaler(d.device.type) if t.dtype == "fp16" else None
        self.use_autocast = t.dtype != "fp32" and self.dims.autocast

        self.start_step, self.tokens_seen, self.flops_seen = 0, 0, 0
        self.branched_from = ""  # train.branch_from resolved to the checkpoint this run started from
        if latest is not None or branch is not None:
            state = ckpt.load_checkpoint(latest or branch, self.model, self.optimizer, d)
            self.loader.load_state_dict(state["loader"])
            self.initialised_from = state.get("init_from", "")
            self.branched_from = state.get("branch_from", "") if latest is not None else str(branch.resolve())
            self.start_step, self.tokens_seen, self.flops_seen = state["step"], state["tokens"], state["flops"]
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            if d.is_main:
                log(f"scalelab train: resumed from {latest} at step {self.start_step}" if latest is not None else
                    f"scalelab train: branched from {branch} at step {self.start_step} (model, optimizer, data "
                    f"position continue; {self.steps - self.start_step} steps to go, the last "
                    f"{self.schedule['decay']} decaying)")
            source = run_dir if latest is not None else branch.parent.parent
            figures = recorded_figures(read_metrics(source), self.start_step) if d.is_main else {}
            self.last_loss = figures.get("loss", float("nan"))
        self.step = self.start_step
        self.last_saved = self.start_step if latest is not None else -1

        if d.is_main:
            self.metrics = MetricsLog(run_dir, keep_until_step=self.start_step if latest is not None else None,
                                      tensorboard=cfg.logging.tensorboard, wandb_project=cfg.logging.wandb_project,
                                      config=cfg.to_dict(), warn=log)
            n_params = count_params(cfg.model).total if self.pipeline is not None else \
                sum(p.numel() for p in unwrap(self.model).parameters())
            data_world = f"world {d.world_size}" if self.dims.dp == d.world_size else f"dp {self.dims.dp}"
            log(f"scalelab train: {cfg.model.name()} ({n_params:,} params) on {d.world_size} × {d.device.type} "
                f"[{self.strategy}, {t.dtype}], {self.steps} steps × {self.tokens_per_step:,} tokens "
                f"(micro-batch {t.micro_batch_size} × seq {t.seq_len} × accum {accum} × {data_world}), "
                f"{self.flops_per_step * self.steps:.3g} FLOPs; run dir {run_dir}")
            m = predicted_memory(cfg, self.strategy, d.world_size, self.dims.layout, d.device.type)
            reserve = (f" + {format_bytes(m['runtime_reserve'])} CUDA context and allocator reserve"
                       if m.get("runtime_reserve") else "")
            at = f" at {m['peak_phase'].replace('_', ' ')}"
            at += f" of a later micro-batch ({accum} per step)" if m.get("accumulated_gradients") and \
                m["peak_phase"] not in ("gradient_reduce", "optimizer_step") else ""
            log(f"scalelab train: predicted peak memory per device {format_bytes(m['peak'])}{at}"
                f"{reserve} ({m.get('model', 'counting.training_memory')}, docs/memory.md; on a GPU the log's mem "
                f"column measures the peak, on a CPU that column is the whole process's RSS)")
        if self.pipeline is not None and d.is_main:
            from scalelab.train.pipeline import describe_stages

            lay = self.dims.layout
            log(f"scalelab train: pipeline of {lay.stages} stages ({lay.pp_stages_per_rank} per rank), schedule "
                f"{lay.pp_schedule}, {lay.microbatches} micro-batches of "
                f"{t.micro_batch_size * accum // lay.microbatches} sequences; blocks per stage "
                f"{describe_stages(cfg.model.n_layer, lay.stages)}")
        self.evaluator = _Evaluator(cfg, self.dims, log, self.pipeline) if (cfg.eval.every or cfg.eval.at_end) \
            else None
        self.peak = peak_flops_per_device(cfg, d.device)
        self.stop = _StopFlag(cfg.checkpoint.on_signal)
        return None

    def _claim_run_dir(self, resume: bool) -> dict[str, Any]:
        """Rank 0: check and lock the run directory, hold a checkpoint against the resume rule (or,
        for a new branch, train.branch_from's checkpoint against the branch rule), then write the
        run's files. {"latest": checkpoint or None, "branch": checkpoint to branch from or None,
        "complete": summary or None}."""
        cfg, run_dir = self.cfg, self.run_dir
        check_run_dir(run_dir)
        if resume and ckpt.latest_checkpoint(run_dir, warn=lambda message: None) is None:
            raise UserError(f"--resume: {run_dir} has no checkpoint to resume from; drop --resume to start fresh")
        self.lock = lock_run_dir(run_dir)
        latest = ckpt.latest_checkpoint(run_dir, warn=self.log)  # the newest intact one, saying what it skipped
        if latest is not None:
            state = ckpt.load_trainer_state(latest)
            self._check_resume(latest, state)
            if state["step"] == self.steps and (run_dir / "final" / "model.safetensors").is_file():
                return {"latest": str(latest), "branch": None, "complete": self._already_complete(latest, state)}
        branch = None
        if latest is None and cfg.train.branch_from:
            branch = ckpt.resolve_checkpoint(cfg.train.branch_from)
            self._check_branch(branch, ckpt.load_trainer_state(branch))
        _prepare_run_dir(run_dir, cfg, self.loader)
        return {"latest": None if latest is None else str(latest), "branch": None if branch is None else str(branch),
                "complete": None}

    def _continuation_problems(self, state: dict[str, Any], recorded_data: Path) -> tuple[list[str], list[str]]:
        """What differs between the config a checkpoint was trained with and this one, split by the
        resume rule into (refused, accepted); `recorded_data` is the data.json of the checkpoint's run."""
        import tomllib

        cfg, done = self.cfg, int(state["step"])
        old = tomllib.loads(state["config"])
        refused, accepted = resume_differences(old, cfg.to_dict())
        old_seqs = sequences_per_step(old["train"], int(state.get("dp", state["world_size"])))
        new_seqs = sequences_per_step(cfg.to_dict()["train"], self.dims.dp)
        if old_seqs != new_seqs:
            refused.append(f"global batch {old_seqs} -> {new_seqs} sequences per step")
        if recorded_data.is_file():
            then = {k: v for k, v in json.loads(recorded_data.read_text()).items() if k != "data_dir"}
            if then != json.loads(json.dumps(self.loader.metadata)):
                refused.append(f"the data: {cfg.data.dir}/meta.json differs from the run's data.json")
        if self.steps < done:
            refused.append(f"total steps {state['total_steps']} -> {self.steps}, fewer than the {done} already done")
        return refused, accepted

    def _check_branch(self, source: Path, state: dict[str, Any]) -> None:
        """The branch rule: the source's finished steps must be exactly the first steps of this run:
        the resume rule's fixed keys unchanged (train.branch_from itself aside) and the same learning
        rate on every one of them."""
        import tomllib

        done = int(state["step"])
        refused, _ = self._continuation_problems(state, source.parent.parent / "data.json")
        refused = [r for r in refused if not r.startswith("train.branch_from ")]
        theirs = schedule_settings(tomllib.loads(state["config"])["train"], int(state["total_steps"]))
        differ = next((s for s in range(done) if learning_rate(s, **theirs) != learning_rate(s, **self.schedule)),
                      None)
        if differ is not None:
            refused.append(f"the learning rate at step {differ + 1}: {learning_rate(differ, **theirs):.6g} there, "
                           f"{learning_rate(differ, **self.schedule):.6g} in this schedule (a branch must share the "
                           "source's warmup, lr and stable phase; give train.warmup in steps)")
        if done > self.steps - self.schedule["decay"]:
            refused.append(f"step {done} is past this run's decay start, step {self.steps - self.schedule['decay']} "
                           f"({self.steps} steps, the last {self.schedule['decay']} decaying)")
        if refused:
            raise UserError(f"cannot branch from {source}: {'; '.join(refused)}; branch from an earlier checkpoint "
                            "of a stable run trained with this config's other settings")

    def _check_resume(self, latest: Path, state: dict[str, Any]) -> None:
        """The resume rule (docs/training.md): refuse changes to what the finished steps meant or to
        the data order; accept the rest, saying what changed and what it does to the schedule."""
        import tomllib

        done = int(state["step"])
        refused, accepted = self._continuation_problems(state, self.run_dir / "data.json")
        if refused:
            raise UserError(f"cannot resume {latest}: changed since its {done} steps were trained: "
                            f"{'; '.join(refused)}; these change what those steps meant or the data order: "
                            "use a new --run-dir, or the original values to continue")
        old_total = int(state["total_steps"])
        if old_total != self.steps:
            accepted.append(f"total steps {old_total} -> {self.steps}")
        if accepted:
            before = learning_rate(done, **schedule_settings(tomllib.loads(state["config"])["train"], old_total))
            after = learning_rate(done, **self.schedule)
            self.log(f"scalelab train: resuming {latest} with changed settings (they change only the steps still "
                     f"to run): {'; '.join(accepted)}. The learning-rate schedule is recomputed over "
                     f"{self.steps} steps with the new values: lr at step {done + 1} {before:.3g} -> {after:.3g}")

    def _already_complete(self, latest: Path, state: dict[str, Any]) -> dict[str, Any]:
        figures = recorded_figures(read_metrics(self.run_dir), int(state["step"]))
        self.log(f"scalelab train: {self.run_dir} is already complete ({state['step']}/{self.steps} steps); "
                 "reporting its recorded figures (raise train.max_steps / max_tokens / max_flops to train on)")
        return {"exit_code": 0, "already_complete": True, "step": int(state["step"]), "steps": self.steps,
                "loss": figures.get("loss"), "tokens": int(state["tokens"]), "flops": int(state["flops"]),
                "val_loss": figures.get("val_loss"), "val_bpb": figures.get("val_bpb"), "checkpoint": str(latest),
                "final": str(self.run_dir / "final"), "run_dir": str(self.run_dir)}

    def autocast(self):
        if not self.use_autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.d.device.type, dtype=TORCH_DTYPES[self.cfg.train.dtype])

    # ---- one optimizer step -------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """Optimizer step `self.step + 1`: lr, accumulated micro-batches, clip, finite check, AdamW.
        Returns the step's mean loss, gradient norm and learning rate (the same on every rank), and
        for a MoE the step's expert load (`moe_load`)."""
        t, d, accum, step = self.cfg.train, self.d, self.accum, self.step
        model, optimizer, scaler = self.model, self.optimizer, self.scaler
        lr = learning_rate(step, **self.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if self.pipeline is not None:
            return self._finish_step(*self._pipeline_step(step), lr)
        loss_sum = torch.zeros((), device=d.device)
        for micro in range(accum):
            x, y = self.loader.get_batch(step, micro)
            x = torch.from_numpy(x).to(d.device, non_blocking=True)
            y = torch.from_numpy(y).to(d.device, non_blocking=True)
            with self.dims.grad_sync(model, micro == accum - 1), self.dims.loss_context():
                with self.autocast():
                    loss = model(x, y)[1]  # unchunked logits must not outlive forward
                scaled = loss / accum
                (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += as_plain(loss.detach())
        if scaler is not None:
            scaler.unscale_(optimizer)
        max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
        grad_norm = self.dims.clip_grad_norm_(model.parameters(), max_norm)
        return self._finish_step(float(loss_sum) / accum, float(grad_norm), d.world_size, lr)

    def _pipeline_step(self, step: int) -> tuple[float, float, int]:
        """The pipeline schedule's forward and backward over this rank's whole local batch (its
        `accum` micro-batches, as one process reads them), then clipping by the norm over every
        stage. Returns (mean loss on a last-stage rank, else 0; gradient norm; ranks with a loss)."""
        t, d = self.cfg.train, self.d
        batches = [self.loader.get_batch(step, micro) for micro in range(self.accum)]
        x, y = (torch.from_numpy(np.concatenate(a)).to(d.device) for a in zip(*batches))
        with self.autocast(), self.dims.loss_context():
            loss_sum = self.pipeline.step(x, y)
        max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
        grad_norm = self.dims.clip_grad_norm_(self.model.parameters(), max_norm)
        loss = 0.0 if loss_sum is None else float(loss_sum) / self.pipeline.n_microbatches
        return loss, float(grad_norm), d.world_size // self.dims.layout.pp

    def _finish_step(self, loss: float, grad_norm: float, loss_ranks: int, lr: float) -> dict[str, float]:
        """Agree on the step's loss (the mean over the `loss_ranks` ranks that hold one: all, or a
        pipeline's last-stage ranks) and gradient norm, stop on a non-finite one, step AdamW."""
        d, step, optimizer, scaler = self.d, self.step, self.optimizer, self.scaler
        loss_value, grad_value = all_reduce_sum([loss, grad_norm], d)
        loss_value /= loss_ranks
        grad_value /= d.world_size  # identical on every rank already; this keeps it so
        if not math.isfinite(loss_value) or (scaler is None and not math.isfinite(grad_value)):
            where = ckpt.latest_checkpoint(self.run_dir, warn=lambda message: None)
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            raise TrainingDiverged(
                f"step {step + 1}: {what} is {loss_value if what == 'loss' else grad_value} (not finite); "
                f"stopped before the optimizer step. Last good checkpoint: {where or 'none'}. "
                f"Try a lower train.lr, a longer train.warmup, or dtype bf16/fp32.")
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        routing = self.balance_experts()
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self.flops_seen += self.flops_per_step
        self.last_loss = loss_value
        return {"loss": loss_value, "grad_norm": grad_value, "lr": lr, **routing}

    def balance_experts(self) -> dict[str, Any]:
        """After the optimizer step of a MoE: the tokens each expert received during the step,
        summed over micro-batches and ranks (so every rank applies the same update), move the
        noaux_tc routers' biases (moe.update_expert_bias) and are returned as `moe_load` (MoE
        layers, E) for the metrics (nothing for a dense model)."""
        from scalelab.moe import moe_layers, take_step_load, update_expert_bias

        layers = moe_layers(unwrap(self.model))
        load = take_step_load(layers)
        if load is None:
            return {}
        if self.d.distributed:
            load = load.to(self.d.device)
            dist.all_reduce(load)
        update_expert_bias(layers, load, self.cfg.train.router_bias_update_rate)
        return {"moe_load": load}

    # ---- eval and checkpoint ------------------------------------------------------------------

    def evaluate(self) -> dict | None:
        if self.evaluator is None or self.evaluator.loader is None:
            return None
        r = self.evaluator(self.model, self.autocast, self.dims.loss_context)
        if self.d.is_main:
            self.metrics.write({"kind": "eval", "step": self.step, "tokens": self.tokens_seen,
                                "flops": self.flops_seen, **r})
            bpb = "" if r["val_bpb"] is None else f" | val bpb {r['val_bpb']:.4f}"
            self.log(f"eval step {self.step} | val loss {r['val_loss']:.4f}{bpb}")
        self.last_eval = r
        return r

    def trainer_state(self) -> dict[str, Any]:
        return {"format": 1, "step": self.step, "tokens": self.tokens_seen, "flops": self.flops_seen,
                "loader": self.loader.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                "model": self.cfg.model.to_dict(), "config": self.cfg.to_toml(), "world_size": self.d.world_size,
                "dp": self.dims.dp, "layout": dataclasses.asdict(self.dims.layout),
                "strategy": self.strategy, "total_steps": self.steps,
                "init_from": self.initialised_from, "branch_from": self.branched_from}

    def checkpoint(self) -> Path:
        """A checkpoint at the current step, unless the last one saved is already there."""
        if self.last_saved == self.step:
            return ckpt.latest_checkpoint(self.run_dir, warn=lambda message: None)
        path = ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.trainer_state(),
                                    strategy=self.strategy, d=self.d, keep=self.cfg.checkpoint.keep)
        self.last_saved = self.step
        return path

    # ---- the loop -----------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        cfg, d, steps = self.cfg, self.d, self.steps
        self.model.train()
        window_start, window_steps = time.perf_counter(), 0
        run_start = time.perf_counter()
        paused_total = 0.0  # eval and checkpoint time since run_start
        while self.step < steps:
            r = self.train_step()
            step = self.step
            window_steps += 1
            if step % cfg.logging.every == 0 or step == steps:
                now = time.perf_counter()
                dt = (now - window_start) / window_steps
                tflops = self.flops_per_step / dt / d.world_size / 1e12
                mem, mem_label = peak_memory(d.device)
                record = {"kind": "train", "step": step, "tokens": self.tokens_seen, "flops": self.flops_seen,
                          "loss": r["loss"], "lr": r["lr"], "grad_norm": r["grad_norm"],
                          "tokens_per_second": self.tokens_per_step / dt, "tflops_per_second": tflops,
                          "mfu": tflops * 1e12 / self.peak if self.peak else None,
                          "hfu": (tflops * 1e12 * self.executed_flops_per_step / self.flops_per_step / self.peak
                                  if self.peak else None),
                          "peak_memory_bytes": mem, "elapsed_seconds": now - run_start}
                if "moe_load" in r:  # a MoE's expert load at this step
                    from scalelab.moe import load_figures

                    record.update(load_figures(r["moe_load"]))
                if d.is_main:
                    self.metrics.write(record)
                    eta = eta_seconds(now - run_start - paused_total, step - self.start_step, steps - step)
                    self.log(console_line(record, steps, eta, mem_label))
                window_start, window_steps = time.perf_counter(), 0
            paused = time.perf_counter()  # eval and checkpoint time is neither throughput nor in the ETA
            if cfg.eval.every and step % cfg.eval.every == 0 and step < steps:
                self.evaluate()
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < steps:
                self.checkpoint()
            paused = time.perf_counter() - paused
            window_start += paused
            paused_total += paused
            stopping = self.stop.signum is not None
            if d.distributed:
                stopping = all_reduce_sum([1.0 if stopping else 0.0], d)[0] > 0
            if stopping and step < steps:
                return self.stopped()
        return self.finish()

    def stopped(self) -> dict[str, Any]:
        """Checkpoint after SIGTERM/SIGINT and say how to resume."""
        path = self.checkpoint()
        signum = self.stop.signum or signal.SIGTERM
        if self.d.is_main:
            self.log(f"scalelab train: stopped at step {self.step}/{self.steps} by {signal.Signals(signum).name}; "
                     f"checkpoint {path}; run the same command again to resume")
        return {"exit_code": 128 + int(signum), "step": self.step, "steps": self.steps, "loss": self.last_loss,
                "checkpoint": str(path), "run_dir": str(self.run_dir)}

    def finish(self) -> dict[str, Any]:
        """Final eval, checkpoint and weights (RUN_DIR/final); the summary."""
        if self.cfg.eval.at_end and self.steps > self.start_step:
            self.evaluate()
        path = self.checkpoint()
        final = export_final(self.run_dir, self.model, self.strategy, self.d,
                             path if self.pipeline is not None else None)
        if self.d.is_main:
            self.log(f"scalelab train: done, {self.step} steps, {self.tokens_seen:,} tokens, "
                     f"{self.flops_seen:.3g} FLOPs; checkpoint {path}; final weights {final}")
        last_eval = self.last_eval or {}
        return {"exit_code": 0, "step": self.step, "steps": self.steps, "loss": self.last_loss,
                "tokens": self.tokens_seen, "flops": self.flops_seen, "val_loss": last_eval.get("val_loss"),
                "val_bpb": last_eval.get("val_bpb"), "checkpoint": str(path), "final": str(final),
                "run_dir": str(self.run_dir)}

    def close(self) -> None:
        if self.stop is not None:
            self.stop.restore()
        if self.metrics is not None:
            self.metrics.close()
        self.model = self.optimizer = None
        if self.lock is not None:
            # Empty it again before releasing: a run that was refused (or finished) leaves the lock
            # file as it found it; only a live holder's pid and host are ever in it.
            self.lock.seek(0)
            self.lock.truncate()
            self.lock.close()  # releases the flock
            self.lock = None


def export_final(run_dir: Path, model: nn.Module, strategy: str, d: Dist, pipeline_checkpoint: Path | None = None) -> Path:
    """RUN_DIR/final: full weights as model.safetensors + model.toml (+ tokenizer), the native
    format `scalelab sample` and `scalelab export-hf` read. A sharded layout gathers to rank 0 on the
    CPU; under a pipeline rank 0 holds only its stages, so it reads the whole model back from
    `pipeline_checkpoint`, the checkpoint just written (DCP merges every stage's part)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from scalelab import hf

    inner = unwrap(model)
    final = run_dir / "final"
    if pipeline_checkpoint is not None:
        inner = ckpt.load_model_for_inference(pipeline_checkpoint) if d.is_main else inner
        sd = dict(inner.state_dict()) if d.is_main else {}
    elif strategy not in ("none", "ddp"):  # FSDP / TP shards (DTensors): gathered
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = dict(inner.state_dict()) if d.is_main else {}

    def write() -> None:  # rank 0; a failure (disk full...) reaches every rank instead of a barrier
        if inner.config.tie_embeddings:
            sd.pop("lm_head.weight", None)
        with atomic_directory(final) as tmp:
            hf.write_safetensors({k: v.detach().cpu().contiguous() for k, v in sd.items()}, tmp)
            atomic_write_text(tmp / "model.toml", inner.config.to_toml())
            if (run_dir / "tokenizer").is_dir():
                shutil.copytree(run_dir / "tokenizer", tmp / "tokenizer")
                shutil.copy2(run_dir / "data.json", tmp / "data.json")

    decide_on_main(write, d)
    return final
