"""Tensor parallelism and 2-D layouts on CPU (gloo): TP2, FSDP2×TP2 and HSDP 2×2 reproduce the
single-process per-step losses, with gradient accumulation and clipping on, on a LLaMA-3-style GQA
model and on a GPT-2-style model (tied embeddings, learned positions, LayerNorm with biases);
checkpoints move between layouts (TP2 -> 1 process, FSDP2×TP2 -> FSDP4, and old checkpoints from
before K and V were separate projections); bad layouts are refused before any process group exists.

Every layout of one world size trains in ONE torchrun launch (tests/parallel_worker.py runs the
real Trainer once per layout inside one process group): the launches are the slow part."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import ROOT, TINY, cli, env_1thread, losses, make_corpus_dir, train_inprocess

pytestmark = pytest.mark.slow

STEPS = 5
GRAD_CLIP = 0.05  # below every step's gradient norm here: clipping acts on every step
# micro-batch 4 × seq 32 = 128 tokens: accumulation 4 in one process and under TP2, 2 under FSDP2×TP2
LLAMA = TINY.replace("vocab_size = 258", "vocab_size = 260\nnum_key_value_heads = 2").replace(
    "global_batch_tokens = 256", f"global_batch_tokens = 512\ngrad_clip = {GRAD_CLIP}")
GPT2 = LLAMA.replace('style = "llama3"', 'style = "gpt2"').replace("num_key_value_heads = 2\n", "").replace(
    "block_size = 64", "block_size = 64\ntie_embeddings = true")
MODELS = {"llama": LLAMA, "gpt2": GPT2}
TP2 = ["parallel.tp=2"]
TP2_GATHERED = ["parallel.tp=2", "parallel.sequence_parallel=false", "parallel.loss_parallel=true"]
TWO_RANKS = {f"{m}-tp2": (m, TP2) for m in MODELS} | {f"{m}-tp2-loss-parallel": (m, TP2_GATHERED) for m in MODELS}
FOUR_RANKS = {f"{m}-fsdp2-tp2": (m, ["parallel.tp=2"]) for m in MODELS} | {
    "llama-fsdp2-tp2-gathered": ("llama", ["parallel.tp=2", "parallel.sequence_parallel=false"]),
    "gpt2-fsdp2-tp2-loss-parallel": ("gpt2", ["parallel.tp=2", "parallel.loss_parallel=true"]),
    "llama-hsdp2x2": ("llama", ["parallel.dp_replicate=2", "parallel.dp_shard=2"])}


def torchrun_worker(spec: dict, path: Path, nproc: int) -> subprocess.CompletedProcess:
    path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tests" / "parallel_worker.py"), str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env_1thread(), timeout=600)


def restart_from(src: Path, dst: Path, step: int = 3) -> Path:
    """dst: a run directory holding only src's checkpoint at `step` (it resumes from there)."""
    name = f"step_{step:08d}"
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    shutil.copy2(src / "config.toml", dst / "config.toml")
    return dst


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp")
    data = make_corpus_dir(d / "data")
    configs, single = {}, {}
    for name, text in MODELS.items():
        configs[name] = d / f"{name}.toml"
        configs[name].write_text(text.format(data=data, steps=STEPS, ckpt_every=3, schedule="cosine", at_end="false"))
        train_inprocess(configs[name], d / f"{name}-single")
        single[name] = losses(d / f"{name}-single")
    return d, configs, single


def spec_runs(d: Path, configs: dict, runs: dict, measure: bool) -> list[dict]:
    return [{"name": name, "config": str(configs[model]), "run_dir": str(d / name), "overrides": overrides,
             "measure": measure} for name, (model, overrides) in runs.items()]


@pytest.fixture(scope="module")
def two_ranks(setup):
    """One 2-rank launch: TP2 with sequence parallelism, TP2 with gathered activations and
    loss_parallel, for both models; TP2 resuming a checkpoint written in the old fused-[K | V]
    format (DCP) by one process; TP2 with activation checkpointing."""
    d, configs, _ = setup
    legacy = restart_from(d / "llama-single", d / "legacy-to-tp2")
    write_as_fused_kv_dcp(legacy / "checkpoints" / "step_00000003")
    runs = spec_runs(d, configs, TWO_RANKS, measure=True)
    runs.append({"name": "legacy-to-tp2", "config": str(configs["llama"]), "run_dir": str(legacy), "overrides": TP2})
    runs.append({"name": "llama-tp2-checkpointed", "config": str(configs["llama"]),
                 "run_dir": str(d / "llama-tp2-checkpointed"), "overrides": [*TP2, "train.activation_checkpointing=true"]})
    r = torchrun_worker({"runs": runs, "out": str(d)}, d / "two.json", nproc=2)
    assert r.returncode == 0, r.stderr[-4000:]
    return d


