"""Training checkpoints: atomic, self-describing, resumable on a different number of ranks.

Layout of RUN_DIR/checkpoints/:

    step_00001000/
        model.toml            the ModelConfig
        model.safetensors     weights (single process / DDP), loadable by `scalelab export-hf`
        optimizer.pt          AdamW state keyed by parameter name (single process / DDP)
        dcp/                  FSDP runs instead: model + optimizer, sharded, torch.distributed.checkpoint
        rng_rank{R}.pt        each rank's torch / CUDA / numpy / Python RNG states
        trainer.pt            step, tokens and FLOPs seen, data loader position, grad scaler, config;
                              written last
    latest                    the name of the newest complete checkpoint (a one-line text file)

Atomicity: everything is written into `.step_00001000.partial/`, which is renamed to its final
name only once complete, and `latest` is then replaced atomically. A crash (or kill -9) at any
moment leaves either the previous checkpoints or the new one, never half of one; a stale
`.partial` directory is ignored and removed by the next save. Every `.pt` file holds only
tensors and plain Python values and is read with `torch.load(weights_only=True)`.

Re-sharding: optimizer state is keyed by parameter name (torch.distributed.checkpoint.state_dict),
and DCP records each tensor's global shape, so a checkpoint written by N ranks (FSDP or DDP)
loads on M ranks with either strategy, or in one process.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from scalelab.errors import UserError
from scalelab.files import atomic_write_text
from scalelab.train.parallel import Dist, barrier, unwrap

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer.pt"
_NAME = re.compile(r"^step_(\d{8,})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under RUN_DIR/checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one."""
    root = Path(run_dir) / CHECKPOINTS
    try:
        name = (root / LATEST).read_text().strip()
        if _NAME.match(name) and (root / name / TRAINER_STATE).is_file():
            return root / name
    except OSError:
        pass
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory (-> its latest checkpoint)."""
    p = Path(path)
    if (p / TRAINER_STATE).is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise UserError(f"{p} is neither a checkpoint nor a run directory with checkpoints")
    return latest


# ---- RNG -----------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- save ----------------------------------------------------------------------------------------

def save_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], *, strategy: str, d: Dist, keep: int) -> Path:
    """Write RUN_DIR/checkpoints/step_<step> atomically (every rank calls this) and keep the newest `keep`."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, get_state_dict

    from scalelab import hf

    root = Path(run_dir) / CHECKPOINTS
    name = checkpoint_name(step)
    final, tmp = root / name, root / f".{name}.partial"
    if d.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(d)
    inner = unwrap(model)
    if strategy == "fsdp":
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / "dcp")
        if d.is_main:
            atomic_write_text(tmp / "model.toml", inner.config.to_toml())
    else:
        optim_sd = get_optimizer_state_dict(model, optimizer)
        if d.is_main:
            hf.save_native(inner, tmp)
            torch.save(optim_sd, tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / f"rng_rank{d.rank}.pt")
    barrier(d)
    if d.is_main:
        torch.save(trainer_state, tmp / TRAINER_STATE)  # last: its presence marks a complete directory
        if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
            old = root / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        atomic_write_text(root / LATEST, name + "\n")
        for _, old_path in list_checkpoints(run_dir)[:-keep]:
            if old_path != final:
                shutil.rmtree(old_path, ignore_errors=True)
    barrier(d)
    return final


# ---- load ----------------------------------------------------------------------------------------

def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    return torch.load(Path(path) / TRAINER_STATE, map_location="cpu", weights_only=True)


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    d: Dist, *, restore_rng: bool = True) -> dict[str, Any]:
    """Restore model (and optimizer) state in place from either layout, on any number of ranks,
    and this rank's RNG states; return the trainer state."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict, set_state_dict)

    from scalelab import hf

    path = Path(path)
    state = load_trainer_state(path)
    if (path / "dcp").is_dir():
        import warnings

        import torch.distributed.checkpoint as dcp

        # One process reading a sharded checkpoint is intended (DCP warns that it assumes so).
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)

        if optimizer is None:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            model_sd = get_model_state_dict(model)
            dcp.load({"model": model_sd}, checkpoint_id=path / "dcp")
            set_model_state_dict(model, model_sd)
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path / "dcp")
            set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    else:
        sd = hf.read_safetensors(path)
        inner = unwrap(model)
        if inner.config.tie_embeddings and "lm_head.weight" not in sd:
            sd["lm_head.weight"] = sd["tok_embeddings.weight"]
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, sd, options=full)
        if optimizer is not None:
            optim_sd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
            set_optimizer_state_dict(model, optimizer, optim_sd, options=full)
    rng_file = path / f"rng_rank{d.rank}.pt"
    if not rng_file.is_file():
        rng_file = path / "rng_rank0.pt"
    if restore_rng and rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return state


def load_model_for_inference(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                             dtype: torch.dtype | None = None, attention: str = "sdpa") -> nn.Module:
    """A Transformer from a trainer checkpoint (either layout), a run directory, or a directory
    holding model.safetensors + model.toml (scalelab.hf's native format)."""
    from scalelab import hf

    p = Path(path)
    if (p / "model.safetensors").is_file() or (p / "config.json").is_file():
        model, _ = hf.load_checkpoint(p, dtype=dtype, device=device, attention=attention)
        return model.eval()
    ckpt = resolve_checkpoint(p)
    if (ckpt / "model.safetensors").is_file():
        model, _ = hf.load_checkpoint(ckpt, dtype=dtype, device=device, attention=attention)
        return model.eval()
    from scalelab.config import ModelConfig
    from scalelab.model import Transformer

    cfg = ModelConfig.from_toml(ckpt / "model.toml")
    model = Transformer(cfg, attention=attention)
    load_checkpoint(ckpt, model, None, Dist(), restore_rng=False)
    return model.to(device=device, dtype=dtype).eval()
