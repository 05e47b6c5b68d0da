"""The trainer on CPU with tiny models: config schema, schedule, learning, exact resume (also after
SIGTERM and kill -9), non-finite stop, bad-input exit codes, sample/plot/export on a run, and the
production config's comment numbers. Multi-process runs are in tests/test_distributed.py."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scalelab.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the quick brown fox jumps over lazy dog while seven small cats watch from a tall green tree "
         "near the river bank").split()


def make_corpus_dir(out: Path, docs: int = 400, seed: int = 0) -> Path:
    """A small prepared data directory (byte tokenizer): random sentences over a 20-word vocabulary,
    so bytes are far more predictable in context than their unigram distribution suggests."""
    from scalelab.data.prepare import prepare

    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + ".\n" for _ in range(docs)]
    prepare([(t, True) for t in texts], "byte", out, val_fraction=0.1, progress=False)
    return out


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return make_corpus_dir(tmp_path_factory.mktemp("data") / "words")


TINY = """
[model]
style = "llama3"
n_layer = 2
n_embd = 64
n_head = 4
vocab_size = 258
block_size = 64

[data]
dir = "{data}"

[train]
seq_len = 32
micro_batch_size = 4
global_batch_tokens = 256
max_steps = {steps}
lr = 3e-3
min_lr = 3e-4
warmup = 4
schedule = "{schedule}"
dtype = "fp32"
deterministic = true
seed = 7

[eval]
every = 0
batches = 4
at_end = {at_end}

[checkpoint]
every = {ckpt_every}
keep = 2

[logging]
every = 1
"""


def write_config(path: Path, data: Path, steps: int = 12, ckpt_every: int = 4, schedule: str = "cosine",
                 at_end: bool = False) -> Path:
    path.write_text(TINY.format(data=data, steps=steps, ckpt_every=ckpt_every, schedule=schedule,
                                at_end=str(at_end).lower()))
    return path


def env_1thread() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))


def cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scalelab", *map(str, args)], capture_output=True, text=True,
                          env=env_1thread(), timeout=kw.get("timeout", 240))


def read_stderr_until(proc: subprocess.Popen, prefix: str) -> list[str]:
    """Block on the process's stderr until a line starts with `prefix` (no polling); the lines read."""
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"the process ended (exit {proc.wait()}) before printing {prefix!r}:\n{''.join(lines)}")


def losses(run_dir: Path) -> dict[int, float]:
    from scalelab.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def train_inprocess(config: Path, run_dir: Path, overrides=()) -> dict:
    """Train in this process with one thread (as the subprocess runs do: same summation order)."""
    import torch

    from scalelab.train.config import load_config
    from scalelab.train.trainer import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(load_config(config, list(overrides)), run_dir, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)


# ---- config ---------------------------------------------------------------------------------------

def test_config_unknown_key_names_closest(tmp_path, data_dir):
    from scalelab.train.config import load_config

    cfg = write_config(tmp_path / "c.toml", data_dir)
    with pytest.raises(UserError, match=r"unknown key 'train.warmpu'.*did you mean 'warmup'"):
        load_config(cfg, ["train.warmpu=5"])
    with pytest.raises(UserError, match=r"unknown section \[trian\].*did you mean 'train'"):
        load_config(cfg, ["trian.lr=1"])
    with pytest.raises(UserError, match=r"unknown field 'n_layers'.*did you mean 'n_layer'"):
        load_config(cfg, ["model.n_layers=3"])


