"""The training loop: one process, or many under torchrun (DDP / FSDP2).

    train(cfg, run_dir) -> summary dict

Per optimizer step: set the learning rate (a pure function of the step), run
`grad_accum_steps` micro-batches (gradients reduced only on the last), clip the global gradient
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
import gc
import math
import os
import resource
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from scalelab.counting import training_flops, training_memory
from scalelab.errors import UserError
from scalelab.files import atomic_directory, atomic_write_text
from scalelab.units import format_bytes
from scalelab.train import checkpoint as ckpt
from scalelab.train.config import TrainConfig, grad_accum_steps, total_steps, warmup_steps
from scalelab.train.metrics import MetricsLog, console_line
from scalelab.train.parallel import (Dist, all_reduce_sum, barrier, destroy_distributed, grad_sync,
                                     init_distributed, parallelize, resolve_strategy, unwrap)
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


def predicted_memory(cfg: TrainConfig, strategy: str, world_size: int) -> dict[str, Any]:
    """counting.training_memory for this run's shape, precision and parallelism (bytes per device)."""
    t = cfg.train
    precision = "fp32" if t.dtype == "fp32" else "bf16-mixed"
    m = training_memory(cfg.model, micro_batch=t.micro_batch_size, seq_len=t.seq_len, num_devices=world_size,
                        sharding={"fsdp": "fsdp", "ddp": "ddp"}.get(strategy, "none"), precision=precision,
                        activation_checkpointing=t.activation_checkpointing, attention=t.attention)
    return m


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


