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


# torchtitan's op-level selective checkpointing (torchtitan/distributed/activation_checkpoint.py,
# `_save_list` and `_custom_policy`): inside each block, save the outputs of attention and of every
# other matmul (the 1st, 3rd, ... aten.mm), recompute everything else in backward. The CPU's fused
# SDPA and addmm (a Linear with a bias) are added so the policy means the same on every device.
SELECTIVE_OP_SAVED_ATTENTION = ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
                                "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
SELECTIVE_OP_MATMULS = ("mm", "addmm")


def _selective_op_context():
    """A fresh (forward, recompute) context pair for one checkpointed block call: the matmul
    count restarts at every block, separately for the forward and its recomputation."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    attention = {getattr(aten, name).default for name in SELECTIVE_OP_SAVED_ATTENTION if hasattr(aten, name)}
    matmuls = {getattr(aten, name).default for name in SELECTIVE_OP_MATMULS}
    count = {False: 0, True: 0}

    def policy(ctx, func, *args, **kwargs):
        if func in matmuls:
            count[ctx.is_recompute] += 1
            save = count[ctx.is_recompute] % 2 == 1
        else:
            save = func in attention
        return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def checkpointed_layers(n_layer: int, mode: str, selective_option: str = "op") -> list[int]:
    """Which blocks (0-based) `apply_activation_checkpointing` wraps: none; every block (full, and
    selective by op); every k-th under selective by layer, counting from 1 as torchtitan does
    (k = 2 wraps blocks 1, 3, 5, ...)."""
    if mode == "none":
        return []
    if mode == "selective" and selective_option != "op":
        k = int(selective_option)
        return [i for i in range(n_layer) if (i + 1) % k == 0]
    return list(range(n_layer))


def apply_activation_checkpointing(model: nn.Module, mode: str = "full", selective_option: str = "op") -> None:
    """Recompute blocks in backward (train.activation_checkpointing, docs/memory.md): `full`
    recomputes every block from its input; `selective` with option "op" saves attention's and every
    other matmul's outputs in each block and recomputes the rest; with an integer k it fully
    recomputes every k-th block. The composable API keeps parameter names unchanged, so
    checkpoints are interchangeable with runs without it."""
    from torch.distributed._composable import checkpoint

    by_op = mode == "selective" and selective_option == "op"
    for i in checkpointed_layers(len(model.layers), mode, selective_option):
        if by_op:
            checkpoint(model.layers[i], context_fn=_selective_op_context)
        else:
            checkpoint(model.layers[i])


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
                activation_checkpointing: str, selective_ac_option: str = "op",
                reshard_after_forward: bool = True) -> nn.Module:
    """Wrap `model` (already on d.device, identical on every rank) for `strategy`."""
    if activation_checkpointing != "none":
        apply_activation_checkpointing(model, activation_checkpointing, selective_ac_option)
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
