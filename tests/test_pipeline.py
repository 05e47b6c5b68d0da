"""Pipeline parallelism on CPU (gloo): PP2 with each schedule (1F1B, GPipe, Interleaved1F1B,
InterleavedZeroBubble), PP2×DP2 (FSDP2 on the data dimension) and PP2×TP2 reproduce the
single-process per-step losses, with gradient accumulation and clipping on, on a LLaMA-3-style GQA
model and on a GPT-2-style model (learned positions, LayerNorm with biases, GELU; untied, since a
pipeline refuses tied embeddings; 3 layers, so PP2 splits them unevenly). A PP2 checkpoint resumes
in one process and export-hf reads it; each pipeline rank holds exactly the parameters
scalelab.layout_cost counts for it; bad pipeline layouts are refused before any process group.

Every layout of one world size trains in ONE torchrun launch (tests/parallel_worker.py runs the
real Trainer once per layout inside one process group)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_tensor_parallel import assert_same_losses, restart_from, spec_runs, torchrun_worker
from test_train import ROOT, TINY, cli, losses, make_corpus_dir, train_inprocess

pytestmark = pytest.mark.slow

STEPS = 5
GRAD_CLIP = 0.05  # below every step's gradient norm here: clipping acts on every step
# micro-batch 4 × seq 32 = 128 tokens: accumulation 4 (one process, and each pipeline) or 2 (PP2×DP2)
LLAMA = TINY.replace("n_layer = 2", "n_layer = 4").replace(
    "vocab_size = 258", "vocab_size = 260\nnum_key_value_heads = 2").replace(
    "global_batch_tokens = 256", f"global_batch_tokens = 512\ngrad_clip = {GRAD_CLIP}")
GPT2 = LLAMA.replace('style = "llama3"', 'style = "gpt2"').replace("num_key_value_heads = 2\n", "").replace(
    "n_layer = 4", "n_layer = 3").replace("block_size = 64", "block_size = 64\ntie_embeddings = false")
MODELS = {"llama": LLAMA, "gpt2": GPT2}
PP2 = ["parallel.pp=2"]


def schedule(name: str, stages_per_rank: int = 1) -> list[str]:
    return PP2 + [f"parallel.pp_schedule={name}", f"parallel.pp_stages_per_rank={stages_per_rank}"]


TWO_RANKS = {
    "llama-pp2-1F1B": ("llama", PP2),
    "llama-pp2-GPipe": ("llama", schedule("GPipe")),
    "llama-pp2-Interleaved1F1B": ("llama", schedule("Interleaved1F1B", 2)),
    "llama-pp2-InterleavedZeroBubble": ("llama", schedule("InterleavedZeroBubble", 2)),
    "llama-pp2-4microbatches-unchunked": ("llama", PP2 + ["parallel.pp_microbatches=4", "train.loss_chunk_tokens=0"]),
    "gpt2-pp2-1F1B": ("gpt2", PP2),
    "gpt2-pp2-GPipe": ("gpt2", schedule("GPipe")),
}
FOUR_RANKS = {f"{m}-pp2-dp2": (m, PP2) for m in MODELS} | {f"{m}-pp2-tp2": (m, PP2 + ["parallel.tp=2"]) for m in MODELS} | {
    "llama-pp2-tp2-loss-parallel": ("llama", PP2 + ["parallel.tp=2", "parallel.sequence_parallel=false",
                                                    "parallel.loss_parallel=true"])}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("pp")
    data = make_corpus_dir(d / "data")
    configs, single = {}, {}
    for name, text in MODELS.items():
        configs[name] = d / f"{name}.toml"
        configs[name].write_text(text.format(data=data, steps=STEPS, ckpt_every=3, schedule="cosine", at_end="true"))
        train_inprocess(configs[name], d / f"{name}-single")
        single[name] = losses(d / f"{name}-single")
    return d, configs, single


@pytest.fixture(scope="module")
def two_ranks(setup):
    d, configs, _ = setup
    runs = spec_runs(d, configs, TWO_RANKS, measure=True)
    runs.append({"name": "one-to-pp2", "config": str(configs["llama"]), "run_dir": str(d / "one-to-pp2"),
                 "overrides": PP2, "restart_from": {"run_dir": str(d / "llama-single"), "step": 3}})
    r = torchrun_worker({"runs": runs, "out": str(d)}, d / "two.json", nproc=2)
    assert r.returncode == 0, r.stderr[-4000:]
    return d


@pytest.fixture(scope="module")
def four_ranks(setup):
    d, configs, _ = setup
    r = torchrun_worker({"runs": spec_runs(d, configs, FOUR_RANKS, measure=True), "out": str(d)}, d / "four.json",
                        nproc=4)
    assert r.returncode == 0, r.stderr[-4000:]
    return d


def test_single_runs_train_with_accumulation_and_clipping(setup):
    from scalelab.train.metrics import read_metrics

    d, _, single = setup
    for name in MODELS:
        records = [r for r in read_metrics(d / f"{name}-single") if r["kind"] == "train"]
        assert all(r["grad_norm"] > GRAD_CLIP for r in records)  # the clip acts on every step
        assert single[name][STEPS] < single[name][1] - 0.2  # it trained


def val_loss(run: Path) -> float:
    from scalelab.train.metrics import read_metrics

    return [r for r in read_metrics(run) if r["kind"] == "eval"][-1]["val_loss"]


@pytest.mark.parametrize("name", list(TWO_RANKS))
def test_pp2_losses_equal_one_process(setup, two_ranks, name):
    d, _, single = setup
    model = TWO_RANKS[name][0]
    assert_same_losses(losses(two_ranks / name), single[model], range(1, STEPS + 1), name)
    # evaluation runs through the pipeline too (eval.batches 4 = one local batch of 4 micro-batches)
    assert abs(val_loss(two_ranks / name) - val_loss(d / f"{model}-single")) < 1e-5


@pytest.mark.parametrize("name", list(FOUR_RANKS))
def test_pp2_with_fsdp_or_tp_losses_equal_one_process(setup, four_ranks, name):
    d, _, single = setup
    model = FOUR_RANKS[name][0]
    assert_same_losses(losses(four_ranks / name), single[model], range(1, STEPS + 1), name)
    if "-dp2" not in name:  # eval.batches counts per data-parallel rank: two of them read twice the batches
        assert abs(val_loss(four_ranks / name) - val_loss(d / f"{model}-single")) < 1e-5


def test_pp2_checkpoint_resumes_in_one_process(setup, two_ranks):
    d, configs, single = setup
    ckpt = two_ranks / "llama-pp2-1F1B" / "checkpoints" / "step_00000003"
    assert (ckpt / "dcp" / ".metadata").is_file() and not (ckpt / "model.safetensors").exists()
    run = restart_from(two_ranks / "llama-pp2-1F1B", d / "pp2-to-1")
    train_inprocess(configs["llama"], run)
    assert_same_losses(losses(run), single["llama"], range(4, STEPS + 1), "pp2 -> 1")


def test_one_process_checkpoint_resumes_on_pp2(setup, two_ranks):
    """A one-process checkpoint (full safetensors and optimizer state) resumes on a pipeline: each
    rank takes its stages' parameters and their AdamW state."""
    _, _, single = setup
    assert_same_losses(losses(two_ranks / "one-to-pp2"), single["llama"], range(4, STEPS + 1), "1 -> pp2")


