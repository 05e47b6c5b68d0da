"""`scalelab eval` against independent truth: transformers' own forward on the same tokens (read
from the shard files here), the trainer's last eval on a run, a brute-force per-position loss
(one forward per prefix), and a 2-rank torchrun launch against one process; then bad input."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scalelab.cli import main
from test_train import env_1thread, make_corpus_dir, train_inprocess, write_config

S_HF = 32  # window length for the transformers model


def run_main(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def eval_json(*argv) -> dict:
    rc, out, err = run_main("eval", *argv, "--json", "--no-progress")
    assert rc == 0, err
    return json.loads(out)


def refused(*argv) -> str:
    """The one stderr line of a refused `scalelab eval ARGV` (exit 2)."""
    rc, _, err = run_main("eval", *argv, "--no-progress")
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("scalelab eval: error: "), (rc, err)
    return lines[0]


def split_tokens(data: Path, split: str = "val") -> np.ndarray:
    """The split's token stream, read straight from the shard files meta.json lists."""
    meta = json.loads((data / "meta.json").read_text())
    return np.concatenate([np.fromfile(data / s["file"], dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]]
                          ).astype(np.int64)


def windows(tokens: np.ndarray, seq_len: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows 0..n-1 of seq_len + 1 tokens: (x, y)."""
    w = np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)])
    return torch.from_numpy(w[:, :-1]), torch.from_numpy(w[:, 1:])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_corpus_dir(tmp_path_factory.mktemp("eval") / "words", docs=120)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A tiny random LlamaForCausalLM saved by transformers itself (no hub)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # O(1) logits: the losses differ by position and window
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(5.0)
    path = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(path, safe_serialization=True)
    return model, path


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A tiny run with eval.at_end whose last eval covers every val window exactly once: the loader
    serves eval.batches × micro_batch_size windows, a permutation of the split's W = (N - 1) // S
    windows, so with W = 4 × eval.batches (S chosen here to make W a multiple of 4) it is all of
    them, the token set `scalelab eval` walks in order at the same S."""
    n = int(json.loads((data / "meta.json").read_text())["splits"]["val"]["tokens"])
    seq_len = next(s for s in range(32, 65) if ((n - 1) // s) % 4 == 0)
    batches = (n - 1) // seq_len // 4
    d = tmp_path_factory.mktemp("run")
    cfg = write_config(d / "c.toml", data, steps=3, ckpt_every=0, at_end=True)
    train_inprocess(cfg, d / "run", [f"train.seq_len={seq_len}", f"train.global_batch_tokens={4 * seq_len}",
                                     f"eval.batches={batches}"])
    return d / "run", seq_len


def test_hf_model_loss_equals_transformers_forward(hf_model, data):
    model, path = hf_model
    n = 20
    r = eval_json(path, "--data", data, "--seq-len", S_HF, "--tokens", n * S_HF - 5, "--batch-size", 3)
    x, y = windows(split_tokens(data), S_HF, n)
    with torch.no_grad():
        logits = model(input_ids=x).logits
    expected = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1)).item()
    assert r["tokens"] == n * S_HF and r["windows"] == n and r["seq_len"] == S_HF
    assert abs(r["loss"] - expected) < 1e-5, (r["loss"], expected)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))


def test_position_buckets_match_brute_force(hf_model, data):
    """One transformers forward per prefix (no causal mask involved) gives each position's loss."""
    model, path = hf_model
    n = 2
    r = eval_json(path, "--data", data, "--seq-len", S_HF, "--tokens", n * S_HF, "--buckets", "4,16")
    x, y = windows(split_tokens(data), S_HF, n)
    with torch.no_grad():
        per_position = [F.cross_entropy(model(input_ids=x[:, :t + 1]).logits[:, -1].float(), y[:, t],
                                        reduction="none").mean().item() for t in range(S_HF)]
    assert [(b["start"], b["end"], b["tokens"]) for b in r["buckets"]] == [(0, 4, 8), (4, 16, 24), (16, 32, 32)]
    for b in r["buckets"]:
        assert abs(b["loss"] - np.mean(per_position[b["start"]:b["end"]])) < 1e-5, b
    weighted = sum(b["loss"] * b["tokens"] for b in r["buckets"]) / sum(b["tokens"] for b in r["buckets"])
    assert abs(weighted - r["loss"]) < 1e-12
    assert abs(r["loss"] - np.mean(per_position)) < 1e-5


