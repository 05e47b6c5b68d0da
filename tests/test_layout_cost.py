"""Counting a layout (scalelab.layout_cost) against the model the trainer parallelizes, and `count`'s
layout flags end to end.

The parameter truth is the real parallelized model: ParallelDims.parallelize (tensor parallelism,
then FSDP2 / HSDP) on torch's single-process "fake" process group, which builds every DTensor shard
of rank 0 without communicating, and train/pipeline.StageModule for what each pipeline rank owns.
"""

from __future__ import annotations

import contextlib
import json

import pytest

from scalelab import counting, layout_cost
from scalelab.layout import Layout
from scalelab.presets import style_config

torch = pytest.importorskip("torch")


def _tiny(style: str = "llama3", **kw):
    # 100 FFN rows and 264 vocabulary rows split unevenly over some of the FSDP degrees (padding)
    base = dict(dict(d_ff=100, vocab_size=264, block_size=32), **kw)
    if style == "llama3":
        return style_config("llama3", 4, 64, 8, num_key_value_heads=4, **base)
    return style_config("gpt2", 4, 64, 4, **base)


@contextlib.contextmanager
def fake_process_group(world: int):
    """A one-process stand-in for `world` ranks (we are rank 0): enough to build DTensor shards and
    run a forward whose collectives return tensors of the right shapes."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        yield world
    finally:
        dist.destroy_process_group()


@pytest.fixture
def fake_world():
    with fake_process_group(8) as world:
        yield world


@pytest.mark.parametrize("style", ["llama3", "gpt2"])
@pytest.mark.parametrize("layout", [Layout(dp_shard=8), Layout(dp_shard=4, tp=2), Layout(dp_shard=2, tp=4),
                                    Layout(dp_replicate=2, dp_shard=2, tp=2), Layout(dp_replicate=4, dp_shard=2)],
                         ids=lambda lay: lay.describe())
def test_local_parameters_equal_the_parallelized_models_shards(fake_world, style, layout):
    from scalelab.model import Transformer
    from scalelab.train.parallel import Dist, ParallelDims

    cfg = _tiny(style)
    layout = layout.validate(cfg, fake_world)
    dims = ParallelDims(layout, Dist(rank=0, local_rank=0, world_size=fake_world, device=torch.device("cpu")))
    model = dims.parallelize(Transformer(cfg), dtype="fp32", compile=False, activation_checkpointing=False)
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    assert layout_cost.rank_params(cfg, layout)[0].local == held


def _saved_bytes(model, tokens) -> int:
    """Bytes of distinct non-parameter storages autograd saves in one training forward (as
    tests/test_memory.py measures them), on a TP rank: DTensors counted by their local shards."""
    params = {(p.to_local() if hasattr(p, "to_local") else p).untyped_storage().data_ptr()
              for p in model.parameters()}
    storages = {}

    def pack(t):
        local = t.to_local() if hasattr(t, "to_local") else t
        try:
            storage = local.untyped_storage()
            ptr = storage.data_ptr()
        except RuntimeError:  # the fake group's collective outputs at the embedding have no storage
            return t
        if ptr not in params:
            storages[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, tokens)
    return sum(storages.values())


@pytest.mark.parametrize("sequence_parallel", [True, False])
def test_tensor_parallel_block_activations_equal_what_a_tp_rank_saves(sequence_parallel):
    """One block's saved activations on a TP rank (the difference between a 2- and a 1-layer model,
    so the embedding and loss drop out), measured with saved_tensors_hooks on the real TP model,
    equal layout_memory's per-block figure. The known CPU difference (tests/test_memory.py): PyTorch's
    composite RMSNorm keeps one more residual-dtype vector per norm than CUDA's fused kernel, split
    over tp with the norms under sequence parallelism."""
    from scalelab.config import ModelConfig
    from scalelab.model import Transformer
    from scalelab.train.parallel import Dist, ParallelDims

    b, s, tp = 2, 48, 2
    measured, predicted = {}, {}
    with fake_process_group(tp):
        for n_layer in (1, 2):
            cfg = ModelConfig(n_layer=n_layer, n_embd=96, n_head=6, num_key_value_heads=2, d_ff=256, vocab_size=384,
                              block_size=s)
            layout = Layout(tp=tp, dp_shard=1, sequence_parallel=sequence_parallel).validate(cfg, tp)
            dims = ParallelDims(layout, Dist(rank=0, local_rank=0, world_size=tp, device=torch.device("cpu")))
            torch.manual_seed(0)
            model = dims.parallelize(Transformer(cfg, loss_chunk_tokens=0), dtype="fp32", compile=False,
                                     activation_checkpointing=False)
            tokens = torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
            measured[n_layer] = _saved_bytes(model, tokens)
            predicted[n_layer] = layout_cost.layout_memory(cfg, layout, micro_batch=b, seq_len=s, precision="fp32",
                                                           loss_chunk_tokens=0)["activations"]
    cpu_norms = 2 * b * s * 96 * 4 / (tp if sequence_parallel else 1)
    assert measured[2] - measured[1] == predicted[2] - predicted[1] + cpu_norms


@pytest.mark.parametrize("pp, v", [(2, 1), (4, 1), (2, 2), (3, 1)])
def test_pipeline_ranks_hold_what_their_stage_modules_hold(pp, v):
    from scalelab.model import Transformer
    from scalelab.train.pipeline import StageModule, rank_stages, stage_layers

    cfg = style_config("llama3", 7, 64, 4, num_key_value_heads=2, d_ff=96, vocab_size=258, block_size=32)
    model = Transformer(cfg)
    split = stage_layers(cfg.n_layer, pp * v)
    assert [len(r) for r in split] == layout_cost.stage_layers(cfg.n_layer, pp * v)
    layout = Layout(pp=pp, dp_shard=1, pp_stages_per_rank=v,
                    pp_schedule="1F1B" if v == 1 else "Interleaved1F1B").validate(cfg, pp)
    counted = layout_cost.rank_params(cfg, layout)
    for r in range(pp):
        stages = rank_stages(r, pp, v)
        owned = [StageModule(model, split[s], first=s == 0, last=s == pp * v - 1) for s in stages]
        assert counted[r].local == sum(p.numel() for m in owned for p in m.parameters())
        assert counted[r].layers == sum(len(split[s]) for s in stages)


def test_fsdp_traffic_is_the_ring_share_of_what_each_unit_gathers():
    """One micro-step, FSDP over 8: every block and the root are gathered in bf16 for forward, every
    block but the last again for backward (the last and the root stay gathered), and all gradients
    reduce-scattered in fp32 once; each moves (n-1)/n of the buffer per rank."""
    from scalelab.model import Transformer

    cfg = _tiny(d_ff=96, vocab_size=256)  # every row count divisible by 8: no FSDP padding
    model = Transformer(cfg)
    block = sum(p.numel() for p in model.layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    layout = Layout(dp_shard=8).validate(cfg, 8)
    rows = {c.name: c for c in layout_cost.communication(cfg, layout, micro_batch=2, seq_len=32)}
    gathered = total + (cfg.n_layer - 1) * block
    assert rows["FSDP all-gather (parameters)"].bytes == pytest.approx(7 / 8 * 2 * gathered)
    assert rows["FSDP reduce-scatter (gradients)"].bytes == pytest.approx(7 / 8 * 4 * total)
    # four micro-steps gather four times and reduce-scatter four times (the trainer keeps FSDP2's
    # gradient sync on); a pipeline's micro-batches reduce once (pipelining turns the sync off)
    rows4 = {c.name: c for c in layout_cost.communication(cfg, layout, micro_batch=2, seq_len=32, accumulation=4)}
    assert rows4["FSDP all-gather (parameters)"].bytes == pytest.approx(4 * rows["FSDP all-gather (parameters)"].bytes)
    assert rows4["FSDP reduce-scatter (gradients)"].bytes == 4 * rows["FSDP reduce-scatter (gradients)"].bytes
    reduced = [{c.name: c for c in layout_cost.communication(
        cfg, Layout(pp=2, dp_shard=4, pp_microbatches=m).validate(cfg, 8), micro_batch=2, seq_len=32)
    }["FSDP reduce-scatter (gradients)"] for m in (2, 8)]
    assert reduced[0] == reduced[1]


def test_tensor_parallel_traffic_per_block():
    """Sequence parallelism (Korthikanti et al. 2022, sec. 4.2.2): per block, forward all-gathers the
    input of attention and of the FFN and reduce-scatters their outputs, backward the reverse: eight
    collectives of a [b, s, h] activation, each moving (t-1)/t of it; a fully recomputed block adds
    its forward's four. Without sequence parallelism, four all-reduces (2(t-1)/t): the same bytes."""
    cfg = _tiny()
    b, s, t = 2, 32, 4
    act = b * s * cfg.n_embd * 2
    for sp in (True, False):
        layout = Layout(dp_shard=2, tp=t, sequence_parallel=sp).validate(cfg, 8)
        for mode, calls in (("none", 8), ("full", 12)):
            rows = layout_cost.communication(cfg, layout, micro_batch=b, seq_len=s, activation_checkpointing=mode)
            blocks = next(c for c in rows if c.dimension == "tp" and "blocks" in c.name)
            assert blocks.bytes == pytest.approx(cfg.n_layer * calls * (t - 1) / t * act)