@pytest.fixture(scope="module")
def four_ranks(setup):
    """One 4-rank launch: FSDP2×TP2 for both models (and with gathered activations, and with
    loss_parallel), HSDP 2×2, then FSDP4 resuming FSDP2×TP2's step-3 checkpoint."""
    d, configs, _ = setup
    runs = spec_runs(d, configs, FOUR_RANKS, measure=True)
    runs.append({"name": "fsdp2-tp2-to-fsdp4", "config": str(configs["llama"]), "run_dir": str(d / "fsdp2-tp2-to-fsdp4"),
                 "overrides": ["parallel.strategy=fsdp"],
                 "restart_from": {"run_dir": str(d / "llama-fsdp2-tp2"), "step": 3}})
    r = torchrun_worker({"runs": runs, "out": str(d)}, d / "four.json", nproc=4)
    assert r.returncode == 0, r.stderr[-4000:]
    return d


def assert_same_losses(got: dict, want: dict, steps, what: str) -> None:
    assert sorted(got) == list(steps), (what, got)
    for step in steps:
        assert abs(got[step] - want[step]) < 1e-5, (what, step, got[step], want[step])


def grad_norms(run: Path) -> dict[int, float]:
    from scalelab.train.metrics import read_metrics

    return {r["step"]: r["grad_norm"] for r in read_metrics(run) if r["kind"] == "train"}


def assert_same_grad_norms(run: Path, single: Path, what: str) -> None:
    """The logged global gradient norm (before clipping) is one process's, over every TP / FSDP shard."""
    got, want = grad_norms(run), grad_norms(single)
    assert got.keys() == want.keys()
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), (what, step)


def test_single_runs_train_with_accumulation_and_clipping(setup):
    from scalelab.train.metrics import read_metrics

    d, _, single = setup
    for name in MODELS:
        records = [r for r in read_metrics(d / f"{name}-single") if r["kind"] == "train"]
        assert all(r["grad_norm"] > GRAD_CLIP for r in records)  # the clip acts on every step
        assert single[name][STEPS] < single[name][1] - 0.2  # it trained


@pytest.mark.parametrize("name", list(TWO_RANKS))
def test_tp2_losses_equal_one_process(setup, two_ranks, name):
    d, _, single = setup
    assert_same_losses(losses(two_ranks / name), single[TWO_RANKS[name][0]], range(1, STEPS + 1), name)
    assert_same_grad_norms(two_ranks / name, d / f"{TWO_RANKS[name][0]}-single", name)


def test_tp2_with_activation_checkpointing_equals_one_process(setup, two_ranks):
    """Each block recomputed in backward (applied after the TP plan, as torchtitan orders them)."""
    d, _, single = setup
    run = two_ranks / "llama-tp2-checkpointed"
    assert_same_losses(losses(run), single["llama"], range(1, STEPS + 1), "tp2 + activation checkpointing")
    assert_same_grad_norms(run, d / "llama-single", "tp2 + activation checkpointing")


@pytest.mark.parametrize("name", list(FOUR_RANKS))
def test_fsdp_tp_and_hsdp_losses_equal_one_process(setup, four_ranks, name):
    d, _, single = setup
    assert_same_losses(losses(four_ranks / name), single[FOUR_RANKS[name][0]], range(1, STEPS + 1), name)
    assert_same_grad_norms(four_ranks / name, d / f"{FOUR_RANKS[name][0]}-single", name)


def test_tp2_checkpoint_resumes_in_one_process(setup, two_ranks):
    d, configs, single = setup
    ckpt = two_ranks / "llama-tp2" / "checkpoints" / "step_00000003"
    assert (ckpt / "dcp" / ".metadata").is_file() and not (ckpt / "model.safetensors").exists()
    run = restart_from(two_ranks / "llama-tp2", d / "tp2-to-1")
    train_inprocess(configs["llama"], run)
    assert_same_losses(losses(run), single["llama"], range(4, STEPS + 1), "tp2 -> 1")