def test_default_buckets_are_powers_of_four():
    from scalelab.evaluate import default_buckets

    assert default_buckets(100) == [0, 100]
    assert default_buckets(512) == [0, 128, 512]
    assert default_buckets(8192) == [0, 128, 512, 2048, 8192]
    assert default_buckets(10000) == [0, 128, 512, 2048, 8192, 10000]


def test_run_directory_matches_the_trainers_last_eval(run, data, tmp_path):
    run_dir, seq_len = run
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    last = evals[-1]
    r = eval_json(run_dir, "--data", data, "--plot", tmp_path / "pos.png")  # the run's seq_len by default
    assert r["seq_len"] == seq_len
    assert abs(r["loss"] - last["val_loss"]) < 1e-6, (r["loss"], last["val_loss"])
    assert abs(r["bits_per_byte"] - last["val_bpb"]) < 1e-6
    assert (tmp_path / "pos.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # RUN/final (the native export) gives the same numbers
    assert eval_json(run_dir / "final", "--data", data)["loss"] == pytest.approx(r["loss"], abs=1e-9)


def test_table_output_and_determinism(run, data):
    run_dir, _ = run
    rc, out, _ = run_main("eval", run_dir, "--data", data, "--no-progress", "--tokens", "200")
    assert rc == 0 and "Loss by position" in out and "bits per byte" in out
    a = eval_json(run_dir, "--data", data, "--tokens", "300", "--batch-size", 2)
    b = eval_json(run_dir, "--data", data, "--tokens", "300", "--batch-size", 5)
    assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], abs=1e-6)


@pytest.mark.slow
def test_two_ranks_agree_with_one_process(run, data):
    run_dir, seq_len = run
    args = ["--data", str(data), "--batch-size", "3", "--buckets", "8", "--tokens", str(25 * seq_len)]
    single = eval_json(run_dir, *args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scalelab",
           "eval", str(run_dir), *args, "--json", "--no-progress", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env_1thread(), timeout=300)
    assert r.returncode == 0, r.stderr
    sharded = json.loads(r.stdout)  # rank 0 alone prints
    assert sharded["tokens"] == single["tokens"] and sharded["bytes"] == single["bytes"]
    assert sharded["windows"] == 25  # the ranks got unequal shares (13 and 12 windows)
    assert abs(sharded["loss"] - single["loss"]) < 1e-6
    for a, b in zip(sharded["buckets"], single["buckets"]):
        assert a["tokens"] == b["tokens"] and abs(a["loss"] - b["loss"]) < 1e-6


# ---- bad input ------------------------------------------------------------------------------------

def test_sequence_past_rope_positions_is_refused_unless_scaling_covers_it(run, data):
    run_dir, _ = run  # RoPE, block_size 64, no rope_scaling
    line = refused(run_dir, "--data", data, "--seq-len", 128)
    assert "block_size 64" in line and "rope_scaling" in line and "--set block_size=128" in line
    scaled = eval_json(run_dir, "--data", data, "--seq-len", 128, "--tokens", 256,
                       "--set", 'rope_scaling={type="linear", factor=2.0}')
    assert scaled["seq_len"] == 128
    line = refused(run_dir, "--data", data, "--seq-len", 256, "--set", 'rope_scaling={type="yarn", factor=2.0}')
    assert "covers factor 2 × 64 = 128" in line
    assert eval_json(run_dir, "--data", data, "--seq-len", 128, "--tokens", 128, "--set", "block_size=128")["tokens"] == 128


def test_sequence_past_learned_positions_is_refused(data, tmp_path):
    from scalelab import hf
    from scalelab.config import ModelConfig
    from scalelab.model import Transformer

    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=258, block_size=32, position_encoding="learned",
                      normalization="layernorm", ffn_type="gelu")
    hf.save_native(Transformer(cfg), tmp_path / "gpt")
    assert eval_json(tmp_path / "gpt", "--data", data, "--tokens", 64)["seq_len"] == 32
    assert "learned position embeddings for 32" in refused(tmp_path / "gpt", "--data", data, "--seq-len", 33)
    assert "weights do not fit" in refused(tmp_path / "gpt", "--data", data, "--set", "block_size=64")


@pytest.fixture(scope="module")
def bpe_data(data, tmp_path_factory) -> Path:
    """The same kind of text prepared with a byte-level BPE of vocab 300 (not the byte tokenizer)."""
    from scalelab.data.prepare import prepare
    from scalelab.data.tokenizer import train_bpe

    d = tmp_path_factory.mktemp("bpe")
    text = "the quick brown fox jumps over the lazy dog near the river bank.\n" * 200
    train_bpe([text], 300, d / "tok")
    prepare([(text, True), (text, True)], f"hf:{d / 'tok' / 'tokenizer.json'}", d / "data", val_fraction=0.5,
            progress=False)
    return d / "data"