def test_pipeline_memory_holds_the_schedules_in_flight_micro_batches():
    """GPipe keeps every micro-batch's activations on the first stage, 1F1B at most pp of them."""
    cfg = style_config("llama3", 8, 64, 4, num_key_value_heads=2, d_ff=96, vocab_size=258, block_size=64)
    common = dict(pp=4, dp_shard=1, pp_microbatches=8)
    gpipe = layout_cost.layout_memory(cfg, Layout(pp_schedule="GPipe", **common).validate(cfg, 4), seq_len=64)
    one = layout_cost.layout_memory(cfg, Layout(pp_schedule="1F1B", **common).validate(cfg, 4), seq_len=64)
    assert gpipe["in_flight"] == 8 and one["in_flight"] == 4
    assert gpipe["activations"] > one["activations"]


# ---- the same memory model as counting.training_memory ----------------------------------------


@pytest.mark.parametrize("layout, sharding, world", [(Layout(dp_shard=8), "fsdp", 8),
                                                     (Layout(dp_replicate=8, dp_shard=1), "ddp", 8),
                                                     (Layout(dp_shard=1), "none", 1)],
                         ids=["fsdp8", "ddp8", "one"])
@pytest.mark.parametrize("mode, option", [("none", "op"), ("full", "op"), ("selective", "op"), ("selective", "2")])
@pytest.mark.parametrize("precision, chunk", [("bf16-mixed", 16), ("bf16-mixed", 0), ("fp32", 16), ("bf16", 0)])
@pytest.mark.parametrize("impl, device", [("fused", "cuda"), ("foreach", "cuda"), ("for-loop", "cpu")])
def test_degenerate_layout_memory_consistency_check_with_training_memory(layout, sharding, world, mode, option,
                                                                          precision, chunk, impl, device):
    """Consistency check: a layout with tp = pp = 1 (FSDP, DDP or one device) is what
    counting.training_memory models, so layout_memory must give the same components, phases, peak,
    runtime reserve and total (every row count divides 8: no FSDP padding)."""
    from scalelab import counting

    cfg = style_config("llama3", 4, 64, 8, num_key_value_heads=4, d_ff=96, vocab_size=256, block_size=32)
    kw = dict(micro_batch=2, seq_len=32, precision=precision, activation_checkpointing=mode,
              selective_ac_option=option, loss_chunk_tokens=chunk, optimizer_impl=impl, device=device)
    got = layout_cost.layout_memory(cfg, layout.validate(cfg, world), **kw)
    want = counting.training_memory(cfg, num_devices=world, sharding=sharding, **kw)
    keys = (*counting.MEMORY_COMPONENTS, *(f"phase_{p}" for p in counting.PHASES), "peak", "runtime_reserve", "total")
    assert {k: got[k] for k in keys} == pytest.approx({k: want[k] for k in keys}, rel=1e-12)
    assert got["peak_phase"] == want["peak_phase"]