def test_export_hf_from_a_pp_checkpoint_equals_one_process(setup, two_ranks, tmp_path):
    """export-hf reads the PP2 run's sharded checkpoint (each stage wrote its own blocks) in one
    process; transformers loads it, and its logits equal those of the single-process run's export
    at the same step. The pipeline's final weights (read back by rank 0) hold the whole model."""
    import torch
    import transformers

    from scalelab import hf

    d, _, _ = setup
    outs = {}
    for name, run in (("pp2", two_ranks / "gpt2-pp2-1F1B"), ("single", d / "gpt2-single")):
        out = tmp_path / name
        r = cli("export-hf", run / "checkpoints" / "step_00000003", out)
        assert r.returncode == 0, r.stderr
        outs[name] = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(outs["pp2"](idx).logits, outs["single"](idx).logits, atol=1e-4, rtol=1e-4)
    final = hf.read_safetensors(two_ranks / "gpt2-pp2-1F1B" / "final")
    single_final = hf.read_safetensors(d / "gpt2-single" / "final")
    assert sorted(final) == sorted(single_final)
    for k in final:
        torch.testing.assert_close(final[k], single_final[k], atol=1e-5, rtol=1e-5)


def test_pipeline_ranks_hold_what_layout_cost_counts(setup, two_ranks, four_ranks):
    """Each rank's local weights (its stages, its FSDP / TP shards), their gradients after one
    schedule step and AdamW's two moments are exactly layout_cost.rank_params' elements × 4 bytes."""
    from scalelab import layout_cost
    from scalelab.config import ModelConfig
    from scalelab.train.config import layout_of, load_config

    d, configs, _ = setup
    for runs, world in ((TWO_RANKS, 2), (FOUR_RANKS, 4)):
        for name, (model, overrides) in runs.items():
            cfg = load_config(configs[model], overrides)
            counted = layout_cost.rank_params(cfg.model, layout_of(cfg, world))
            for rank in range(world):
                got = json.loads((d / f"{name}.rank{rank}.json").read_text())
                expect = counted[got["pp_rank"]].local * 4  # fp32
                assert (got["weights"], got["gradients"], got["optimizer"]) == (expect, expect, 2 * expect), \
                    (name, rank, got, expect)
    assert isinstance(cfg.model, ModelConfig)


