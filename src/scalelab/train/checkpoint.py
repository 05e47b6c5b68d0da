"""Training checkpoints: atomic, durable, verifiable, resumable on a different number of ranks.

Layout of RUN_DIR/checkpoints/:

    step_00001000/
        model.toml            the ModelConfig
        model.safetensors     weights (single process / DDP), loadable by `scalelab export-hf`
        optimizer.pt          AdamW state keyed by parameter name (single process / DDP)
        dcp/                  sharded layouts (FSDP, TP, PP) instead: model + optimizer, each rank's
                              shards, torch.distributed.checkpoint
        rng_rank{R}.pt        each rank's torch / CUDA / numpy / Python RNG states
        manifest.json         every other file's relative path and size (+ SHA-256 of the small ones)
        trainer.pt            step, tokens and FLOPs seen, data loader position, grad scaler, config;
                              written last: its presence marks a complete directory
    latest                    the name of the newest complete checkpoint (a one-line text file)

Atomicity and durability: everything is written into `.step_00001000.partial/` (a
`files.StagedDirectory` with that agreed name, so every rank writes into it); rank 0 commits it
(fsync of every file and directory, the umask applied, rename, fsync of `checkpoints/`), then
replaces `latest` atomically. A crash, kill -9 or power loss at any moment leaves either the
previous checkpoints or the new one, never half of one; leftovers (`.step_*` hidden directories)
are removed by the next save. A failed write (disk full, quota) raises an OSError naming the
checkpoint, removes the staged directory and leaves the previous checkpoints and `latest` as
they were; every rank learns of one rank's failure, so none waits forever at a barrier.

Integrity: `latest_checkpoint` verifies the checkpoint it returns (`verify_checkpoint`: the
manifest's sizes and small-file hashes, plus each file format's own structure) and falls back,
with one warning, to the newest intact one. Full-content hashes of the weight and optimizer files
are deliberately not taken: for a multi-GB checkpoint that is a full re-read at every save and
every resume (minutes per checkpoint on a shared filesystem), while the failures seen in
practice (a crash, a full disk or an interrupted copy: truncated or missing files) are caught by
the sizes and by the formats' structure, which costs a few small reads: a `.pt` file is a zip
archive whose directory sits at its end, and a safetensors header declares the data length.
Small files (trainer state, RNG states, configs, DCP metadata) are hashed in full.

Every `.pt` file holds only tensors and plain Python values and is read with
`torch.load(weights_only=True)`.

Re-sharding: optimizer state is keyed by parameter name (torch.distributed.checkpoint.state_dict),
and DCP records each tensor's global shape and each shard's offsets, so a checkpoint written by
N ranks with one layout (DDP, FSDP, HSDP, TP, FSDP × TP) loads on M ranks with another, or in one
process. Checkpoints written when K and V were one `attn.kv_proj` projection load too (split on load).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from scalelab.errors import UserError
from scalelab.files import StagedDirectory, atomic_write_bytes, atomic_write_text, remove_tree
from scalelab.model import FUSED_KV, split_fused_kv
from scalelab.train.parallel import Dist, all_reduce_sum, unwrap

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer.pt"
MANIFEST = "manifest.json"
HASHED_MAX_BYTES = 16 * 2**20  # files up to this size get a SHA-256 in the manifest
_NAME = re.compile(r"^step_(\d{8,})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with trainer.pt) under RUN_DIR/checkpoints, oldest first.
    Complete is not verified: see `verify_checkpoint`."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _latest_name(root: Path) -> str | None:
    """The checkpoint name the `latest` file holds, or None if it is missing or unreadable."""
    try:
        name = (root / LATEST).read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if _NAME.match(name) else None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def latest_checkpoint(run_dir: str | os.PathLike, *,
                      warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest intact checkpoint: the one `latest` names, else the newest complete one, each
    verified (`verify_checkpoint`); a damaged one is skipped with one warning (to `warn`, default
    stderr) naming it and why. None if the run has no complete checkpoint; a UserError if it has
    some but none is intact."""
    warn = warn or _stderr
    root = Path(run_dir) / CHECKPOINTS
    found = [p for _, p in reversed(list_checkpoints(run_dir))]
    named = _latest_name(root)
    candidates = sorted(found, key=lambda p: p.name != named)  # `latest`'s first, then newest first
    skipped = []
    for path in candidates:
        problem = verify_checkpoint(path)
        if problem is None:
            if skipped:
                warn(f"scalelab: warning: skipping damaged checkpoint{'s' if len(skipped) > 1 else ''} "
                     + "; ".join(f"{p} ({why})" for p, why in skipped) + f"; using {path}")
            return path
        skipped.append((path, problem))
    if skipped:
        raise UserError(f"{root}: no intact checkpoint ("
                        + "; ".join(f"{p.name}: {why}" for p, why in skipped)
                        + f"); move {root} aside to start the run afresh, or train into a new --run-dir")
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory (verified), or a run directory (-> its newest intact checkpoint)."""
    p = Path(path)
    if (p / TRAINER_STATE).is_file():
        problem = verify_checkpoint(p)
        if problem is not None:
            fix = (f"pass the run directory {p.parent.parent} to use its newest intact checkpoint"
                   if p.parent.name == CHECKPOINTS else "use another checkpoint")
            raise UserError(f"{p}: damaged checkpoint ({problem}); {fix}")
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise UserError(_not_a_run_message(p))
    return latest


def _not_a_run_message(p: Path) -> str:
    """Why `p` holds no checkpoint, naming the run below it when there is one (a `scalelab demo`
    output directory's run is DIR/run)."""
    if not p.exists():
        return f"{p}: no such checkpoint or run directory"
    if not p.is_dir():
        return f"{p} is a file, not a checkpoint or run directory"
    below = _runs_below(p)
    if below:
        shown = ", ".join(map(str, below[:4])) + (f" and {len(below) - 4} more" if len(below) > 4 else "")
        hint = f"its run is {below[0]}; pass that" if len(below) == 1 else \
            f"the runs below it are {shown}; pass one of them"
        return f"{p} is not a run directory with checkpoints; {hint}"
    return (f"{p} is neither a checkpoint nor a run directory with checkpoints (expected {p / CHECKPOINTS} "
            f"or {p / TRAINER_STATE})")


def _runs_below(p: Path, depth: int = 2) -> list[Path]:
    """Run directories (with checkpoints or final weights) up to `depth` levels below `p`."""
    runs: list[Path] = []
    level = [p]
    for _ in range(depth):
        level = sorted(c for d in level for c in _subdirectories(d))
        for c in level:
            if list_checkpoints(c) or (c / "final" / "model.safetensors").is_file():
                runs.append(c)
        level = [c for c in level if c not in runs]
        if runs:
            break
    return runs


def _subdirectories(d: Path) -> list[Path]:
    try:
        return [c for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")]
    except OSError:  # unreadable: nothing to suggest there
        return []


# ---- verification --------------------------------------------------------------------------------

def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """None if the checkpoint directory looks intact, else a short reason (which file, what is
    wrong). Checks the manifest (sizes; SHA-256 of small files) where the checkpoint has one,
    then, for every checkpoint old or new, that the files a resume reads exist and that each
    `.pt` / `.safetensors` file is structurally whole. Reads only small files and file ends."""
    path = Path(path)
    if (path / MANIFEST).exists():
        problem = _check_manifest(path)
        if problem is not None:
            return problem
    required = [TRAINER_STATE, "rng_rank0.pt", "model.toml"]
    if (path / "dcp").is_dir():
        required.append("dcp/.metadata")
    else:
        weights = "model.safetensors.index.json" if (path / "model.safetensors.index.json").is_file() \
            else "model.safetensors"
        required += [weights, "optimizer.pt"]
    for rel in required:
        if not (path / rel).is_file():
            return f"{rel} is missing"
    for file in sorted(path.rglob("*")):
        rel = file.relative_to(path).as_posix()
        problem = None
        if file.suffix == ".pt":
            problem = _check_zip(file)
        elif file.suffix == ".safetensors":
            problem = _check_safetensors(file)
        if problem is not None:
            return f"{rel} {problem}"
    return None


def _check_manifest(path: Path) -> str | None:
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        entries = [(rel, int(e["size"]), e.get("sha256")) for rel, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    for rel, size, digest in entries:
        file = path / rel
        if not file.is_file():
            return f"{rel} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{rel} is {actual} bytes, the manifest says {size}" + (" (truncated)" if actual < size else "")
        if digest is not None and _sha256(file) != digest:
            return f"{rel} does not match its SHA-256 in the manifest"
    return None


def _check_zip(file: Path) -> str | None:
    """torch.save's format is a zip archive whose central directory is at the end: a truncated
    file loses it (torch.load would fail with 'failed finding central directory')."""
    try:
        with zipfile.ZipFile(file) as z:
            size = file.stat().st_size
            if any(i.header_offset + i.compress_size > size for i in z.infolist()):
                return "is truncated"
    except (zipfile.BadZipFile, OSError, ValueError):
        return "is not a readable PyTorch file (truncated or damaged)"
    return None


def _check_safetensors(file: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header whose data offsets give the
    data length, then the data: its size must be exactly the sum."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                return "is truncated"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return "is not a readable safetensors file (truncated or damaged)"
    expected = 8 + n + end
    if size != expected:
        return f"is {size} bytes, its header says {expected}" + (" (truncated)" if size < expected else "")
    return None


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(directory: Path, extra: dict[str, bytes]) -> dict[str, Any]:
    """Relative path -> size (+ sha256 up to HASHED_MAX_BYTES) of every file in `directory`, and of
    the `extra` files about to be written there from memory."""
    files: dict[str, dict[str, Any]] = {}
    for file in sorted(directory.rglob("*")):
        if file.is_file() and not file.is_symlink():
            size = file.stat().st_size
            entry: dict[str, Any] = {"size": size}
            if size <= HASHED_MAX_BYTES:
                entry["sha256"] = _sha256(file)
            files[file.relative_to(directory).as_posix()] = entry
    for rel, data in extra.items():
        files[rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return {"format": 1, "files": files}


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

def _save_pt(obj: Any, file: Path) -> None:
    """torch.save through a Python file object, so a failed write raises the OSError the system
    gave (ENOSPC, EDQUOT...; torch.save to a path says only 'unexpected pos'), then fsync: on a
    shared filesystem the rank that wrote a file is the one that must flush it."""
    with open(file, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _os_error_in(e: BaseException) -> OSError | None:
    """The OSError with an errno behind a failed write: `e` itself, its cause or context, or one
    rank's failure inside a torch.distributed.checkpoint CheckpointException."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno is not None:
            return x
        todo += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return None


def _collectively(d: Dist, final: Path, write: Callable[[], None]) -> None:
    """Run this rank's part of writing checkpoint `final`, then agree with every rank on whether
    all succeeded (an all-reduce, which is also the barrier between the phases). A rank whose write
    failed raises it (an OSError renamed to name `final`); the others raise too, rather than wait
    forever for a rank that has given up."""
    from torch.distributed.checkpoint.api import CheckpointException

    error: BaseException | None = None
    try:
        write()
    except (Exception, CheckpointException) as e:
        error = e
    failed = all_reduce_sum([0.0 if error is None else 1.0], d)[0]
    if error is not None:
        os_error = _os_error_in(error)
        if os_error is None:
            raise error
        raise OSError(os_error.errno, os_error.strerror or str(os_error), str(final)) from error
    if failed:
        raise RuntimeError(f"checkpoint {final}: another rank failed to write its part (see its error)")


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], *, strategy: str, d: Dist, keep: int) -> Path:
    """Write RUN_DIR/checkpoints/step_<step> atomically and durably (every rank calls this) and keep
    the newest `keep` at or below `step`."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, get_state_dict

    from scalelab import hf

    root = Path(run_dir) / CHECKPOINTS
    name = checkpoint_name(step)
    final = root / name
    staged = StagedDirectory(final, name=f".{name}.partial", create=False)

    def stage() -> None:
        if d.is_main:
            StagedDirectory.remove_stale(final, pattern=".step_*")  # crashed saves' and prunes' leftovers
            StagedDirectory(final, name=staged.path.name)

    def write_state() -> None:
        inner = unwrap(model)
        if strategy not in ("none", "ddp"):  # sharded layouts (FSDP, HSDP, TP, PP): each rank its part
            import torch.distributed.checkpoint as dcp

            model_sd, optim_sd = get_state_dict(model, optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=staged.path / "dcp")
            if d.is_main:
                atomic_write_text(staged.path / "model.toml", inner.config.to_toml())
        else:
            optim_sd = get_optimizer_state_dict(model, optimizer)
            if d.is_main:
                hf.save_native(inner, staged.path)
                _save_pt(optim_sd, staged.path / "optimizer.pt")
        _save_pt(rng_state(), staged.path / f"rng_rank{d.rank}.pt")

    def commit() -> None:
        if d.is_main:
            buffer = io.BytesIO()
            torch.save(trainer_state, buffer)
            state_bytes = buffer.getvalue()
            manifest = _manifest(staged.path, {TRAINER_STATE: state_bytes})
            atomic_write_text(staged.path / MANIFEST, json.dumps(manifest, indent=1) + "\n")
            atomic_write_bytes(staged.path / TRAINER_STATE, state_bytes)  # last: marks the directory complete
            staged.commit()  # replaces an existing step_<step> (a re-save) only now
            atomic_write_text(root / LATEST, name + "\n")
            _prune(run_dir, step, keep)

    try:
        _collectively(d, final, stage)
        _collectively(d, final, write_state)
        _collectively(d, final, commit)
    except BaseException:
        if d.is_main:
            staged.abort()  # a no-op once committed: the previous checkpoints and `latest` stay as they were
        raise
    return final


def _prune(run_dir: str | os.PathLike, step: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints at or below `step`. Checkpoints above `step` belong to
    a timeline the run abandoned (it resumed from before them because they were damaged) and go
    too. Each is first renamed to a hidden name, so a crash mid-delete never leaves a
    half-deleted directory that looks complete; the next save removes what remains."""
    found = list_checkpoints(run_dir)
    below = [p for s, p in found if s <= step]
    doomed = [p for s, p in found if s > step] + below[:-keep]
    for path in doomed:
        remove_tree(path, ignore_errors=True)


# ---- load ----------------------------------------------------------------------------------------

def _load_pt(file: Path) -> Any:
    """torch.load(weights_only=True), with a damaged file reported as a UserError naming it."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{file}: damaged checkpoint file ({first}); delete {file.parent} to use the "
                        "previous checkpoint") from None


def split_fused_kv_optimizer(optim_sd: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter name (get_optimizer_state_dict's form) from a
    checkpoint written when K and V were one `attn.kv_proj`: each such parameter's moments split
    like the weight (model.split_fused_kv), its step count kept for both halves."""
    state = {}
    for name, entry in optim_sd["state"].items():
        if FUSED_KV not in name:
            state[name] = entry
            continue
        # a scalar (AdamW's step count, a tensor the optimizer increments in place) is copied, not shared
        halves = {key: value.chunk(2, dim=0) if torch.is_tensor(value) and value.dim() else
                  (value, value.clone() if torch.is_tensor(value) else value) for key, value in entry.items()}
        for i, part in enumerate(("attn.k_proj.", "attn.v_proj.")):
            state[name.replace(FUSED_KV, part)] = {key: pair[i] for key, pair in halves.items()}
    groups = [{**group, "params": [new for name in group["params"]
                                   for new in ([name] if FUSED_KV not in name else
                                               [name.replace(FUSED_KV, "attn.k_proj."),
                                                name.replace(FUSED_KV, "attn.v_proj.")])]}
              for group in optim_sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    return _load_pt(Path(path) / TRAINER_STATE)


def _dcp_load(directory: Path, model_sd: dict[str, Any], optim_sd: dict[str, Any] | None, no_dist: bool) -> None:
    """dcp.load into these state dicts (as get_state_dict gives them: this layout's shards), in
    place. A checkpoint written when K and V were one `attn.kv_proj` projection is read by loading
    each fused tensor (and its optimizer moments) whole, splitting it (model.split_fused_kv) and
    giving each rank its shard of the halves."""
    import torch.distributed.checkpoint as dcp

    stored = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    fused = sorted({name for name in model_sd if f"model.{_fused_name(name)}" in stored and _fused_name(name) != name})
    if not fused:
        dcp.load({"model": model_sd} if optim_sd is None else {"model": model_sd, "optim": optim_sd},
                 checkpoint_id=directory, no_dist=no_dist)
        return
    halves = {_fused_name(name) for name in fused}

    def whole(key: str) -> torch.Tensor:
        meta = stored[key]
        return torch.empty(meta.size, dtype=meta.properties.dtype)

    request: dict[str, Any] = {"model": {k: v for k, v in model_sd.items() if k not in fused}}
    request["model"].update({name: whole(f"model.{name}") for name in halves})
    if optim_sd is not None:
        names = [list(group["params"]) for group in optim_sd["param_groups"]]
        state = {k: v for k, v in optim_sd["state"].items() if k not in fused}
        state.update({name: {key: whole(f"optim.state.{name}.{key}") for key in optim_sd["state"][fused[0]]}
                      for name in halves})
        request["optim"] = {"state": state, "param_groups": optim_sd["param_groups"]}
    dcp.load(request, checkpoint_id=directory, no_dist=no_dist)

    def placed(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:  # this rank's shard, no communication
        if hasattr(like, "placements"):
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
        return full.to(like.device)

    split = split_fused_kv(request["model"])
    for name in fused:
        model_sd[name] = placed(split[name], model_sd[name])
    if optim_sd is not None:
        moments = split_fused_kv_optimizer({"state": request["optim"]["state"], "param_groups": []})["state"]
        for name in fused:
            optim_sd["state"][name] = {key: placed(value, optim_sd["state"][name][key]) if value.dim() else value
                                       for key, value in moments[name].items()}
        for group, params in zip(optim_sd["param_groups"], names):
            group["params"] = params  # dcp.load put the checkpoint's (fused) parameter names there


def _fused_name(name: str) -> str:
    """The name a k_proj or v_proj parameter had when K and V were one kv_proj (others unchanged)."""
    return name.replace("attn.k_proj.", FUSED_KV).replace("attn.v_proj.", FUSED_KV)


def _optimizer_part(optim_sd: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """A full optimizer state dict (keyed by parameter name) restricted to the parameters `names`,
    each group keeping its own order (what a pipeline rank's optimizer holds of the whole model's)."""
    return {"state": {k: v for k, v in optim_sd["state"].items() if k in names},
            "param_groups": [{**g, "params": [p for p in g["params"] if p in names]} for g in optim_sd["param_groups"]]}


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

        # One process reading a sharded checkpoint is intended (DCP warns that it assumes so); so is
        # one rank of a run reading it alone (a pipeline's final export): no_dist keeps DCP from
        # waiting for the other ranks in a collective.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        no_dist = not d.distributed

        if optimizer is None:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            model_sd = get_model_state_dict(model)
            _dcp_load(path / "dcp", model_sd, None, no_dist)
            set_model_state_dict(model, model_sd)
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            _dcp_load(path / "dcp", model_sd, optim_sd, no_dist)
            set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    else:
        sd = split_fused_kv(hf.read_safetensors(path))
        inner = unwrap(model)
        if inner.config.tie_embeddings and "lm_head.weight" not in sd:
            sd["lm_head.weight"] = sd["tok_embeddings.weight"]
        full = StateDictOptions(full_state_dict=True)
        held = set(inner.state_dict())  # a pipeline rank holds only its stages' parameters
        set_model_state_dict(model, {k: v for k, v in sd.items() if k in held}, options=full)
        if optimizer is not None:
            optim_sd = split_fused_kv_optimizer(_load_pt(path / "optimizer.pt"))
            set_optimizer_state_dict(model, optimizer, _optimizer_part(optim_sd, held), options=full)
    rng_file = path / f"rng_rank{d.rank}.pt"
    if not rng_file.is_file():
        rng_file = path / "rng_rank0.pt"
    if restore_rng and rng_file.is_file():
        set_rng_state(_load_pt(rng_file))
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