def test_degenerate_layout_memory_consistency_check_llama31_8b():
    """The same consistency check at full size: LLaMA 3.1 8B, FSDP over 8, 2 x 8192, selective checkpointing."""
    from scalelab import counting
    from scalelab.presets import get_preset

    cfg = get_preset("llama3.1-8b")
    kw = dict(micro_batch=2, seq_len=8192, activation_checkpointing="selective")
    got = layout_cost.layout_memory(cfg, Layout(dp_shard=8).validate(cfg, 8), **kw)
    want = counting.training_memory(cfg, num_devices=8, **kw)
    for key in ("peak", "runtime_reserve", "total"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    assert got["runtime_reserve"] == counting.CUDA_CONTEXT_BYTES + counting.ALLOCATOR_FRAGMENTATION * got["peak"]


@pytest.mark.parametrize("layout, chunked", [
    (Layout(pp=2, dp_shard=1), True), (Layout(pp=2, dp_shard=2), False), (Layout(tp=2, dp_shard=2), False),
    (Layout(pp=2, dp_shard=1, pp_schedule="InterleavedZeroBubble", pp_stages_per_rank=2), False)],
    ids=lambda x: x.describe() if isinstance(x, Layout) else str(x))
def test_layout_memory_counts_the_loss_the_trainer_runs(layout, chunked):
    """train/pipeline.py forms the logits whole on a pipeline's last stage under FSDP and under a
    zero-bubble schedule (and TP always does): Layout.chunked_loss says where, and layout_memory's
    loss follows it (it counted a chunked loss for pp x FSDP before)."""
    from scalelab import counting

    # a large vocabulary makes the last stage, which holds the loss, the one reported
    cfg = style_config("llama3", 4, 64, 8, num_key_value_heads=4, d_ff=96, vocab_size=8192, block_size=32)
    if layout.pp > 1:
        layout = layout.replace(pp_microbatches=4)
    layout = layout.validate(cfg, layout.pp * layout.dp_shard * layout.tp)
    m = layout_cost.layout_memory(cfg, layout, micro_batch=1, seq_len=32, precision="fp32", loss_chunk_tokens=16)
    assert layout.chunked_loss is chunked and m["loss_chunk_tokens"] == (16 if chunked else 0)
    assert m["pp_rank"] == layout.pp - 1
    assert m["loss"] == counting.loss_bytes(32, cfg.vocab_size, 4, 16 if chunked else 0)


def test_layout_search_refuses_a_layout_that_fits_only_without_the_runtime_reserve():
    """LLaMA 3.1 8B on 8 x A100-40GB at 4096 tokens: PP 2 x TP 4 at micro-batch 2 without
    checkpointing peaks at 36.5 GiB allocated, which the 40 GiB card holds, but with the CUDA
    context and the allocator's fragmentation (as the data-parallel path counts them) it needs
    40.7 GiB: the search must not offer it (it did while layout_memory had no reserve)."""
    from scalelab import counting, layout_search
    from scalelab.hardware import get_accelerator
    from scalelab.presets import get_preset

    cfg, acc = get_preset("llama3.1-8b"), get_accelerator("A100-40GB")
    batch = 2**19
    layout, _, _ = layout_search.resolve_batch(Layout(pp=2, tp=4, dp_shard=1), micro_batch=2, seq_len=4096,
                                               global_batch_tokens=batch)
    layout = layout.validate(cfg, 8)
    m = layout_search.device_memory(cfg, layout, micro_batch=2, seq_len=4096, precision="bf16-mixed")
    assert m["model"] == "layout_cost.layout_memory"
    assert m["peak"] <= acc.memory_bytes < m["total"]
    assert m["total"] == m["peak"] + counting.CUDA_CONTEXT_BYTES + counting.ALLOCATOR_FRAGMENTATION * m["peak"]
    found = layout_search.search(cfg, acc, 8, seq_len=4096, global_batch_tokens=batch, top=10**6)
    assert found and all(c.memory["total"] <= acc.memory_bytes for c in found)
    assert not any(c.layout == layout and c.micro_batch == 2 and c.activation_checkpointing == "none" for c in found)


def test_trainers_memory_check_of_a_tp_layout_counts_the_runtime_reserve():
    """train/trainer.py's memory_problem for a tp x FSDP layout: a device with the allocated peak
    free (but not the reserve) is refused, naming the reserve; one with the total free is not."""
    from scalelab.train.config import config_from_dict, layout_of
    from scalelab.train.trainer import memory_problem, predicted_memory

    model = {"style": "llama3", "n_layer": 4, "n_embd": 128, "n_head": 4, "num_key_value_heads": 2,
             "vocab_size": 512, "block_size": 64}
    cfg = config_from_dict({"model": model, "data": {"dir": "unused"}, "parallel": {"tp": 2, "dp_shard": 2},
                            "train": {"seq_len": 64, "micro_batch_size": 2, "max_steps": 1, "dtype": "bf16"}})
    layout = layout_of(cfg, 4)
    m = predicted_memory(cfg, layout.describe(), 4, layout)
    assert m["model"] == "layout_cost.layout_memory" and m["runtime_reserve"] > 0
    problem = memory_problem(cfg, layout.describe(), 4, (m["peak"] + 1.0, "free on the test's GPU"), layout=layout)
    assert problem is not None and "runtime reserve" in problem and "layout_cost.layout_memory" in problem
    assert memory_problem(cfg, layout.describe(), 4, (m["total"], "free on the test's GPU"), layout=layout) is None


# ---- count ------------------------------------------------------------------------------------


def test_accumulation_holds_sharded_gradients_but_a_pipeline_under_fsdp_unsharded():
    """Gradient accumulation (pp = 1): micro-batches 2..k run beside the gradients so far, the rank's
    own (rank_params, proven equal to the real shards above), 4 bytes each in fp32: sharded over
    dp_shard under FSDP2, which the trainer lets reduce-scatter every micro-step; whole without it.
    Under pp the micro-batches are the pipeline's, and torch.distributed.pipelining turns FSDP2's
    gradient sync off between them: each local gradient unsharded over dp_shard, in fp32."""
    cfg = _tiny()
    tp_fsdp, tp_only = Layout(dp_shard=4, tp=2).validate(cfg, 8), Layout(dp_shard=1, tp=2).validate(cfg, 2)
    one = layout_cost.layout_memory(cfg, tp_fsdp, seq_len=32)
    two = layout_cost.layout_memory(cfg, tp_fsdp, seq_len=32, grad_accum_steps=2)
    sharded = layout_cost.rank_params(cfg, tp_fsdp)[0].local
    assert one["accumulated_gradients"] == 0 and two["accumulated_gradients"] == 4 * sharded
    assert two["total"] - one["total"] == pytest.approx(4 * sharded * (1 + counting.ALLOCATOR_FRAGMENTATION))
    tp_local = layout_cost.rank_params(cfg, tp_only)[0].local
    assert layout_cost.layout_memory(cfg, tp_only, seq_len=32, grad_accum_steps=2)["accumulated_gradients"] == \
        4 * tp_local
    pp_fsdp, pp_only = Layout(pp=2, dp_shard=2).validate(cfg, 4), Layout(pp=2, dp_shard=1).validate(cfg, 2)
    piped = layout_cost.layout_memory(cfg, pp_fsdp, seq_len=32)  # the pipeline's micro-batches accumulate too
    assert piped["accumulated_gradients"] == 4 * layout_cost.rank_params(cfg, pp_only)[piped["pp_rank"]].local
    assert layout_cost.layout_memory(cfg, pp_only, seq_len=32)["accumulated_gradients"] == 0
    with pytest.raises(ValueError, match="pipeline"):
        layout_cost.layout_memory(cfg, pp_only, seq_len=32, grad_accum_steps=2)


def test_count_prints_and_returns_the_layout(cli):
    r = cli("count", "llama3.1-405b", "--gpus", "16384", "--gpu-type", "H100", "--tp", "8", "--pp", "16",
            "--pp-schedule", "Interleaved1F1B", "--global-batch-tokens", "16777216", "--seq-len", "8192",
            "--mfu", "auto", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    lay = out["layout"]
    assert (lay["tp"], lay["pp"], lay["dp_shard"], lay["pp_microbatches"], lay["pp_stages_per_rank"]) == (8, 16, 128,
                                                                                                        16, 2)
    assert lay["bubble_fraction"] == pytest.approx(15 / 47)
    kinds = {c["dimension"] for c in lay["communication"]}
    assert kinds == {"fsdp", "tp", "pp"}
    predicted = out["time"]["predicted"]
    assert 0 < predicted["mfu"] < 1 and predicted["step_seconds"] > 0
    assert out["memory"]["model"] == "layout_cost.layout_memory"
    memory = out["memory"]
    assert memory["total"] == memory["peak"] + memory["runtime_reserve"] and memory["runtime_reserve"] > 0
    assert memory["peak_phase"] in ("forward_end", "loss_backward", "backward", "optimizer_step")
    human = cli("count", "llama3.1-8b", "--gpus", "8", "--gpu-type", "H100", "--tp", "2", "--mfu", "auto")
    assert "Communication per step per device" in human.stdout and "Predicted step time" in human.stdout
    # the memory table shows the peak and the reserve, as the data-parallel one does
    for line in ("Peak (allocated)", "Runtime reserve (CUDA context, allocator)", "Live at backward"):
        assert line in human.stdout, line


def test_count_layout_auto_shows_the_top_layouts(cli):
    r = cli("count", "llama3.1-70b", "--gpus", "64", "--gpu-type", "H100", "--seq-len", "8192", "--layout", "auto",
            "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    rows = out["layout_search"]
    assert 1 < len(rows) <= 5
    assert [row["step_seconds"] for row in rows] == sorted(row["step_seconds"] for row in rows)
    assert all(row["memory_bytes"] <= out["accelerator"]["memory_bytes"] for row in rows)
    best = rows[0]["layout"]
    assert {k: out["layout"][k] for k in best} == best


@pytest.mark.parametrize("args, fragment", [
    (["--gpus", "6", "--tp", "3"], "--tp = 3 does not divide"),
    (["--gpus", "8", "--tp", "3"], "--gpus 8 is not divisible"),
    (["--gpus", "64", "--pp", "64"], "layers"),
    (["--gpus", "8", "--tp", "2", "--dp-shard", "2"], "but --gpus is 8"),
    (["--gpus", "8", "--pp", "2", "--pp-schedule", "Zigzag"], "unknown"),
    (["--gpus", "8", "--sharding", "fsdp", "--tp", "2"], "not both"),
    (["--gpus", "8", "--mfu", "auto"], "--gpu-type"),
    (["--gpus", "8", "--layout", "auto"], "--gpu-type"),
    (["--gpus", "8", "--global-batch-tokens", "1000"], "multiple of"),
    (["--gpus", "8", "--gpu-type", "H100", "--layout", "auto", "--tp", "2"], "chooses the layout itself"),
])
def test_bad_layouts_exit_2_with_one_line(cli, args, fragment):
    r = cli("count", "llama3.1-8b", *args)
    assert r.returncode == 2 and fragment in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


# ---- plan --layout auto ------------------------------------------------------------------------


@pytest.mark.parametrize("hardware", [["--gpus", "8", "--gpu-type", "H100", "--hours", "240"],
                                      ["--gpus", "512", "--gpu-type", "H100", "--hours", "2000", "--seq-len", "8192"]])
def test_plan_layout_auto_emits_the_layout_its_memory_assumed(cli, tmp_path, hardware):
    """Issue 10's example (`plan --gpus 8 --gpu-type H100 --hours 240`: 6.6 GiB printed, 89 GiB for the
    config it wrote), with the layout search on: the emitted [parallel] layout, micro-batch,
    checkpointing and global batch count (`scalelab count FILE`) to the plan's figure, to the byte,
    and the trainer's own loader resolves the same layout."""
    from scalelab.train.config import layout_of, load_config

    path = tmp_path / "plan.toml"
    r = cli("plan", *hardware, "--layout", "auto", "--emit-config", str(path), "--json")
    assert r.returncode == 0, r.stderr
    best = json.loads(r.stdout)["best"]
    gpus = int(hardware[1])
    cfg = load_config(path)
    chosen = best["layout"]
    resolved = layout_of(cfg, gpus)
    assert {k: getattr(resolved, k) for k in ("dp_replicate", "dp_shard", "tp", "pp")} == {
        k: chosen["layout"][k] for k in ("dp_replicate", "dp_shard", "tp", "pp")}
    assert cfg.train.micro_batch_size == chosen["micro_batch"]
    counted = json.loads(cli("count", str(path), "--gpus", str(gpus), "--gpu-type", "H100", "--mfu", "auto",
                             "--json").stdout)
    assert counted["memory"]["total"] == best["memory_per_gpu_bytes"] <= counted["accelerator"]["memory_bytes"]
    assert counted["time"]["predicted"]["mfu"] == pytest.approx(chosen["mfu"])


def test_layout_counting_and_search_import_no_torch():
    from conftest import heavy_modules_loaded

    for argv in (["count", "llama3.1-8b", "--gpus", "16", "--gpu-type", "H100", "--tp", "2", "--pp", "2",
                  "--mfu", "auto"],
                 ["count", "llama3.1-8b", "--gpus", "16", "--gpu-type", "H100", "--layout", "auto"],
                 ["plan", "--gpus", "8", "--gpu-type", "H100", "--hours", "24", "--layout", "auto"]):
        assert heavy_modules_loaded(argv) == [], argv


def test_count_of_a_layout_config_is_the_trainers_prediction(cli, tmp_path):
    """The two verbs agree on a tp × FSDP layout with selective checkpointing every 2nd block: `count
    CONFIG --gpus 4` prints the memory the trainer checks before it starts (a consistency check between
    verbs; layout_memory itself is proven against real shards above)."""
    from scalelab.train.config import config_from_dict, layout_of
    from scalelab.train.trainer import predicted_memory

    model = {"style": "llama3", "n_layer": 4, "n_embd": 128, "n_head": 4, "num_key_value_heads": 2,
             "vocab_size": 512, "block_size": 64}
    train = {"seq_len": 64, "micro_batch_size": 2, "max_steps": 1, "dtype": "bf16",
             "activation_checkpointing": "selective", "selective_ac_option": "2"}
    parallel = {"tp": 2, "dp_shard": 2}
    cfg = config_from_dict({"model": model, "data": {"dir": "unused"}, "train": train, "parallel": parallel})
    layout = layout_of(cfg, 4)
    trainer = predicted_memory(cfg, layout.describe(), 4, layout)
    toml = tmp_path / "run.toml"
    toml.write_text("\n".join(f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in section.items())
                              for name, section in (("model", model), ("train", train), ("parallel", parallel))))
    r = cli("count", str(toml), "--gpus", "4", "--json")
    assert r.returncode == 0, r.stderr
    counted = json.loads(r.stdout)["memory"]
    assert counted["total"] == trainer["total"] and counted["activations"] == trainer["activations"]
    other = predicted_memory(config_from_dict({"model": model, "data": {"dir": "unused"}, "parallel": parallel,
                                               "train": {**train, "selective_ac_option": "op"}}),
                             layout.describe(), 4, layout)
    assert other["activations"] != trainer["activations"]  # the option reaches the prediction