def test_fsdp2_tp2_checkpoint_resumes_on_fsdp4(setup, four_ranks):
    _, _, single = setup
    assert_same_losses(losses(four_ranks / "fsdp2-tp2-to-fsdp4"), single["llama"], range(4, STEPS + 1),
                       "fsdp2×tp2 -> fsdp4")


def test_export_hf_from_a_tp_checkpoint_equals_one_process(setup, two_ranks, tmp_path):
    """export-hf reads the TP2 run's sharded checkpoint in one process; transformers loads what it
    writes, and its logits equal those of the single-process run's export at the same step."""
    import torch
    import transformers

    d, _, _ = setup
    outs = {}
    for name, run in (("tp2", two_ranks / "gpt2-tp2"), ("single", d / "gpt2-single")):
        out = tmp_path / name
        r = cli("export-hf", run / "checkpoints" / "step_00000003", out)
        assert r.returncode == 0, r.stderr
        outs[name] = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(outs["tp2"](idx).logits, outs["single"](idx).logits, atol=1e-4, rtol=1e-4)


# ---- what each rank holds, against layout_cost.layout_memory ------------------------------------------

def measured(d: Path, name: str, world: int) -> list[dict]:
    return [json.loads((d / f"{name}.rank{r}.json").read_text()) for r in range(world)]


def predicted(configs: dict, model: str, overrides: list[str], world: int) -> dict:
    from scalelab.layout_cost import layout_memory
    from scalelab.train.config import layout_of, load_config

    cfg = load_config(configs[model], overrides)
    layout = layout_of(cfg, world)
    return layout, cfg.model, layout_memory(cfg.model, layout, micro_batch=cfg.train.micro_batch_size,
                                            seq_len=cfg.train.seq_len, precision="fp32",
                                            loss_chunk_tokens=cfg.train.loss_chunk_tokens)


@pytest.mark.parametrize("world,name", [(2, n) for n in TWO_RANKS] + [(4, n) for n in FOUR_RANKS])
def test_each_ranks_shards_are_what_layout_memory_counts(setup, two_ranks, four_ranks, world, name):
    """Weights, gradients (as the optimizer step sees them) and AdamW moments: the bytes of the local
    shards each rank of the trained model really holds equal layout_memory's, on every rank."""
    _, configs, _ = setup
    model, overrides = (TWO_RANKS if world == 2 else FOUR_RANKS)[name]
    _, _, want = predicted(configs, model, overrides, world)
    for rank in measured(two_ranks if world == 2 else four_ranks, name, world):
        for part in ("weights", "gradients", "optimizer"):
            assert rank[part] == want[part], (name, rank["rank"], part, rank[part], want[part])


@pytest.mark.parametrize("name", list(TWO_RANKS))
def test_tp_rank_activations_are_what_layout_memory_counts(setup, two_ranks, name):
    """What autograd saves on a TP rank in one training forward (saved_tensors_hooks, distinct
    non-parameter storages, DTensors by their local shards) equals layout_memory's activations, up
    to tests/test_memory.py's documented differences, computed here: what the loss saves (unchunked
    under TP: the targets, the fp32 log-probabilities over this rank's vocabulary, a scalar; its
    peak is the separate `loss` component); RoPE's cos/sin tables or the position ids; and the extra
    vector CPU's composite RMSNorm keeps per norm (on a sequence slice under sequence parallelism)."""
    from scalelab import counting

    _, configs, _ = setup
    model, overrides = TWO_RANKS[name]
    layout, cfg, want = predicted(configs, model, overrides, 2)
    b, s = 4, 32
    tokens = b * s
    vocab = cfg.vocab_size // layout.tp if layout.loss_parallel else cfg.vocab_size
    loss_saved = tokens * (8 + 4 * vocab) + 4
    assert want["loss"] == counting.loss_bytes(tokens, vocab, 4, 0)
    fixed = 2 * s * cfg.head_dim * 4 if cfg.position_encoding == "rope" else s * 8
    norms = 2 * cfg.n_layer + 1
    cpu_norms = norms * tokens * cfg.n_embd * 4 // (layout.tp if layout.sequence_parallel else 1) \
        if cfg.normalization == "rmsnorm" else 0
    for rank in measured(two_ranks, name, 2):
        assert rank["tokens"] == tokens
        assert rank["activations"] == want["activations"] + loss_saved + fixed + cpu_norms, (name, rank)