def test_config_types_and_lengths(tmp_path, data_dir):
    from scalelab.train.config import grad_accum_steps, load_config

    cfg = write_config(tmp_path / "c.toml", data_dir)
    with pytest.raises(UserError, match="train.lr must be a number"):
        load_config(cfg, ["train.lr=fast"])
    with pytest.raises(UserError, match="train.compile must be true or false"):
        load_config(cfg, ["train.compile=1"])
    with pytest.raises(UserError, match="train.betas must be a pair"):
        load_config(cfg, ["train.betas=[0.9]"])
    with pytest.raises(UserError, match="train.dtype must be one of auto, bf16, fp16, fp32"):
        load_config(cfg, ["train.dtype=fp8"])
    with pytest.raises(UserError, match="exactly one of train.max_steps, train.max_tokens, train.max_flops"):
        load_config(cfg, ["train.max_tokens=1e6"])
    with pytest.raises(UserError, match="name the section"):
        load_config(cfg, ["lr=1"])
    c = load_config(cfg, ["train.lr=1e-3", "model.n_layer=3"])
    assert c.train.lr == 1e-3 and c.model.n_layer == 3
    assert grad_accum_steps(c, 1) == 2 and grad_accum_steps(c, 2) == 1
    with pytest.raises(UserError, match="not a multiple of micro_batch_size"):
        grad_accum_steps(c, 3)


def test_config_round_trip_and_planner_output(tmp_path, data_dir):
    from scalelab.train.config import config_from_dict, load_config, total_steps

    c = load_config(write_config(tmp_path / "c.toml", data_dir))
    (tmp_path / "resolved.toml").write_text(c.to_toml())
    again = load_config(tmp_path / "resolved.toml")
    assert again.to_dict() == c.to_dict()
    # What `scalelab plan --emit-config` writes: [model] full fields, [train] seq_len + max_tokens, [data] dir.
    planned = config_from_dict({"model": c.model.to_dict(), "data": {"dir": str(data_dir)},
                                "train": {"seq_len": 32, "max_tokens": 1_000_000}})
    assert planned.model == c.model
    assert total_steps(planned, tokens_per_step=32 * 8, flops_per_step=1.0) == math.ceil(1_000_000 / 256)


def test_config_reference_doc_is_generated():
    from scalelab.train.config import SECTIONS, config_reference_markdown

    doc = (ROOT / "docs" / "training-config.md").read_text()
    assert doc.strip() == config_reference_markdown().strip(), \
        "regenerate: python -m scalelab.train.config > docs/training-config.md"
    import dataclasses

    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in doc and f.metadata["doc"]