def test_uneven_stages_are_split_and_reported():
    from scalelab.layout import stage_layers
    from scalelab.train.pipeline import describe_stages, rank_stages

    assert stage_layers(3, 2) == [range(0, 2), range(2, 3)]
    assert stage_layers(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    assert describe_stages(3, 2) == "0-1 | 2"
    assert rank_stages(1, 2, 2) == [1, 3]  # loop order: what the interleaved schedules expect


def test_the_trainer_runs_every_schedule_it_accepts():
    from scalelab.layout import TRAINED_PP_SCHEDULES
    from scalelab.train.pipeline import SCHEDULES

    assert sorted(SCHEDULES) == sorted(TRAINED_PP_SCHEDULES)


BAD = {
    "pp above the layers": (["parallel.pp=8"], 8, "pipeline stages but the model has only 4 layers"),
    "too many virtual stages": (schedule("Interleaved1F1B", 4), 2, "lower parallel.pp or parallel.pp_stages_per_rank"),
    "unknown schedule": (PP2 + ["parallel.pp_schedule=Zigzag"], 2, "parallel.pp_schedule must be one of"),
    "single-stage schedule, two stages": (schedule("1F1B", 2), 2, "set pp_stages_per_rank = 1"),
    "tied embeddings": (PP2 + ["model.tie_embeddings=true"], 2, "cannot tie embeddings"),
    "a schedule counted, not trained": (schedule("ZBVZeroBubble", 2), 2, "can be counted but not trained"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_pipeline_layouts_exit_2_before_any_process_group(setup, tmp_path, case):
    """WORLD_SIZE as torchrun would set it, but no torchrun and no rendezvous: a layout refused
    after init_process_group would hang here, not exit 2 at once."""
    _, configs, _ = setup
    overrides, world, message = BAD[case]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), WORLD_SIZE=str(world), RANK="0",
               LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    sets = [a for o in overrides for a in ("--set", o)]
    r = subprocess.run([sys.executable, "-m", "scalelab", "train", str(configs["llama"]), "--run-dir",
                        str(tmp_path / "run"), *sets], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scalelab train: error: ") and message in lines[0], r.stderr
    assert not (tmp_path / "run").exists()