def test_data_with_another_tokenizer_is_refused(run, data, bpe_data, tmp_path):
    from scalelab import hf
    from scalelab.config import ModelConfig
    from scalelab.model import Transformer

    run_dir, _ = run  # byte tokenizer, vocab 258 < 300
    assert "vocab 300, larger than the model's vocab_size 258" in refused(run_dir, "--data", bpe_data, "--seq-len", 16)
    # a model with room for 320 ids whose tokenizer (recorded beside it, as a run keeps it) is the byte one
    model_dir = tmp_path / "m"
    hf.save_native(Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=320, block_size=32)), model_dir)
    shutil.copy(data / "meta.json", model_dir / "data.json")
    shutil.copytree(data / "tokenizer", model_dir / "tokenizer")
    assert eval_json(model_dir, "--data", data, "--tokens", 32)["tokens"] == 32  # its own tokenizer's data: fine
    line = refused(model_dir, "--data", bpe_data, "--seq-len", 16)
    assert "was prepared with tokenizer hf:" in line and "not the model's (byte, vocab 258)" in line
    # the same model as a Hugging Face directory whose tokenizer.json is the byte tokenizer's export:
    # another format of the same tokenizer passes, the BPE data is still refused
    from scalelab.data.tokenizer import load_tokenizer

    model, _ = hf.load_checkpoint(model_dir)
    hf.save(model, tmp_path / "hf", tokenizer=load_tokenizer("byte"))
    assert eval_json(tmp_path / "hf", "--data", data, "--tokens", 32)["tokens"] == 32
    assert "was prepared with tokenizer hf:" in refused(tmp_path / "hf", "--data", bpe_data, "--seq-len", 16)


def test_other_bad_input_is_one_line(run, data, tmp_path):
    run_dir, _ = run
    assert "has no split 'test'" in refused(run_dir, "--data", data, "--split", "test")
    assert "no such model" in refused(tmp_path / "nothing", "--data", data)
    (tmp_path / "empty").mkdir()
    assert "neither a checkpoint nor a run directory" in refused(tmp_path / "empty", "--data", data)
    assert "--tokens 0 must be at least 1" in refused(run_dir, "--data", data, "--tokens", 0)
    assert "expected a .png file name" in refused(run_dir, "--data", data, "--plot", tmp_path / "p.txt")
    assert not (tmp_path / "p.txt").exists()
    assert "no meta.json" in refused(run_dir, "--data", tmp_path / "empty")
    assert "give --data DIR" in refused(run_dir)
    assert "--buckets 100 is outside" in refused(run_dir, "--data", data, "--buckets", "100")


def test_tasks_without_the_harness_module_is_one_line(run, monkeypatch):
    run_dir, _ = run
    monkeypatch.setitem(sys.modules, "scalelab.harness", None)  # import fails, as when it is not installed
    line = refused(run_dir, "--tasks", "hellaswag")
    assert 'pip install "scalelab[eval]"' in line


def test_tasks_calls_the_harness_and_keeps_json_stdout_clean(run, monkeypatch, tmp_path):
    """The CLI's side of --tasks, with a stand-in harness module (tests/test_harness.py runs the real one)."""
    import types

    run_dir, _ = run
    calls = []

    def evaluate_tasks(model_path, tasks, *, out_dir=None, limit=None, device="cpu", **extra):
        calls.append((str(model_path), tasks, out_dir, limit, device, extra))
        print("|task|acc|")  # the harness prints its table on stdout
        return {"results": {"tiny": {"acc,none": 0.5}}}

    monkeypatch.setitem(sys.modules, "scalelab.harness", types.SimpleNamespace(evaluate_tasks=evaluate_tasks))
    rc, out, err = run_main("eval", run_dir, "--tasks", "tiny, other", "--limit", 3, "--device", "cpu",
                            "--include-path", tmp_path, "--json")
    assert rc == 0 and json.loads(out)["results"] == {"tiny": {"acc,none": 0.5}}
    assert "|task|acc|" in err
    assert calls == [(str(run_dir), ["tiny", "other"], None, 3, "cpu", {"include_path": str(tmp_path)})]
    assert "give one of them" in refused(run_dir, "--tasks", "tiny", "--data", tmp_path)