# ---- checkpoints from before K and V were separate projections -------------------------------------

def fuse(name: str) -> str:
    return name.replace("attn.k_proj.", "attn.kv_proj.")


def fused_kv(sd: dict) -> dict:
    """A state dict as the old Attention had it: [K | V] stacked on the output dimension under kv_proj."""
    import torch

    out = {k: v for k, v in sd.items() if "attn.k_proj." not in k and "attn.v_proj." not in k}
    for k, v in sd.items():
        if "attn.k_proj." in k:
            out[fuse(k)] = torch.cat([v, sd[k.replace("k_proj", "v_proj")]])
    return out


def fused_kv_optimizer(osd: dict) -> dict:
    state = {k: v for k, v in osd["state"].items() if "attn.k_proj." not in k and "attn.v_proj." not in k}
    for k, entry in osd["state"].items():
        if "attn.k_proj." in k:
            other = osd["state"][k.replace("k_proj", "v_proj")]
            state[fuse(k)] = {key: fused_kv({"attn.k_proj.x": value, "attn.v_proj.x": other[key]})["attn.kv_proj.x"]
                              if value.dim() else value for key, value in entry.items()}
    groups = [{**g, "params": [fuse(p) for p in g["params"] if "attn.v_proj." not in p]} for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}


def write_as_fused_kv_dcp(ckpt: Path) -> None:
    """Rewrite a one-process checkpoint (model.safetensors + optimizer.pt) as an old sharded one:
    dcp/ holding kv_proj, as FSDP runs wrote before K and V were apart; the manifest renewed."""
    import torch
    import torch.distributed.checkpoint as dcp

    from scalelab import hf
    from scalelab.train import checkpoint as ckpt_mod

    model_sd = fused_kv(hf.read_safetensors(ckpt))
    optim_sd = fused_kv_optimizer(torch.load(ckpt / "optimizer.pt", weights_only=True))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt / "dcp")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "optimizer.pt").unlink()
    (ckpt / "manifest.json").unlink()
    manifest = ckpt_mod._manifest(ckpt, {})
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def test_old_fused_kv_checkpoints_load(setup, tmp_path):
    """A one-process checkpoint and a native model directory written with the old `attn.kv_proj`
    ([K | V]) load into today's separate k_proj / v_proj: the same weights and AdamW moments, and
    the same after one more step (K and V each have their own step count)."""
    import torch

    from scalelab import hf
    from scalelab.train.checkpoint import load_checkpoint, load_model_for_inference
    from scalelab.train.parallel import Dist
    from scalelab.train.config import load_config
    from scalelab.train.trainer import make_optimizer

    d, configs, _ = setup
    new = d / "llama-single" / "checkpoints" / "step_00000003"
    old = tmp_path / "old"
    shutil.copytree(new, old)
    hf.write_safetensors(fused_kv(hf.read_safetensors(new)), old, max_shard_bytes=2**62)
    torch.save(fused_kv_optimizer(torch.load(new / "optimizer.pt", weights_only=True)), old / "optimizer.pt")
    assert any("kv_proj" in k for k in hf.read_safetensors(old))

    cfg = load_config(configs["llama"])
    states = []
    for path in (new, old):
        model = load_model_for_inference(path)  # native directory: hf.load_native
        optimizer = make_optimizer(model, cfg, torch.device("cpu"))
        load_checkpoint(path, model, optimizer, Dist(), restore_rng=False)  # the trainer's resume
        for p in model.parameters():  # one more AdamW step (it increments each step count in place)
            p.grad = torch.full_like(p, 0.01)
        optimizer.step()
        states.append((model.state_dict(), optimizer.state_dict()))
    (want_model, want_opt), (got_model, got_opt) = states
    assert want_model.keys() == got_model.keys()
    for k in want_model:
        assert torch.equal(want_model[k], got_model[k]), k
    for i in want_opt["state"]:
        for key in want_opt["state"][i]:
            assert torch.equal(want_opt["state"][i][key], got_opt["state"][i][key]), (i, key)


