"""How a model is spread over processes: the process group, DDP or FSDP2, activation
checkpointing and torch.compile. Separate from the model (which knows nothing of this) and
from the trainer (which calls `parallelize` once and `grad_sync` around each micro-step).

- One process (no torchrun, or WORLD_SIZE=1): the plain module.
- DDP: every rank holds the whole model; gradients are all-reduced in buckets during backward.
- FSDP2 (`torch.distributed.fsdp.fully_shard`): each transformer block, then the root (embeddings,
  final norm, lm_head), is sharded over ranks; parameters are all-gathered just in time and
  gradients reduce-scattered. `MixedPrecisionPolicy` computes in bf16 and reduces in fp32.
- Gradient accumulation syncs only on the last micro-step (DDP `no_sync`, FSDP2
  `set_requires_gradient_sync(False)`), so a step costs one reduction however many micro-steps.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from scalelab.errors import UserError, describe_os_error


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device = cuda but no CUDA GPU is visible; use device = \"auto\" or \"cpu\"")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("train.device = mps but MPS is not available; use device = \"auto\" or \"cpu\"")
    return torch.device(name)


def init_distributed(device_name: str, backend: str = "auto") -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if world > 1 and device.type == "mps":
        raise UserError("distributed training on MPS is not supported; run one process or use cpu/cuda")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30), **kwargs)
    return Dist(rank=rank, local_rank=local_rank, world_size=world, device=device)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_strategy(strategy: str, world_size: int) -> str:
    if strategy == "auto":
        return "ddp" if world_size > 1 else "none"
    if strategy == "ddp" and world_size == 1:
        return "none"  # DDP over one process is the plain model
    if strategy == "fsdp" and world_size == 1:
        raise UserError("parallel.strategy = fsdp shards over processes: launch with torchrun "
                        "(torchrun --nproc_per_node=N -m scalelab train ...), or use parallel.strategy = none "
                        "(or auto) in one process")
    return strategy


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward. The composable API keeps parameter names unchanged,
    so checkpoints are interchangeable with runs without it."""
    from torch.distributed._composable import checkpoint

    for block in model.layers:
        checkpoint(block)


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place (names unchanged; the repeated block compiles once)."""
    for block in model.layers:
        block.compile()


def apply_fsdp(model: nn.Module, world_size: int, device: torch.device, param_dtype: torch.dtype | None,
               reshard_after_forward: bool = True) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and i < n - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def parallelize(model: nn.Module, strategy: str, d: Dist, *, dtype: str, compile: bool,
                activation_checkpointing: bool, reshard_after_forward: bool = True) -> nn.Module:
    """Wrap `model` (already on d.device, identical on every rank) for `strategy`."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if strategy == "fsdp":
        param_dtype = torch.bfloat16 if dtype == "bf16" else None
        return apply_fsdp(model, d.world_size, d.device, param_dtype, reshard_after_forward)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer inside a DDP wrapper (FSDP2 and compile-per-block keep the module itself)."""
    return model.module if hasattr(model, "no_sync") and hasattr(model, "module") else model


@contextlib.contextmanager
def grad_sync(model: nn.Module, strategy: str, sync: bool):
    """Reduce gradients only when `sync` (the last micro-step of an optimizer step)."""
    if strategy == "ddp" and not sync:
        with model.no_sync():
            yield
        return
    if strategy == "fsdp":
        model.set_requires_gradient_sync(sync)
    yield


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    """Sum Python floats over ranks (float64, on the device the backend needs)."""
    if not d.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def agree(error: str | None, d: Dist) -> None:
    """Every rank calls this with its own verdict (None = fine); if any rank found a problem, every
    rank raises the same UserError (the lowest such rank's message), so none is left waiting in a
    collective for one that gave up."""
    if d.distributed:
        verdicts: list[str | None] = [None] * d.world_size
        dist.all_gather_object(verdicts, error)
        error = next((v for v in verdicts if v is not None), None)
    if error is not None:
        raise UserError(error)


def decide_on_main(decide: Callable[[], Any], d: Dist) -> Any:
    """Run `decide` on rank 0 only and give its result to every rank. A UserError or OSError it
    raises becomes the same UserError on every rank; any other exception is re-raised on rank 0
    and reported as a RuntimeError on the others. Either way no rank hangs in a collective."""
    if not d.distributed:
        return decide()
    verdict: list[Any] = [None, None, None]  # result, user error, other failure
    if d.is_main:
        try:
            verdict[0] = decide()
        except UserError as e:
            verdict[1] = str(e)
        except OSError as e:
            verdict[1] = describe_os_error(e)
        except Exception as e:
            verdict[2] = f"{type(e).__name__}: {e}"
            dist.broadcast_object_list(verdict, src=0)
            raise
    dist.broadcast_object_list(verdict, src=0)
    result, user_error, failure = verdict
    if user_error is not None:
        raise UserError(user_error)
    if failure is not None:
        raise RuntimeError(f"rank 0 failed: {failure}")
    return result


def barrier(d: Dist) -> None:
    if d.distributed:
        dist.barrier()
