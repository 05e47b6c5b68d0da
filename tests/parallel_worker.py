"""Run several training layouts in ONE torchrun launch (each launch costs seconds of startup on a
shared CPU): `torchrun --nproc_per_node=N tests/parallel_worker.py SPEC.json`.

SPEC: {"runs": [{"name": NAME, "config": PATH, "run_dir": PATH, "overrides": ["parallel.tp=2", ...],
                 "measure": false, "restart_from": null}], "out": DIR}
"restart_from": {"run_dir": PATH, "step": K}: the run first gets a copy of that earlier run's
checkpoint at step K (and its config), so it resumes from there with its own layout.
Each run trains with the real Trainer (the same build / train_step / checkpoint / finish as
`scalelab train`) on a ParallelDims of its own layout, inside the one process group. With
"measure", after training each rank writes to OUT/<name>.rank<R>.json what it really holds: the
bytes of its local shards of the weights, of the gradients of one more forward/backward, and of
the optimizer's moments, and the bytes autograd saves for backward in one forward (distinct
non-parameter storages, as tests/test_memory.py measures them).
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import torch


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (the tensor itself otherwise), its collective waited for."""
    t = getattr(t, "_local_tensor", t)
    return t.trigger_wait() if hasattr(t, "trigger_wait") else t


def nbytes(tensors) -> int:
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def saved_bytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_context) -> int:
    params = {local(p).untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = local(t).untyped_storage()
        if s.data_ptr() not in params and not isinstance(t, torch.nn.Parameter):
            storages[s.data_ptr()] = s
        return t

    with loss_context(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, y)[1]
    with loss_context():
        loss.backward()
    return sum(s.nbytes() for s in storages.values())


def measure(trainer) -> dict:
    model, optimizer, dims = trainer.model, trainer.optimizer, trainer.dims
    x, y = (torch.from_numpy(a) for a in trainer.loader.get_batch(0, 0))
    optimizer.zero_grad(set_to_none=True)
    if trainer.pipeline is None:
        activations = saved_bytes(model, x, y, dims.loss_context)
    else:  # a pipeline rank: the gradients of one schedule step over the local batch (its stages only)
        import numpy as np

        batches = [trainer.loader.get_batch(0, m) for m in range(trainer.accum)]
        x, y = (torch.from_numpy(np.concatenate(a)) for a in zip(*batches))
        with dims.loss_context():
            trainer.pipeline.step(x, y)
        activations = None
    dims.clip_grad_norm_(model.parameters(), float("inf"))  # the gradients as the optimizer step sees them
    moments = [v for state in optimizer.state.values() for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")]
    out = {"layout": trainer.strategy, "rank": dims.d.rank, "pp_rank": dims.coordinate("pp"), "weights": nbytes(model.parameters()),
           "gradients": nbytes(p.grad for p in model.parameters() if p.grad is not None),
           "optimizer": nbytes(moments), "activations": activations,
           "tokens": x.numel()}
    optimizer.zero_grad(set_to_none=True)
    return out


def check_coordinates(dims) -> None:
    """ParallelDims computes a rank's place on each mesh dimension (and its data-parallel rank) from
    its number alone; torch's DeviceMesh must agree."""
    mesh = dims.mesh
    if mesh is None:
        return
    for name in mesh.mesh_dim_names:
        assert dims.coordinate(name) == mesh.get_local_rank(name), (name, dims.d.rank)
    dp = [k for k in ("dp_replicate", "dp_shard") if k in mesh.mesh_dim_names]
    if len(dp) == 2:
        assert dims.dp_rank == mesh["dp"].get_local_rank(), dims.d.rank
    elif dp:
        assert dims.dp_rank == mesh.get_local_rank(dp[0]), dims.d.rank


def restart(src: Path, dst: Path, step: int) -> None:
    """dst as a run directory holding only src's checkpoint at `step` (and its config)."""
    name = f"step_{step:08d}"
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    shutil.copy2(src / "config.toml", dst / "config.toml")


def main(spec_path: str) -> None:
    from scalelab.train.config import layout_of, load_config
    from scalelab.train.parallel import ParallelDims, destroy_distributed, init_distributed
    from scalelab.train.trainer import Trainer, resolved_dtype

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    d = None
    for run in spec["runs"]:
        cfg = copy.deepcopy(load_config(run["config"], run.get("overrides", [])))
        if d is None:
            d = init_distributed(cfg.train.device, cfg.parallel.backend)
        layout = layout_of(cfg, d.world_size)
        if run.get("restart_from"):
            if d.is_main:
                restart(Path(run["restart_from"]["run_dir"]), Path(run["run_dir"]), run["restart_from"]["step"])
            torch.distributed.barrier()
        cfg.train.dtype = resolved_dtype(cfg.train.dtype, d.device)
        trainer = Trainer(cfg, Path(run["run_dir"]), d, lambda m: None, ParallelDims(layout, d))
        try:
            assert trainer.build(resume=False) is None
            check_coordinates(trainer.dims)
            trainer.fit()
            if run.get("measure"):
                (out / f"{run['name']}.rank{d.rank}.json").write_text(json.dumps(measure(trainer)))
        finally:
            trainer.close()
        torch.use_deterministic_algorithms(False)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