def test_schedule():
    from scalelab.train.schedule import learning_rate

    kw = dict(lr=1.0, min_lr=0.1, warmup=10, total=110)
    assert learning_rate(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert learning_rate(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert learning_rate(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert learning_rate(109, schedule="cosine", **kw) == pytest.approx(0.1)
    assert learning_rate(10 + 99 / 2, schedule="cosine", **kw) == pytest.approx(0.55)
    assert learning_rate(10 + 99 / 2, schedule="linear", **kw) == pytest.approx(0.55)
    assert learning_rate(30, schedule="linear", **kw) == pytest.approx(1.0 - 0.9 * 20 / 99)
    assert learning_rate(100, schedule="constant", **kw) == 1.0
    lrs = [learning_rate(s, schedule="cosine", **kw) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


# ---- training -----------------------------------------------------------------------------------

def unigram_entropy_nats(data_dir: Path) -> float:
    meta = json.loads((data_dir / "meta.json").read_text())
    tokens = np.concatenate([np.fromfile(data_dir / s["file"], dtype=meta["dtype"])
                             for s in meta["splits"]["train"]["shards"]])
    p = np.bincount(tokens) / tokens.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_loss_falls_well_below_unigram_entropy(tmp_path, data_dir):
    cfg = write_config(tmp_path / "c.toml", data_dir, steps=80, ckpt_every=0, at_end=True)
    summary = train_inprocess(cfg, tmp_path / "run", ["train.micro_batch_size=8", "train.global_batch_tokens=512",
                                                      "logging.every=10"])
    h1 = unigram_entropy_nats(data_dir)
    assert 2.3 < h1 < 3.2  # ~3.7 bits per byte: spaces and a few letters dominate
    assert summary["val_loss"] < 0.7 * h1, (summary["val_loss"], h1)
    assert summary["loss"] < 0.7 * h1
    # bits per byte: every target token is a byte except the EOS between documents
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / math.log(2), rel=0.05)
    run = tmp_path / "run"
    for name in ("config.toml", "model.toml", "metrics.jsonl", "final/model.safetensors", "final/model.toml"):
        assert (run / name).is_file(), name
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(10, 81, 10))
    from scalelab.config import ModelConfig
    from scalelab.counting import training_flops

    model = ModelConfig.from_toml(run / "model.toml")
    assert train[-1]["flops"] == 80 * training_flops(model, 16, 32)  # exact convention, 16 sequences/step
    assert train[-1]["tokens"] == 80 * 512
    for key in ("loss", "lr", "tokens_per_second", "mfu", "grad_norm", "tflops_per_second", "peak_memory_bytes"):
        assert key in train[-1]
    assert train[-1]["mfu"] is None  # CPU: no peak in the hardware table
    assert any(r["kind"] == "eval" and r["val_loss"] > 0 for r in records)


def test_exact_resume_after_sigterm_and_kill9(tmp_path, data_dir):
    """N steps straight == k steps, stop (SIGTERM / kill -9), resume to N: identical per-step losses."""
    import torch

    from scalelab.train.checkpoint import list_checkpoints, load_model_for_inference

    n = 40
    cfg = write_config(tmp_path / "c.toml", data_dir, steps=n, ckpt_every=4)
    train_inprocess(cfg, tmp_path / "straight")
    straight = losses(tmp_path / "straight")
    assert sorted(straight) == list(range(1, n + 1))

    for how in (signal.SIGTERM, signal.SIGKILL):
        run = tmp_path / f"run_{how.name}"
        proc = subprocess.Popen([sys.executable, "-m", "scalelab", "train", str(cfg), "--run-dir", str(run)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_1thread())
        read_stderr_until(proc, f"step 6/{n} ")  # logged after metrics.jsonl has step 6 and checkpoint 4
        proc.send_signal(how)
        out, err = proc.communicate(timeout=120)
        if how == signal.SIGTERM:
            assert proc.returncode == 128 + signal.SIGTERM, err
            assert "stopped at step" in err and "resume" in err
            # the signal checkpoint is complete and loadable (weights_only torch.load inside)
            (step, path), = list_checkpoints(run)[-1:]
            assert step < n
            assert torch.load(path / "trainer.pt", weights_only=True)["step"] == step
            load_model_for_inference(path)
        else:
            assert proc.returncode == -signal.SIGKILL
        stopped_at = list_checkpoints(run)[-1][0]
        assert 4 <= stopped_at < n, f"{how.name}: the run finished before the signal; make steps slower"
        r = cli("train", cfg, "--run-dir", run)
        assert r.returncode == 0, r.stderr
        assert f"resumed from {run}/checkpoints/step_{stopped_at:08d}" in r.stderr
        resumed = losses(run)
        assert sorted(resumed) == list(range(1, n + 1))
        assert [resumed[s] for s in range(1, n + 1)] == [straight[s] for s in range(1, n + 1)], how.name
        assert len(list_checkpoints(run)) == 2  # keep = 2


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir):
    from scalelab.train.checkpoint import latest_checkpoint, load_model_for_inference
    from scalelab.train.trainer import TrainingDiverged

    cfg = write_config(tmp_path / "c.toml", data_dir, steps=20, ckpt_every=1)
    with pytest.raises(TrainingDiverged, match=r"not finite.*Last good checkpoint: .*step_0000000\d"):
        train_inprocess(cfg, tmp_path / "run", ["train.lr=1e30", "train.min_lr=1e29", "train.warmup=0",
                                                "train.grad_clip=0"])
    good = latest_checkpoint(tmp_path / "run")
    model = load_model_for_inference(good)
    assert all(p.isfinite().all() for p in model.parameters())
    r = cli("train", cfg, "--run-dir", tmp_path / "run2", "--set", "train.lr=1e30", "--set", "train.min_lr=1e29",
            "--set", "train.warmup=0", "--set", "train.grad_clip=0")
    assert r.returncode == 1 and "not finite" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("override,pattern", [
    ("train.lerning_rate=1", r"unknown key 'train.lerning_rate'"),
    ("train.micro_batch_size=big", r"train.micro_batch_size must be an integer"),
    ("model.vocab_size=200", r"vocab 258, larger than the model's vocab_size 200"),
    ("data.dir=/nonexistent/data", r"data directory /nonexistent/data does not exist"),
    # absurd numbers: refused by the key's range, before anything runs
    ("train.max_steps=1e30", r"train.max_steps must be in \[1, 1,000,000,000\], got 1e\+30"),
    ("eval.every=-1", r"eval.every must be in \[0, 1,000,000,000\], got -1"),
    ("train.seed=-1", r"train.seed must be in \[0, 4,294,967,295\], got -1"),
    ("checkpoint.keep=0", r"checkpoint.keep must be in \[1, 1,000,000\], got 0"),
    ("parallel.strategy=fsdp", r"parallel.strategy = fsdp shards over processes: launch with torchrun.*"
                               r"parallel.strategy = none"),
    # beyond any model: refused by the config's bounds
    ("model.n_layer=1e12", r"n_layer must be a positive integer at most 65,536"),
    ("model.vocab_size=1000000000", r"vocab_size must be a positive integer at most"),
    # valid sizes, too big for this machine's memory (~48 and ~33 GB of weights and AdamW state):
    # refused before the model is built, within seconds
    ("model.n_layer=60000", r"the run needs .* but .* is available on this host.*train.check_memory = false"),
    ("model.vocab_size=16000000", r"the run needs .* but .* is available on this host"),
])
def test_bad_config_exits_2_with_one_line(tmp_path, data_dir, override, pattern):
    cfg = write_config(tmp_path / "c.toml", data_dir)
    r = cli("train", cfg, "--run-dir", tmp_path / "run", "--set", override, timeout=60)
    assert r.returncode == 2, r.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scalelab train: error:"), r.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_training_length_is_bounded_in_steps(tmp_path, data_dir):
    from scalelab.train.config import config_from_dict, load_config, total_steps

    c = load_config(write_config(tmp_path / "c.toml", data_dir)).to_dict()
    del c["train"]["max_steps"]
    c["train"]["max_tokens"] = 1e15
    with pytest.raises(UserError, match=r"train.max_tokens = 1e\+15 at 256 per step is 3.91e\+12 steps, more than"):
        total_steps(config_from_dict(c), tokens_per_step=256, flops_per_step=1e9)
    c["train"]["max_tokens"] = 1e17
    with pytest.raises(UserError, match=r"train.max_tokens must be in \[1, 1e\+16\]"):
        config_from_dict(c)


def test_resume_flag_without_checkpoint_is_bad_input(tmp_path, data_dir):
    r = cli("train", write_config(tmp_path / "c.toml", data_dir), "--run-dir", tmp_path / "empty", "--resume")
    assert r.returncode == 2 and "no checkpoint to resume from" in r.stderr


# ---- sample, plot, export on a finished run ---------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir) -> Path:
    d = tmp_path_factory.mktemp("finished")
    cfg = write_config(d / "c.toml", data_dir, steps=60, ckpt_every=30)
    train_inprocess(cfg, d / "run", ["train.micro_batch_size=8", "train.global_batch_tokens=512", "logging.every=5"])
    return d / "run"


def test_sample_uses_kv_cache_and_seed(finished_run):
    import torch

    from scalelab.data.tokenizer import load_tokenizer
    from scalelab.train.checkpoint import load_model_for_inference

    a = cli("sample", finished_run, "--prompt", "the quick", "--max-new-tokens", "40", "--seed", "5", "--json")
    b = cli("sample", finished_run / "final", "--prompt", "the quick", "--max-new-tokens", "40", "--seed", "5", "--json")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    sa, sb = json.loads(a.stdout)["samples"], json.loads(b.stdout)["samples"]
    assert sa == sb and sa[0].startswith("the quick")
    alphabet = set(" ".join(WORDS) + ".\n")
    assert sum(c in alphabet for c in sa[0]) >= 0.9 * len(sa[0])  # it learned the alphabet
    # greedy sampling equals greedy decoding without the cache
    g = cli("sample", finished_run, "--prompt", "the", "--max-new-tokens", "20", "--temperature", "0", "--json",
            "--no-stop")
    model = load_model_for_inference(finished_run)
    tok = load_tokenizer("byte")
    idx = torch.tensor([[tok.eos_id] + tok.encode("the")])
    ref = model.generate(idx, 20, temperature=0, use_cache=False)[0, idx.size(1):].tolist()
    assert json.loads(g.stdout)["samples"][0] == "the" + tok.decode(ref)


def test_plot_and_export_hf(finished_run, tmp_path):
    r = cli("plot", finished_run, finished_run, "--out", tmp_path / "curves.png")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = cli("export-hf", finished_run / "checkpoints" / "step_00000060", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hf" / "config.json").is_file()
    assert cli("plot", tmp_path, "--out", tmp_path / "x.png").returncode == 2


# ---- the production config's comments ------------------------------------------------------------

def production_estimates(config: Path) -> list[str]:
    """The comment lines of configs/llama3.1-8b.toml that carry numbers, recomputed by scalelab.counting.
    Print them with: python tests/test_train.py"""
    from scalelab.counting import count_params, training_flops_per_token, training_memory, training_time
    from scalelab.hardware import get_accelerator
    from scalelab.train.config import grad_accum_steps, load_config

    cfg = load_config(config, ["data.dir=unused"])
    m, t = cfg.model, cfg.train
    n = count_params(m).total
    tokens = 20 * n  # Chinchilla-optimal D ≈ 20 N
    per_token = training_flops_per_token(m, t.seq_len)
    lines = [f"# N = {n:,} parameters; Chinchilla-optimal D = 20 N = {tokens / 1e9:.1f}B tokens; "
             f"{per_token / 1e9:.1f} GFLOP per token at seq_len {t.seq_len} -> C = {per_token * tokens:.3g} FLOPs",
             "# setup          | memory/GPU (FSDP, bf16-mixed, AC, micro-batch 1, accumulation) | tokens/s @40% MFU "
             "| time @40% MFU"]
    for gpus, name in ((2, "A6000"), (4, "A100-80GB"), (8, "B200")):
        acc = get_accelerator(name)
        mem = training_memory(m, micro_batch=t.micro_batch_size, seq_len=t.seq_len, num_devices=gpus, sharding="fsdp",
                              precision="bf16-mixed", activation_checkpointing=t.activation_checkpointing,
                              loss_chunk_tokens=t.loss_chunk_tokens, grad_accum_steps=grad_accum_steps(cfg, gpus))
        fits = "fits" if mem["total"] <= acc.memory_bytes else "DOES NOT FIT"
        tt = training_time(per_token, tokens, acc, gpus, mfu=0.4)
        lines.append(f"# {gpus} x {name:<10} | {mem['total'] / 2**30:6.1f} GiB of {acc.memory_gib:.0f} ({fits}; "
                     f"states {(mem['weights'] + mem['gradients'] + mem['optimizer']) / 2**30:.1f} GiB, "
                     f"{mem['grad_accum_steps']} micro-batches accumulating "
                     f"{mem['accumulated_gradients'] / 2**30:.1f} GiB) "
                     f"| {tt['tokens_per_second']:8,.0f} | {tt['days']:6.1f} days")
    return lines


def test_llama_config_comments_are_current():
    path = ROOT / "configs" / "llama3.1-8b.toml"
    text = path.read_text()
    for line in production_estimates(path):
        assert line in text, f"stale comment in {path}; regenerate with `python tests/test_train.py`:\n{line}"


def test_shipped_configs_are_valid():
    from scalelab.train.config import load_config

    for name in ("demo", "gpt2-124m", "llama3.1-8b"):
        cfg = load_config(ROOT / "configs" / f"{name}.toml")
        assert cfg.data.dir
    big = load_config(ROOT / "configs" / "llama3.1-8b.toml")
    m = big.model
    assert (m.n_layer, m.n_embd, m.n_head, m.num_key_value_heads, m.ffn_hidden, m.rope_theta, m.vocab_size) == \
        (32, 4096, 32, 8, 14336, 500000.0, 128256)
    assert big.parallel.strategy == "fsdp" and big.train.dtype == "bf16"


if __name__ == "__main__":
    print("\n".join(production_estimates(ROOT / "configs" / "llama3.1-8b.toml")))


def test_activation_checkpointing_and_mixed_precision(tmp_path, data_dir):
    """Recomputing activations changes nothing (fp32: identical losses); bf16 autocast and fp16 with
    a grad scaler train the same model to within rounding."""
    cfg = write_config(tmp_path / "c.toml", data_dir, steps=4, ckpt_every=0)
    base = ["checkpoint.every=0", "train.deterministic=false"]
    runs = {}
    for name, extra in {"fp32": [], "ac": ["train.activation_checkpointing=true"],
                        "ac_op": ["train.activation_checkpointing=selective", "logging.peak_tflops=1"],
                        "ac_layer": ["train.activation_checkpointing=selective", "train.selective_ac_option=2"],
                        "bf16": ["train.dtype=bf16"], "fp16": ["train.dtype=fp16"]}.items():
        train_inprocess(cfg, tmp_path / name, base + extra)
        runs[name] = [losses(tmp_path / name)[s] for s in range(1, 5)]
    assert runs["ac"] == runs["ac_op"] == runs["ac_layer"] == runs["fp32"]
    # HFU counts the recomputation selective-by-op executes on top of the model's FLOPs
    from scalelab.counting import executed_training_flops, training_flops
    from scalelab.train.config import load_config
    from scalelab.train.metrics import read_metrics

    c = load_config(cfg, base)
    record = [r for r in read_metrics(tmp_path / "ac_op") if r["kind"] == "train"][-1]
    ratio = executed_training_flops(c.model, 1, c.train.seq_len, activation_checkpointing="selective",
                                    attention=c.train.attention) / training_flops(c.model, 1, c.train.seq_len)
    assert ratio > 1 and record["hfu"] == pytest.approx(record["mfu"] * ratio)
    for name in ("bf16", "fp16"):
        assert runs[name] != runs["fp32"]  # autocast did something
        assert runs[name] == pytest.approx(runs["fp32"], abs=0.02), name


def test_resume_with_a_different_model_is_bad_input_and_leaves_the_run_alone(finished_run):
    before = (finished_run / "config.toml").read_text()
    r = cli("train", finished_run / ".." / "c.toml", "--run-dir", finished_run, "--set", "model.n_layer=3")
    assert r.returncode == 2 and "model.n_layer 2 -> 3" in r.stderr, r.stderr
    assert (finished_run / "config.toml").read_text() == before


# ---- the run directory: what train may write into, and one writer at a time -------------------------

def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (but the lock, whose holder's pid is rewritten by each taker) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_second_writer_is_refused_and_the_first_run_is_untouched(tmp_path, data_dir):
    """Two `scalelab train` on one run directory: the second exits 2 naming the first's pid and changes
    nothing. Deterministic: the first is frozen (SIGSTOP) once it has printed its first step, which it
    does only while holding the lock, and thawed after the second has been refused."""
    cfg = write_config(tmp_path / "c.toml", data_dir, steps=12, ckpt_every=4)
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "scalelab", "train", str(cfg), "--run-dir", str(run)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_1thread())
    try:
        read_stderr_until(first, "step 1/12 ")
        first.send_signal(signal.SIGSTOP)
        before = snapshot(run)
        assert (run / ".lock").read_text().split()[0] == str(first.pid)
        second = cli("train", cfg, "--run-dir", run, "--set", "train.lr=1e-3")
        assert second.returncode == 2, second.stderr
        line, = second.stderr.strip().splitlines()
        assert line.startswith("scalelab train: error:") and f"in use by another scalelab train (pid {first.pid} " in line
        assert snapshot(run) == before
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=240)
    assert first.returncode == 0, err
    assert "lr = 0.003" in (run / "config.toml").read_text()
    assert sorted(losses(run)) == list(range(1, 13))
    from scalelab.train.checkpoint import list_checkpoints

    assert [s for s, _ in list_checkpoints(run)] == [8, 12]


def test_train_writes_only_into_run_directories(tmp_path, data_dir):
    """A prepared data directory, a demo's output, a directory holding someone's config.toml, a file:
    refused (exit 2, one line) and left byte for byte as they were. Empty directories are fine."""
    from scalelab.train.trainer import train

    cfg = write_config(tmp_path / "c.toml", data_dir, steps=1)
    before = snapshot(data_dir)
    r = cli("train", cfg, "--run-dir", data_dir)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "is not empty and is not a run directory" in r.stderr and "left it untouched" in r.stderr
    assert snapshot(data_dir) == before and not (data_dir / ".lock").exists()

    demo = tmp_path / "demo"  # what `scalelab demo` leaves (its run is demo/run)
    (demo / "tokenizer").mkdir(parents=True)
    (demo / "tokenizer" / "tokenizer.json").write_text("{}")
    (demo / "plan.toml").write_text("[model]\n")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.toml").write_text(cfg.read_text())  # a config, but not one a run wrote
    from scalelab.train.config import load_config

    for bad in (demo, foreign):
        before = snapshot(bad)
        with pytest.raises(UserError, match="is not empty and is not a run directory"):
            train(load_config(cfg), bad, log=lambda m: None)
        assert snapshot(bad) == before and not (bad / ".lock").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        train(load_config(cfg), tmp_path / "file", log=lambda m: None)
    assert (tmp_path / "file").read_text() == "x"

    empty = tmp_path / "empty"
    empty.mkdir()
    train_inprocess(cfg, empty)
    assert (empty / "config.toml").read_text().startswith("# scalelab run directory: written by `scalelab train`")
    from scalelab.train.trainer import enclosing_run_dir, is_run_dir

    assert is_run_dir(empty) and not is_run_dir(foreign) and not is_run_dir(data_dir)
    for inside in (empty, empty / "final", *(empty / "checkpoints").glob("step_*")):
        assert enclosing_run_dir(inside).resolve() == empty.resolve(), inside
    assert enclosing_run_dir(foreign) is None and enclosing_run_dir(data_dir) is None


def test_caller_config_is_not_changed(tmp_path, data_dir):
    """dtype auto is resolved for the run (config.toml says fp32 on a CPU), not in the caller's cfg."""
    import torch

    from scalelab.train.config import load_config
    from scalelab.train.trainer import train

    cfg = load_config(write_config(tmp_path / "c.toml", data_dir, steps=1), ["train.dtype=auto"])
    before = cfg.to_dict()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, tmp_path / "run", log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    assert cfg.train.dtype == "auto" and cfg.to_dict() == before
    assert 'dtype = "fp32"' in (tmp_path / "run" / "config.toml").read_text()


# ---- resume: what may change, and a finished run -----------------------------------------------------

def test_resume_rule_refuses_what_changes_finished_steps_and_accepts_the_rest(tmp_path, data_dir):
    cfg = write_config(tmp_path / "c.toml", data_dir, steps=8, ckpt_every=4)
    run = tmp_path / "run"
    train_inprocess(cfg, run)
    first = losses(run)
    before = snapshot(run)
    for override, shown in [("train.seed=8", "train.seed 7 -> 8"), ("train.seq_len=16", "train.seq_len 32 -> 16"),
                            ("train.global_batch_tokens=512", "global batch 8 -> 16 sequences per step"),
                            ("train.dtype=bf16", 'train.dtype "fp32" -> "bf16"'),
                            ("train.max_steps=6", "total steps 8 -> 6, fewer than the 8 already done")]:
        with pytest.raises(UserError, match=re.escape(shown)):
            train_inprocess(cfg, run, [override])
        assert snapshot(run) == before, override
    # accepted: a new peak lr and a longer run; the diff and the schedule's change are printed
    r = cli("train", cfg, "--run-dir", run, "--set", "train.lr=1e-3", "--set", "train.max_steps=12")
    assert r.returncode == 0, r.stderr
    from scalelab.train.schedule import learning_rate

    old_lr = learning_rate(8, lr=3e-3, min_lr=3e-4, warmup=4, total=8, schedule="cosine")
    new_lr = learning_rate(8, lr=1e-3, min_lr=3e-4, warmup=4, total=12, schedule="cosine")
    assert (f"train.lr 0.003 -> 0.001; train.max_steps 8 -> 12; total steps 8 -> 12. The learning-rate schedule "
            f"is recomputed over 12 steps with the new values: lr at step 9 {old_lr:.3g} -> {new_lr:.3g}") in r.stderr
    resumed = losses(run)
    assert sorted(resumed) == list(range(1, 13)) and all(resumed[s] == first[s] for s in range(1, 9))
    assert "lr = 0.001" in (run / "config.toml").read_text()


def test_rerunning_a_finished_run_reports_its_recorded_figures(tmp_path, finished_run):
    """No 'Final train loss nan': the run is complete, its recorded loss is reported, nothing is rewritten."""
    from scalelab.train.metrics import read_metrics

    before = snapshot(finished_run)
    r = cli("train", finished_run / ".." / "c.toml", "--run-dir", finished_run, "--set", "train.micro_batch_size=8",
            "--set", "train.global_batch_tokens=512", "--set", "logging.every=5")
    assert r.returncode == 0, r.stderr
    assert "is already complete (60/60 steps)" in r.stderr and "nan" not in r.stdout.lower()
    last = [m for m in read_metrics(finished_run) if m["kind"] == "train"][-1]
    assert last["step"] == 60 and f"{last['loss']:.4f}" in r.stdout and "Already complete" in r.stdout
    assert snapshot(finished_run) == before


# ---- memory feasibility and the ETA ---------------------------------------------------------------

def test_memory_feasibility_is_checked_before_building(tmp_path, data_dir):
    from scalelab.train.config import load_config
    from scalelab.train.trainer import meminfo_available, memory_problem

    assert meminfo_available("MemTotal:  100 kB\nMemAvailable:   2048 kB\n") == 2048 * 1024
    assert meminfo_available("MemTotal:  100 kB\n") is None
    cfg = load_config(write_config(tmp_path / "c.toml", data_dir))
    assert memory_problem(cfg, "none", 1, (64 * 2**30, "free")) is None
    problem = memory_problem(cfg, "none", 1, (1e5, "available on this host (MemAvailable)"))
    for way in ("lower train.micro_batch_size (4)", "lower train.seq_len (32)", 'train.activation_checkpointing = "full"',
                'parallel.strategy = "fsdp" under torchrun', "train.check_memory = false"):
        assert way in problem
    assert "× 4 ranks on this host" in memory_problem(cfg, "ddp", 2, (1e5, "x"), ranks_sharing=4)  # world 2: its 256-token batch is one micro-batch per rank
    assert memory_problem(load_config(tmp_path / "c.toml", ["train.check_memory=false"]), "none", 1, (1e5, "x")) is None
    # llama3.1-8b: 8.0e9 parameters × 16 bytes of bf16-mixed AdamW state alone is 128 GB
    available = meminfo_available(Path("/proc/meminfo").read_text())
    if available is None or available > 1.2e11:
        pytest.skip("needs a host with less than 120 GB available")
    r = cli("train", ROOT / "configs" / "llama3.1-8b.toml", "--check", "--set", f"data.dir={data_dir}",
            "--set", "parallel.strategy=none", timeout=60)
    assert r.returncode == 2 and "the run needs" in r.stderr and "available on this host" in r.stderr, r.stderr


def test_eta_is_the_mean_step_time_so_far():
    """Per-step times on a shared machine: mostly 1 s, with every fifth 10-step window 20x slower.
    The old estimate (the last window's rate) jumps 20x up and back; the mean so far moves smoothly."""
    from scalelab.train.metrics import eta_seconds

    assert eta_seconds(30.0, 10, 5) == 15.0 and math.isnan(eta_seconds(0.0, 0, 5))
    steps, every = 400, 10
    durations = [20.0 if (i // every) % 5 == 4 else 1.0 for i in range(steps)]
    new, old = [], []
    for step in range(every, steps, every):
        new.append(eta_seconds(sum(durations[:step]), step, steps - step) / (steps - step))
        old.append(sum(durations[step - every:step]) / every)
    later = new[9:]  # from step 100, a quarter of the run and two slow windows in
    assert max(b / a for a, b in zip(later, later[1:])) < 1.5 and min(b / a for a, b in zip(later, later[1:])) > 0.75
    assert max(b / a for a, b in zip(old, old[1:])) == 20.0
