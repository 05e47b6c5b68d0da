"""How a model is spread over processes: the process group, the device mesh, DDP, FSDP2 / HSDP,
tensor parallelism, activation checkpointing and torch.compile. Separate from the model (which
knows nothing of this) and from the trainer (which builds one `ParallelDims` from the run's
`scalelab.layout.Layout` and asks it for everything layout-dependent: the data-parallel rank,
the wrappers, gradient sync, clipping, the loss context and the checkpoint format).

- One process (no torchrun, or WORLD_SIZE=1): the plain module.
- DDP: every rank holds the whole model; gradients are all-reduced in buckets during backward.
- FSDP2 (`torch.distributed.fsdp.fully_shard`): each transformer block, then the root (embeddings,
  final norm, lm_head), is sharded over ranks; parameters are all-gathered just in time and
  gradients reduce-scattered. `MixedPrecisionPolicy` computes in bf16 and reduces in fp32.
- Gradient accumulation: DDP all-reduces on the last micro-step only (`no_sync`); FSDP2
  reduce-scatters on every micro-step (torchtitan's choice: only sharded gradients accumulate),
  and HSDP all-reduces over replicas on the last only (`set_requires_all_reduce`).
- Tensor parallelism (`apply_tp`, DTensor, as torchtitan's parallelize_llama): Q/K/V, gate and up
  column-wise, O and down row-wise, so attention and the FFN need one all-reduce (or, with
  sequence parallelism, one all-gather + one reduce-scatter) each; the token embedding row-wise
  and lm_head column-wise over the vocabulary. FSDP2 then shards the TP-sharded parameters over
  the data dimensions (2-D), as torchtitan composes them.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from scalelab.errors import UserError, describe_os_error
from scalelab.layout import MESH_KEYS, Layout


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
    """The old `[parallel] strategy` as none / ddp / fsdp for this world size (Layout.from_strategy:
    auto is ddp under torchrun, ddp over one process is the plain model, fsdp needs torchrun)."""
    return ParallelDims.strategy_of(Layout.from_strategy(strategy, world_size))


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
               reshard_after_forward: bool = True, mesh: Any = None) -> nn.Module:
    """fully_shard each block, then the root, over `mesh` (default: all world_size ranks; a 2-D
    (dp_replicate, dp_shard) mesh is HSDP; parameters already sharded by TP become 2-D DTensors)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = mesh if mesh is not None else init_device_mesh(device.type, (world_size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and i < n - 1)
    # So are the root's (embeddings, final norm, lm_head: the loss's backward runs first). An explicit
    # True would free and re-gather them between forward and backward (torch >= 2.8 keeps the root
    # gathered only when reshard_after_forward is left to its default).
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return model


def apply_tp(model: nn.Module, tp_mesh: Any, *, sequence_parallel: bool, loss_parallel: bool) -> nn.Module:
    """Tensor parallelism over `tp_mesh`, in place (parameter names unchanged; parameters become
    DTensors). Between blocks the residual stream is split over the sequence (sequence_parallel:
    norms run on their slice, activations ÷ tp) or replicated. Attention and the FFN take it
    whole (all-gather), run on their own heads / FFN columns, and give it back reduced (all-reduce,
    or reduce-scatter onto sequence slices). The vocabulary is sharded: the embedding row-wise,
    lm_head column-wise, its logits gathered (or, with loss_parallel, left sharded for
    `torch.distributed.tensor.parallel.loss_parallel`). Learned positions are replicated and
    each rank adds its slice. A tied lm_head is tied again to the (identically sharded) embedding."""
    from torch.distributed.tensor import Replicate, Shard, distribute_module
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    between = Shard(1) if sequence_parallel else Replicate()  # the residual stream's layout between blocks
    root: dict[str, Any] = {  # a pipeline stage may hold neither (scalelab.train.pipeline.StageModule)
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=between),
        "lm_head": ColwiseParallel(input_layouts=between, output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                   use_local_output=not loss_parallel),
    }
    root = {name: plan for name, plan in root.items() if getattr(model, name) is not None}
    if sequence_parallel and model.norm is not None:
        root["norm"] = SequenceParallel()
    parallelize_module(model, tp_mesh, root)
    if model.pos_embeddings is not None:
        def positions_in(module, inputs, mesh):
            from torch.distributed.tensor import DTensor

            return (DTensor.from_local(inputs[0], mesh, [Replicate()], run_check=False),)

        def positions_out(module, out, mesh):  # this rank's slice of the sequence, as a plain tensor
            return (out.redistribute(placements=[Shard(0)]) if sequence_parallel else out).to_local()

        distribute_module(model.pos_embeddings, tp_mesh, input_fn=positions_in, output_fn=positions_out)
    for block in model.layers:
        plan: dict[str, Any] = {
            "attn": PrepareModuleInput(input_layouts=(between, None, None), desired_input_layouts=(Replicate(), None, None)),
            "attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(output_layouts=between),
            "ffn": PrepareModuleInput(input_layouts=(between,), desired_input_layouts=(Replicate(),)),
            "ffn.up": ColwiseParallel(), "ffn.down": RowwiseParallel(output_layouts=between),
        }
        if block.ffn.swiglu:
            plan["ffn.gate"] = ColwiseParallel()
        if sequence_parallel:
            plan["attn_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        parallelize_module(block, tp_mesh, plan)
    model.tie_weights()
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer inside a DDP wrapper (FSDP2 and compile-per-block keep the module itself)."""
    return model.module if hasattr(model, "no_sync") and hasattr(model, "module") else model


class ParallelDims:
    """The run's Layout on this process: the only place that knows which wrappers a layout needs.

    Mesh (built by `build_mesh` once the process group exists, from the dimensions of size > 1, as
    torchtitan does): pp × dp_replicate × dp_shard × tp, outermost first, so tp peers are
    neighbouring ranks (one node) and a rank's coordinates follow from its number alone
    (`coordinate`). "dp" is dp_replicate × dp_shard flattened: the data loader's world.
    """

    def __init__(self, layout: Layout, d: Dist):
        if layout.world != d.world_size:
            raise AssertionError(f"layout {layout} is for {layout.world} processes, not {d.world_size}")
        self.layout, self.d = layout, d
        self.mesh: Any = None

    # ---- what the layout means here (no process group needed) ------------------------------------
    @property
    def strategy(self) -> str:
        return self.strategy_of(self.layout)

    @staticmethod
    def strategy_of(lay: Layout) -> str:
        """A name for logs and the trainer state: none, ddp, fsdp for the old degenerate cases,
        else the layout (e.g. "dp_shard 2 × tp 2")."""
        if lay.world == 1:
            return "none"
        if lay.is_ddp:
            return "ddp"
        if lay.dp_shard == lay.world:
            return "fsdp"
        return lay.describe()

    def coordinate(self, name: str) -> int:
        """This rank's index along mesh dimension `name` (row-major over MESH_KEYS)."""
        sizes = [getattr(self.layout, k) for k in MESH_KEYS]
        i = MESH_KEYS.index(name)
        inner = math.prod(sizes[i + 1:])
        return self.d.rank // inner % sizes[i]

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def dp_rank(self) -> int:
        """This rank's place among the data-parallel ranks (tp and pp peers share it: same batch)."""
        return self.coordinate("dp_replicate") * self.layout.dp_shard + self.coordinate("dp_shard")

    @property
    def sharded(self) -> bool:
        """Parameters are DTensors or stage-local (FSDP, TP or PP): the model is built on the meta
        device and filled from rank 0, and checkpoints go through DCP."""
        lay = self.layout
        return lay.uses_fsdp or lay.tp > 1 or lay.pp > 1

    @property
    def autocast(self) -> bool:
        """Whether bf16/fp16 runs use torch.autocast (FSDP's MixedPrecisionPolicy casts instead)."""
        return not self.layout.uses_fsdp

    # ---- the mesh and the wrappers --------------------------------------------------------------
    def build_mesh(self) -> Any:
        from torch.distributed.device_mesh import init_device_mesh

        lay = self.layout
        names = tuple(k for k in MESH_KEYS if getattr(lay, k) > 1)
        if self.mesh is None and names and not lay.is_ddp:
            self.mesh = init_device_mesh(self.d.device.type, tuple(getattr(lay, k) for k in names),
                                         mesh_dim_names=names)
            dp_names = tuple(k for k in ("dp_replicate", "dp_shard") if k in names)
            if len(dp_names) > 1:
                self.mesh[dp_names]._flatten("dp")
        return self.mesh

    def submesh(self, *names: str) -> Any:
        """The mesh over these dimensions (those of size 1 left out; None if all are)."""
        present = tuple(k for k in names if getattr(self.layout, k) > 1)
        if not present:
            return None
        return self.build_mesh()[present if len(present) > 1 else present[0]]

    def parallelize(self, model: nn.Module, *, dtype: str, compile: bool, activation_checkpointing: str = "none",
                    selective_ac_option: str = "op", reshard_after_forward: bool = True) -> nn.Module:
        """Wrap `model` (identical on every rank, or on the meta device when `sharded`) in torchtitan's
        order: tensor parallelism, activation checkpointing, compile, then FSDP2 / HSDP on the data
        dimensions (or DDP when the layout is replicas only)."""
        lay, d = self.layout, self.d
        if lay.tp > 1:
            model.loss_chunk_tokens = 0  # the vocabulary is sharded instead: see docs/parallelism.md
            apply_tp(model, self.submesh("tp"), sequence_parallel=lay.sequence_parallel,
                     loss_parallel=lay.loss_parallel)
        mode = {False: "none", True: "full"}.get(activation_checkpointing, activation_checkpointing)  # old bools
        if mode != "none":
            apply_activation_checkpointing(model, mode, selective_ac_option)
        if compile:
            apply_compile(model)
        if lay.uses_fsdp:
            param_dtype = torch.bfloat16 if dtype == "bf16" else None
            return apply_fsdp(model, d.world_size, d.device, param_dtype, reshard_after_forward,
                              mesh=self.submesh("dp_replicate", "dp_shard"))
        if lay.is_ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        return model

    @contextlib.contextmanager
    def grad_sync(self, model: nn.Module, sync: bool):
        """Gradient reduction around one micro-step; `sync` on the last of an optimizer step. DDP
        all-reduces only then (no_sync before: each rank's .grad accumulates at full size anyway).
        FSDP2 reduce-scatters every micro-step, as torchtitan does, so that only sharded gradients
        accumulate: skipping it would keep every gradient unsharded in fp32 until the last one
        (4 bytes per parameter on every device); HSDP's all-reduce over replicas waits for the last."""
        if self.layout.is_ddp and not sync:
            with model.no_sync():
                yield
            return
        if self.layout.uses_fsdp and self.layout.dp_replicate > 1:
            model.set_requires_all_reduce(sync)
        yield

    def loss_context(self):
        """Forward and backward of the loss run inside this (loss_parallel for vocabulary-sharded logits)."""
        if self.layout.tp > 1 and self.layout.loss_parallel:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return contextlib.nullcontext()

    def clip_grad_norm_(self, parameters: Any, max_norm: float) -> torch.Tensor:
        """Clip to `max_norm` the global 2-norm of every gradient, exactly as one process would:
        DTensor gradients count each shard once (their norm is reduced over their own mesh, FSDP's
        and TP's dimensions alike), replicated ones once. Returns the norm (a plain tensor).

        First each DTensor gradient is given its parameter's placements, once per step: under TP
        alone autograd leaves a sequence-parallel norm's gradient Partial (one all-reduce here
        instead of one inside every optimizer op) and the row-wise embedding's Replicate (sliced
        here to its shard, so the optimizer updates only its rows)."""
        parameters = list(parameters)
        for p in parameters:
            if p.grad is not None and hasattr(p.grad, "placements") and p.grad.placements != p.placements:
                p.grad = p.grad.redistribute(placements=p.placements)
        pp_group = self.submesh("pp").get_group() if self.layout.pp > 1 else None
        return clip_grad_norm_(parameters, max_norm, pp_group)


def as_plain(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value as a plain tensor (the loss under loss_parallel is a replicated DTensor)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def clip_grad_norm_(parameters: Any, max_norm: float, pp_group: Any = None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for gradients that may be DTensors on different meshes (TP's
    and FSDP's 2-D mesh beside, e.g., FSDP's 1-D one) or plain tensors: the norm of each group of
    gradients on one mesh is reduced over that mesh (`full_tensor`), the groups' squares summed.
    Under a pipeline each rank holds only its stages' parameters: the squared norms of the
    `pp_group`'s ranks are summed too. The clip coefficient is torch's: max_norm / (norm + 1e-6),
    at most 1."""
    grads = [p.grad for p in parameters if p.grad is not None]
    groups: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault(getattr(g, "device_mesh", None), []).append(g)
    norms = []
    for gs in groups.values():
        norm = torch.nn.utils.get_total_norm(gs, 2.0)
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not norms:
        norms = [torch.zeros(())]
    total = norms[0] if len(norms) == 1 else torch.stack([n.float() ** 2 for n in norms]).sum().sqrt()
    if pp_group is not None:
        squared = total.double() ** 2
        dist.all_reduce(squared, group=pp_group)
        total = squared.sqrt().to(norms[0].dtype)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for gs in groups.values():
        for g in gs:
            (g.to_local() if hasattr(g, "to_local") else g).mul_(coef.to(g.device))
    return total


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