def test_old_fused_kv_sharded_checkpoint_resumes_under_tp2(setup, two_ranks):
    """dcp/ with kv_proj (an FSDP checkpoint of the old format) resumes under TP2: each rank takes
    its shard of the split halves and of their moments, and steps 4.. equal the one-process run."""
    import torch

    from scalelab.train.checkpoint import load_model_for_inference

    d, _, single = setup
    assert_same_losses(losses(two_ranks / "legacy-to-tp2"), single["llama"], range(4, STEPS + 1), "legacy -> tp2")
    # read in one process (what export-hf and sample do): the weights of the checkpoint it was made from
    old = load_model_for_inference(two_ranks / "legacy-to-tp2" / "checkpoints" / "step_00000003").state_dict()
    new = load_model_for_inference(d / "llama-single" / "checkpoints" / "step_00000003").state_dict()
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)


# ---- the layout, without torch ----------------------------------------------------------------------

def test_layouts_resolve_and_the_old_strategies_are_their_degenerate_cases(setup):
    from scalelab.errors import UserError
    from scalelab.layout import Layout
    from scalelab.train.config import layout_of, load_config

    _, configs, _ = setup
    assert Layout(tp=2).resolved(8) == Layout(dp_shard=4, tp=2)
    assert Layout(dp_replicate=2, tp=2).resolved(8).dp == 4 and Layout(dp_replicate=2, tp=2).resolved(8).world == 8
    assert Layout.from_strategy("auto", 4) == Layout.from_strategy("ddp", 4) == Layout(dp_replicate=4, dp_shard=1)
    assert Layout.from_strategy("fsdp", 4) == Layout(dp_shard=4)
    assert Layout.from_strategy("auto", 1) == Layout.from_strategy("none", 1) == Layout(dp_shard=1)
    assert Layout.from_strategy("ddp", 4).is_ddp and not Layout(dp_shard=4).is_ddp
    with pytest.raises(UserError, match="launch with torchrun"):
        Layout.from_strategy("fsdp", 1)
    cfg = load_config(configs["llama"])
    assert layout_of(cfg, 2) == Layout(dp_replicate=2, dp_shard=1)  # strategy auto under torchrun: DDP, as before
    tp_fsdp = load_config(configs["llama"], ["parallel.strategy=fsdp", "parallel.tp=2"])
    assert layout_of(tp_fsdp, 8) == Layout(dp_shard=4, tp=2)  # fsdp agrees with sharding the rest
    assert Layout(tp=2, sequence_parallel=False, loss_parallel=True).validate(cfg.model, 2).tp == 2


# ---- bad layouts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    (["parallel.tp=4"], "parallel.tp = 4 does not divide the model's 2 key/value heads"),
    (["parallel.pp=4"], "4 pipeline stages but the model has only 2 layers"),
    (["parallel.dp_shard=2"], "dp_replicate × dp_shard × tp × pp = 1 × 2 × 1 × 1 = 2 but WORLD_SIZE is 4"),
    (["parallel.tp=3"], "WORLD_SIZE 4 is not divisible by dp_replicate × tp × pp = 1 × 3 × 1 = 3"),
    (["parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B"], "set parallel.pp_stages_per_rank = 2"),
    (["parallel.pp=2", "parallel.pp_schedule=ZigZag"], "parallel.pp_schedule must be one of 1F1B"),
    (["parallel.tp=2", "parallel.dp_replicate=2", "parallel.dp_shard=1"], "needs dp_shard > 1 (HSDP"),
    (["parallel.tp=2", "parallel.strategy=ddp"], "drop parallel.strategy"),
])
def test_bad_layouts_exit_2_before_any_process_group(setup, tmp_path, overrides, message):
    """WORLD_SIZE = 4 without torchrun: a layout that got as far as the process group would fail
    there (no MASTER_ADDR) with another message; each of these stops first, with one line."""
    _, configs, _ = setup
    env = dict(env_1thread(), WORLD_SIZE="4", RANK="0", LOCAL_RANK="0")
    env.pop("MASTER_ADDR", None)
    cmd = [sys.executable, "-m", "scalelab", "train", str(configs["llama"]), "--run-dir", str(tmp_path / "run")]
    for o in overrides:
        cmd += ["--set", o]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scalelab train: error:") and message in lines[0], r.stderr
    assert not (tmp_path / "run").exists()