def _prepare_run_dir(run_dir: Path, cfg: TrainConfig, loader) -> None:
    """config.toml (resolved), model.toml (the ModelConfig: N for the fit), data.json and the
    tokenizer (so samples and exports need nothing outside the run directory)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.toml", cfg.to_toml())
    atomic_write_text(run_dir / "model.toml", cfg.model.to_toml())
    import json

    atomic_write_text(run_dir / "data.json", json.dumps(dict(loader.metadata, data_dir=str(Path(cfg.data.dir).resolve())),
                                                        indent=2) + "\n")
    src = Path(cfg.data.dir) / "tokenizer"
    if src.is_dir():
        with atomic_directory(run_dir / "tokenizer") as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)


class _Evaluator:
    """Mean held-out loss over fixed val batches, and bits per byte (bpb = loss/ln2 × tokens/bytes,
    bytes of the decoded target text; special tokens count as zero bytes)."""

    def __init__(self, cfg: TrainConfig, d: Dist, log: Callable[[str], None]):
        from scalelab.data.loader import TokenLoader

        self.batches = cfg.eval.batches
        self.d = d
        self.loader = None
        self.bytes = None
        try:
            self.loader = TokenLoader(cfg.data.dir, cfg.data.val_split, seq_len=cfg.train.seq_len,
                                      micro_batch_size=cfg.train.micro_batch_size, rank=d.rank,
                                      world_size=d.world_size, seed=cfg.train.seed)
        except UserError as e:
            if d.is_main:
                log(f"scalelab train: warning: no eval ({e})")
            return
        try:
            tok = self.loader.tokenizer()
            special = {tok.bos_id, tok.eos_id}
            n = 0
            for i in range(self.batches):
                _, y = self.loader.get_batch(i)
                for row in y:
                    n += len(tok.decode([int(t) for t in row if int(t) not in special]).encode("utf-8"))
            total = all_reduce_sum([float(n)], d)[0]
            self.bytes = total if total > 0 else None
        except Exception as e:  # a tokenizer that cannot decode: loss only
            if d.is_main:
                log(f"scalelab train: warning: bits per byte unavailable ({type(e).__name__}: {e})")

    @torch.no_grad()
    def __call__(self, model: nn.Module, autocast) -> dict[str, float | None]:
        model.eval()
        total, count = 0.0, 0.0
        for i in range(self.batches):
            x, y = self.loader.get_batch(i)
            x, y = (torch.from_numpy(a).to(self.d.device) for a in (x, y))
            with autocast():
                _, loss = model(x, y)
            total += float(loss) * y.numel()
            count += y.numel()
        model.train()
        total, count = all_reduce_sum([total, count], self.d)
        val_loss = total / count
        bpb = None if self.bytes is None else total / (math.log(2) * self.bytes)
        return {"val_loss": val_loss, "val_bpb": bpb}


def build_model(cfg: TrainConfig, strategy: str, d: Dist) -> nn.Module:
    """The initial model, identical whatever the number of processes: the weights are those that
    `Transformer(cfg)` draws on the CPU after `torch.manual_seed(train.seed)`.

    Under FSDP only rank 0 materialises them (on the CPU); the other ranks build the model on the
    meta device, every rank shards it, and rank 0's weights are broadcast shard by shard
    (`set_model_state_dict(..., broadcast_from_rank0=True)`), so host memory holds one full copy
    per node at most, not one per GPU."""
    from scalelab.model import Transformer

    t = cfg.train
    torch.manual_seed(t.seed)
    if strategy != "fsdp":
        model = Transformer(cfg.model, attention=t.attention).to(d.device)
        return parallelize(model, strategy, d, dtype=t.dtype, compile=t.compile,
                           activation_checkpointing=t.activation_checkpointing)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = Transformer(cfg.model, attention=t.attention).state_dict() if d.is_main else {}
    with torch.device("meta"):
        model = Transformer(cfg.model, attention=t.attention)
    model = parallelize(model, strategy, d, dtype=t.dtype, compile=t.compile,
                        activation_checkpointing=t.activation_checkpointing,
                        reshard_after_forward=cfg.parallel.reshard_after_forward)
    model.to_empty(device=d.device)
    model.tie_weights()
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                               strict=False))
    return model


def train(cfg: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False,
          log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train under `cfg` in `run_dir`, resuming from its latest checkpoint if there is one.

    `resume=True` insists on a checkpoint (UserError if none). Returns a summary dict with
    `exit_code` 0, or 128 + signal number when stopped by SIGTERM/SIGINT (after checkpointing).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    run_dir = Path(run_dir)
    t = cfg.train
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    d = init_distributed(t.device, cfg.parallel.backend)
    if t.dtype == "auto":  # resolved once the device is known; config.toml records the choice
        t.dtype = "bf16" if d.device.type == "cuda" else "fp32"
    try:
        return _train(cfg, run_dir, d, resume, log)
    finally:
        # Free the model (FSDP's hooks and states form reference cycles that only the collector
        # breaks) while the process group it communicates over still exists, then destroy it.
        gc.collect()
        destroy_distributed()


def _train(cfg: TrainConfig, run_dir: Path, d: Dist, resume: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from scalelab.data.loader import TokenLoader

    t = cfg.train
    stop = None
    metrics = None
    try:
        strategy = resolve_strategy(cfg.parallel.strategy, d.world_size)
        accum = grad_accum_steps(cfg, d.world_size)
        loader = TokenLoader(cfg.data.dir, cfg.data.train_split, seq_len=t.seq_len,
                             micro_batch_size=t.micro_batch_size, grad_accum_steps=accum, rank=d.rank,
                             world_size=d.world_size, seed=t.seed)
        loader.check_vocab(cfg.model.vocab_size)
        seqs_per_step = t.micro_batch_size * accum * d.world_size
        tokens_per_step = seqs_per_step * t.seq_len
        flops_per_step = training_flops(cfg.model, seqs_per_step, t.seq_len)
        steps = total_steps(cfg, tokens_per_step, flops_per_step)
        warmup = warmup_steps(cfg, steps)
        latest = ckpt.latest_checkpoint(run_dir, warn=log if d.is_main else lambda message: None)
        if resume and latest is None:
            raise UserError(f"--resume: {run_dir} has no checkpoint to resume from; drop --resume to start fresh")
        if latest is not None and ckpt.load_trainer_state(latest)["model"] != cfg.model.to_dict():
            raise UserError(f"{latest} was trained with a different [model]; use a new --run-dir (or the "
                            "original config) to continue")
        if d.is_main:
            _prepare_run_dir(run_dir, cfg, loader)
        barrier(d)

        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        model = build_model(cfg, strategy, d)
        optimizer = make_optimizer(model, cfg, d.device)
        scaler = torch.amp.GradScaler(d.device.type) if t.dtype == "fp16" else None
        use_autocast = t.dtype != "fp32" and strategy != "fsdp"

        def autocast():
            if not use_autocast:
                return contextlib.nullcontext()
            return torch.autocast(d.device.type, dtype=TORCH_DTYPES[t.dtype])

        start_step, tokens_seen, flops_seen = 0, 0, 0
        if latest is not None:
            state = ckpt.load_checkpoint(latest, model, optimizer, d)
            loader.load_state_dict(state["loader"])
            start_step, tokens_seen, flops_seen = state["step"], state["tokens"], state["flops"]
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            if d.is_main:
                log(f"scalelab train: resumed from {latest} at step {start_step}")

        def trainer_state(step: int) -> dict[str, Any]:
            return {"format": 1, "step": step, "tokens": tokens_seen, "flops": flops_seen,
                    "loader": loader.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                    "model": cfg.model.to_dict(), "config": cfg.to_toml(), "world_size": d.world_size,
                    "strategy": strategy, "total_steps": steps}

        last_saved = start_step if latest is not None else -1

        def save(step: int) -> Path:
            nonlocal last_saved
            path = ckpt.save_checkpoint(run_dir, step, model, optimizer, trainer_state(step), strategy=strategy,
                                        d=d, keep=cfg.checkpoint.keep)
            last_saved = step
            return path

        if d.is_main:
            metrics = MetricsLog(run_dir, keep_until_step=start_step if latest is not None else None,
                                 tensorboard=cfg.logging.tensorboard, wandb_project=cfg.logging.wandb_project,
                                 config=cfg.to_dict(), warn=log)
            n_params = sum(p.numel() for p in unwrap(model).parameters())
            log(f"scalelab train: {cfg.model.name()} ({n_params:,} params) on {d.world_size} × {d.device.type} "
                f"[{strategy}, {t.dtype}], {steps} steps × {tokens_per_step:,} tokens "
                f"(micro-batch {t.micro_batch_size} × seq {t.seq_len} × accum {accum} × world {d.world_size}), "
                f"{flops_per_step * steps:.3g} FLOPs; run dir {run_dir}")
            log(f"scalelab train: predicted peak memory per device "
                f"{format_bytes(predicted_memory(cfg, strategy, d.world_size)['total'])} (counting.training_memory; "
                f"on a GPU the log's peak column measures it, on a CPU that column is the whole process's RSS)")
        evaluator = _Evaluator(cfg, d, log) if (cfg.eval.every or cfg.eval.at_end) else None
        peak = peak_flops_per_device(cfg, d.device)
        stop = _StopFlag(cfg.checkpoint.on_signal)

        def evaluate(step: int) -> dict | None:
            if evaluator is None or evaluator.loader is None:
                return None
            r = evaluator(model, autocast)
            if d.is_main:
                metrics.write({"kind": "eval", "step": step, "tokens": tokens_seen, "flops": flops_seen, **r})
                bpb = "" if r["val_bpb"] is None else f" | val bpb {r['val_bpb']:.4f}"
                log(f"eval step {step} | val loss {r['val_loss']:.4f}{bpb}")
            return r

        model.train()
        last_loss, last_eval = float("nan"), None
        window_start, window_steps = time.perf_counter(), 0
        run_start = time.perf_counter()
        step = start_step
        while step < steps:
            lr = learning_rate(step, lr=t.lr, min_lr=t.min_lr, warmup=warmup, total=steps, schedule=t.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=d.device)
            for micro in range(accum):
                x, y = loader.get_batch(step, micro)
                x = torch.from_numpy(x).to(d.device, non_blocking=True)
                y = torch.from_numpy(y).to(d.device, non_blocking=True)
                with grad_sync(model, strategy, micro == accum - 1):
                    with autocast():
                        _, loss = model(x, y)
                    scaled = loss / accum
                    (scaler.scale(scaled) if scaler else scaled).backward()
                loss_sum += loss.detach()
            if scaler is not None:
                scaler.unscale_(optimizer)
            max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            loss_value, grad_value = all_reduce_sum([float(loss_sum) / accum, float(grad_norm)], d)
            loss_value /= d.world_size
            grad_value /= d.world_size  # identical on every rank already; this keeps it so
            if not math.isfinite(loss_value) or (scaler is None and not math.isfinite(grad_value)):
                where = ckpt.latest_checkpoint(run_dir)
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
            step += 1
            tokens_seen += tokens_per_step
            flops_seen += flops_per_step
            window_steps += 1
            last_loss = loss_value

            if step % cfg.logging.every == 0 or step == steps:
                now = time.perf_counter()
                dt = (now - window_start) / window_steps
                tps = tokens_per_step / dt
                tflops = flops_per_step / dt / d.world_size / 1e12
                mem, mem_label = peak_memory(d.device)
                record = {"kind": "train", "step": step, "tokens": tokens_seen, "flops": flops_seen,
                          "loss": loss_value, "lr": lr, "grad_norm": grad_value, "tokens_per_second": tps,
                          "tflops_per_second": tflops, "mfu": tflops * 1e12 / peak if peak else None,
                          "peak_memory_bytes": mem, "elapsed_seconds": now - run_start}
                if d.is_main:
                    metrics.write(record)
                    log(console_line(record, steps, dt * (steps - step), mem_label))
                window_start, window_steps = time.perf_counter(), 0
            paused = time.perf_counter()  # eval and checkpoint time is not training throughput
            if cfg.eval.every and step % cfg.eval.every == 0 and step < steps:
                last_eval = evaluate(step)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < steps:
                save(step)
            window_start += time.perf_counter() - paused
            stopping = stop.signum is not None
            if d.distributed:
                stopping = all_reduce_sum([1.0 if stopping else 0.0], d)[0] > 0
            if stopping and step < steps:
                path = save(step) if last_saved != step else ckpt.latest_checkpoint(run_dir)
                signum = stop.signum or signal.SIGTERM
                if d.is_main:
                    log(f"scalelab train: stopped at step {step}/{steps} by {signal.Signals(signum).name}; "
                        f"checkpoint {path}; run the same command again to resume")
                return {"exit_code": 128 + int(signum), "step": step, "steps": steps, "loss": last_loss,
                        "checkpoint": str(path), "run_dir": str(run_dir)}

        if cfg.eval.at_end and steps > start_step:
            last_eval = evaluate(step)
        path = save(step) if last_saved != step else ckpt.latest_checkpoint(run_dir)
        final = export_final(run_dir, model, strategy, d)
        if d.is_main:
            log(f"scalelab train: done, {step} steps, {tokens_seen:,} tokens, {flops_seen:.3g} FLOPs; "
                f"checkpoint {path}; final weights {final}")
        return {"exit_code": 0, "step": step, "steps": steps, "loss": last_loss, "tokens": tokens_seen,
                "flops": flops_seen, "val_loss": (last_eval or {}).get("val_loss"),
                "val_bpb": (last_eval or {}).get("val_bpb"), "checkpoint": str(path), "final": str(final),
                "run_dir": str(run_dir)}
    finally:
        if stop is not None:
            stop.restore()
        if metrics is not None:
            metrics.close()


def export_final(run_dir: Path, model: nn.Module, strategy: str, d: Dist) -> Path:
    """RUN_DIR/final: full weights as model.safetensors + model.toml (+ tokenizer), the native
    format `scalelab sample` and `scalelab export-hf` read. FSDP gathers to rank 0 on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from scalelab import hf

    inner = unwrap(model)
    final = run_dir / "final"
    if strategy == "fsdp":
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = dict(inner.state_dict()) if d.is_main else {}
    if d.is_main:
        if inner.config.tie_embeddings:
            sd.pop("lm_head.weight", None)
        with atomic_directory(final) as tmp:
            hf.write_safetensors({k: v.detach().cpu().contiguous() for k, v in sd.items()}, tmp)
            atomic_write_text(tmp / "model.toml", inner.config.to_toml())
            if (run_dir / "tokenizer").is_dir():
                shutil.copytree(run_dir / "tokenizer", tmp / "tokenizer")
                shutil.copy2(run_dir / "data.json", tmp / "data.json")
    barrier(d)
    return final
