"""Context extension: train.init_from (weights only, step 0, refused shape changes, resume), RoPE
scaling from a training config against transformers' rotary embedding, bad rope_scaling input, and
the comment numbers of configs/llama3.1-8b-128k.toml."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from test_train import ROOT, cli, losses, make_corpus_dir, train_inprocess, write_config

LINEAR = 'model.rope_scaling={type="linear", factor=2.0}'
EXTEND = ["model.block_size=128", "train.seq_len=64", "train.micro_batch_size=2", LINEAR]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_corpus_dir(tmp_path_factory.mktemp("data") / "words")


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, data_dir) -> Path:
    """A finished tiny run at seq_len 32 (4 steps)."""
    tmp = tmp_path_factory.mktemp("source")
    run = tmp / "run"
    train_inprocess(write_config(tmp / "c.toml", data_dir, steps=4, ckpt_every=0), run)
    return run


def extension_config(tmp_path: Path, data_dir: Path, source: Path, steps: int = 6, ckpt_every: int = 0,
                     extra=()) -> tuple[Path, list[str]]:
    return (write_config(tmp_path / "ext.toml", data_dir, steps=steps, ckpt_every=ckpt_every),
            [*EXTEND, f"train.init_from={source}", *extra])


def test_init_from_copies_weights_and_starts_at_step_zero(tmp_path, data_dir, source_run):
    from scalelab import hf
    from scalelab.train.checkpoint import load_trainer_state
    from scalelab.train.config import load_config
    from scalelab.train.parallel import Dist
    from scalelab.train.trainer import Trainer

    config, overrides = extension_config(tmp_path, data_dir, source_run)
    cfg = load_config(config, overrides)
    trainer = Trainer(cfg, tmp_path / "built", Dist(), log=lambda m: None)
    try:
        assert trainer.build(resume=False) is None
        source = hf.read_safetensors(source_run / "final")
        model = trainer.model.state_dict()
        assert set(source) <= set(model)
        for key, tensor in source.items():
            assert torch.equal(model[key], tensor), key
        assert trainer.step == 0 and trainer.optimizer.state == {}
        assert trainer.model.config.rope_scaling == {"type": "linear", "factor": 2.0}
    finally:
        trainer.close()
        torch.use_deterministic_algorithms(False)  # build set it (the config is deterministic)

    run = tmp_path / "run"
    summary = train_inprocess(config, run, overrides)
    assert summary["step"] == 6
    from scalelab.train.metrics import read_metrics

    first = next(r for r in read_metrics(run) if r["kind"] == "train")
    assert first["step"] == 1 and first["lr"] == pytest.approx(3e-3 / 4)  # warmup 4 from step 0: lr / 4
    assert first["tokens"] == 256  # counted from zero, not from the source's 4 steps
    assert load_trainer_state(Path(summary["checkpoint"]))["init_from"] == str(source_run.resolve() / "checkpoints"
                                                                               / "step_00000004")
    assert f'init_from = "{source_run}"' in (run / "config.toml").read_text()


@pytest.mark.parametrize("form", ["run", "checkpoint", "final", "hf"])
def test_init_from_reads_every_source_form(tmp_path, data_dir, source_run, form):
    """A run directory, a checkpoint, RUN/final and a Hugging Face export all give the same weights
    and pass the checks against the extension's [model]."""
    from scalelab import hf
    from scalelab.data.loader import read_metadata
    from scalelab.train.config import load_config
    from scalelab.train.init_from import check_source, load_weights

    path = {"run": source_run, "checkpoint": source_run / "checkpoints" / "step_00000004",
            "final": source_run / "final", "hf": tmp_path / "hf"}[form]
    if form == "hf":
        assert cli("export-hf", source_run, path).returncode == 0
    config, overrides = extension_config(tmp_path, data_dir, path)
    cfg = load_config(config, overrides)
    source = check_source(str(path), cfg.model, read_metadata(data_dir))
    weights, expected = load_weights(source), hf.read_safetensors(source_run / "final")
    assert set(expected) <= set(weights)
    for key, tensor in expected.items():
        assert torch.equal(weights[key], tensor), key


@pytest.mark.parametrize("change,field", [("model.n_layer=3", "model.n_layer 2 -> 3"),
                                          ("model.n_embd=32", "model.n_embd 64 -> 32"),
                                          ("model.num_key_value_heads=2", "model.num_key_value_heads 4 -> 2"),
                                          ("model.tie_embeddings=true", "model.tie_embeddings False -> True")])
def test_init_from_refuses_a_shape_change(tmp_path, data_dir, source_run, change, field):
    config, overrides = extension_config(tmp_path, data_dir, source_run, extra=[change])
    r = cli("train", config, "--run-dir", tmp_path / "run", *[x for o in overrides for x in ("--set", o)])
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and field in r.stderr and "block_size, rope_theta, rope_scaling" in r.stderr
    assert not (tmp_path / "run").exists()


def test_init_from_refuses_another_tokenizer(tmp_path, data_dir, source_run):
    import json

    source = tmp_path / "source"
    shutil.copytree(source_run, source)
    recorded = json.loads((source / "data.json").read_text())
    recorded["tokenizer"] = dict(recorded["tokenizer"], spec="bpe:other", kind="bpe", sha256="0" * 64)
    (source / "data.json").write_text(json.dumps(recorded))
    config, overrides = extension_config(tmp_path, data_dir, source)
    r = cli("train", config, "--run-dir", tmp_path / "run", *[x for o in overrides for x in ("--set", o)])
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "trained with tokenizer 'bpe:other' but data.dir was prepared with 'byte'" in r.stderr
    assert not (tmp_path / "run").exists()


def test_init_from_names_a_change_of_position_encoding(tmp_path, data_dir, source_run):
    from scalelab.train.config import load_config
    from scalelab.train.init_from import weight_changes

    config, overrides = extension_config(tmp_path, data_dir, source_run)
    rope = load_config(config, overrides).model
    learned = rope.replace(position_encoding="learned", rope_scaling=None)
    assert weight_changes(rope, learned)[0] == "model.position_encoding 'rope' -> 'learned'"
    assert weight_changes(learned, learned.replace(block_size=256)) == ["model.block_size 128 -> 256"]


def test_init_from_bad_source_is_one_line(tmp_path, data_dir):
    config, overrides = extension_config(tmp_path, data_dir, tmp_path / "nowhere")
    r = cli("train", config, "--check", *[x for o in overrides for x in ("--set", o)])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such run directory" in r.stderr, r.stderr


def test_resume_of_an_init_from_run_resumes_it(tmp_path, data_dir, source_run):
    """Interrupted after its step-3 checkpoint and restarted with its source gone, an init_from run
    continues from its own checkpoint: steps 4-6 are bit-equal to the uninterrupted run's (a
    re-initialised model would start again at step 1 from the source's weights)."""
    from scalelab.train.checkpoint import load_trainer_state

    source = tmp_path / "source"
    shutil.copytree(source_run, source)
    config, overrides = extension_config(tmp_path, data_dir, source, steps=6, ckpt_every=3)
    straight = tmp_path / "straight"
    train_inprocess(config, straight, overrides)
    interrupted = tmp_path / "interrupted"
    shutil.copytree(straight, interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "step_00000006")
    shutil.rmtree(interrupted / "final")
    shutil.rmtree(source)  # resuming must not need the source
    summary = train_inprocess(config, interrupted, overrides)
    assert summary["step"] == 6
    a, b = losses(straight), losses(interrupted)
    assert [b[s] for s in (4, 5, 6)] == [a[s] for s in (4, 5, 6)]
    recorded = load_trainer_state(interrupted / "checkpoints" / "step_00000006")["init_from"]
    assert recorded == str(source.resolve() / "checkpoints" / "step_00000004")


def test_checkpoints_from_before_init_from_still_resume(tmp_path, data_dir):
    """A checkpoint whose config predates train.init_from (no such key) resumes: an absent key had
    its default, so it is no change (and init_from is one of the keys a resume may not change)."""
    from scalelab.train.config import load_config, resume_differences

    new = load_config(write_config(tmp_path / "c.toml", data_dir)).to_dict()
    old = {section: {k: v for k, v in table.items() if k != "init_from"} for section, table in new.items()}
    assert "init_from" in new["train"] and resume_differences(old, new) == ([], [])
    changed = {**new, "train": {**new["train"], "init_from": "runs/other"}}
    refused, _ = resume_differences(old, changed)
    assert refused == ['train.init_from "" -> "runs/other"']


@pytest.mark.slow
def test_init_from_under_fsdp_matches_one_process(tmp_path, data_dir, source_run):
    """2 FSDP ranks (rank 0 loads the source's weights and broadcasts them) train the same first
    steps as one process initialised from the same source."""
    from test_distributed import torchrun

    config, overrides = extension_config(tmp_path, data_dir, source_run, steps=2)
    train_inprocess(config, tmp_path / "single", overrides)
    r = torchrun("train", config, "--run-dir", tmp_path / "fsdp", "--set", "parallel.strategy=fsdp",
                 *[x for o in overrides for x in ("--set", o)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[fsdp, fp32]" in r.stderr and "initialised from" in r.stderr
    single, fsdp = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert sorted(fsdp) == [1, 2]
    for step in (1, 2):
        assert abs(fsdp[step] - single[step]) < 1e-5, (step, fsdp[step], single[step])


@pytest.mark.parametrize("scaling,hf_rope", [
    ('{type = "linear", factor = 4.0}', {"rope_type": "linear", "factor": 4.0}),
    ('{type = "yarn", factor = 4.0, original_max_position_embeddings = 128}',
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}),
    ('{type = "llama3", factor = 4.0, low_freq_factor = 1.0, high_freq_factor = 4.0, '
     + 'original_max_position_embeddings = 128}',
     {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 128}),
])
def test_rope_scaling_from_a_train_config_matches_transformers(tmp_path, data_dir, scaling, hf_rope):
    """The [model] table of a training config reaches the model: cos and sin at positions 0..511
    (four times the original 128) equal transformers' LlamaRotaryEmbedding for the same config."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from scalelab.model import Transformer
    from scalelab.train.config import load_config

    path = tmp_path / "c.toml"
    path.write_text(f"""[model]
style = "llama3"
n_layer = 1
n_embd = 64
n_head = 2
vocab_size = 258
block_size = 512
rope_theta = 10000.0
rope_scaling = {scaling}
[data]
dir = "{data_dir}"
[train]
max_steps = 1
""")
    model = Transformer(load_config(path).model)
    cos, sin = model.rope_cos_sin(0, 512, torch.device("cpu"), torch.float32)
    hf_config = LlamaConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=512,
                            rope_parameters={**hf_rope, "rope_theta": 10000.0})
    x = torch.zeros(1, 512, 64)
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf_config)(x, torch.arange(512)[None])
    torch.testing.assert_close(cos, hf_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, hf_sin[0], rtol=0, atol=1e-6)
    unscaled = Transformer(model.config.replace(rope_scaling=None)).rope_cos_sin(0, 512, torch.device("cpu"),
                                                                                torch.float32)[0]
    assert (unscaled[128:] - cos[128:]).abs().max() > 0.1  # the scaling is exercised past the original length


@pytest.mark.parametrize("scaling,message", [
    ('{type="ntk", factor=2.0}', "rope_scaling.type must be one of linear, llama3, yarn"),
    ('{type="linear", factor=0.5}', "rope_scaling.factor must be at least 1"),
    ('{type="linear"}', "needs 'factor'"),
    ('{type="yarn", factor=4.0, beta_fats=32.0}', "unknown key 'beta_fats' (did you mean 'beta_fast'?)"),
    ('{type="llama3", factor=8.0, original_max_position_embeddings=128, low_freq_factor=4.0}',
     "low_freq_factor must be below high_freq_factor"),
    ('{type="linear", factor="4"}', "rope_scaling.factor must be a positive finite number"),
    ("4.0", "rope_scaling must be a table"),
])
def test_bad_rope_scaling_exits_2_with_one_line(tmp_path, data_dir, scaling, message):
    config = write_config(tmp_path / "c.toml", data_dir)
    for verb in (("train", config, "--check"), ("count", config)):
        r = cli(*verb, "--set", f"model.rope_scaling={scaling}")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, (verb, r.stderr)


def test_rope_scaling_on_learned_positions_is_refused(tmp_path, data_dir):
    config = write_config(tmp_path / "c.toml", data_dir)
    r = cli("train", config, "--check", "--set", "model.position_encoding=learned", "--set", f"{LINEAR}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "learned positions" in r.stderr, r.stderr


def test_extend_demo_config_continues_the_demo_model():
    """configs/extend-demo.toml changes only position fields of the model its comment's stage 1
    trains (configs/demo.toml with the overrides the benchmark uses), so its init_from is allowed."""
    import re

    from scalelab.train.config import load_config
    from scalelab.train.init_from import weight_changes

    path = ROOT / "configs" / "extend-demo.toml"
    stage1 = re.findall(r"--set (\S+)", path.read_text().split("# 2.")[0])
    assert stage1 == ["model.block_size=128", "model.rope_theta=10000", "train.seq_len=128",
                      "train.micro_batch_size=32"]
    base, extended = load_config(ROOT / "configs" / "demo.toml", stage1), load_config(path)
    assert weight_changes(base.model, extended.model) == []
    assert extended.model.rope_scaling == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    assert extended.train.seq_len == 4 * base.train.seq_len
    assert extended.train.global_batch_tokens == base.train.global_batch_tokens


# ---- the production-shaped extension config --------------------------------------------------------

LONG = ROOT / "configs" / "llama3.1-8b-128k.toml"


def long_context_estimates(config: Path) -> list[str]:
    """The comment lines of configs/llama3.1-8b-128k.toml that carry numbers, recomputed by
    scalelab.counting (print them with: python tests/test_context.py)."""
    from scalelab.counting import loss_bytes, training_flops_per_token, training_memory, training_time
    from scalelab.hardware import get_accelerator
    from scalelab.train.config import grad_accum_steps, load_config

    cfg = load_config(config, ["data.dir=unused"])
    m, t = cfg.model, cfg.train
    tokens = t.max_steps * t.global_batch_tokens
    gpus = ("H100-SXM", "H200", "B200")
    lines = [(f"# S'        | GFLOP/token | memory per GPU, 8 GPUs (FSDP, bf16-mixed, micro-batch 1, activation "
              f"checkpointing, the {t.global_batch_tokens:,}-token batch accumulated): {' / '.join(gpus)}")]
    for seq_len in (8192, 16384, 32768, 65536, 131072):
        accum = t.global_batch_tokens // (t.micro_batch_size * seq_len * 8)
        mem = training_memory(m, micro_batch=t.micro_batch_size, seq_len=seq_len, num_devices=8, sharding="fsdp",
                              precision="bf16-mixed", activation_checkpointing=True,
                              loss_chunk_tokens=t.loss_chunk_tokens, grad_accum_steps=accum)["total"]
        fits = " / ".join("fits" if mem <= get_accelerator(g).memory_bytes else "NO" for g in gpus)
        lines.append(f"# {seq_len:>7,}   | {training_flops_per_token(m, seq_len) / 1e9:11.1f} | "
                     f"{mem / 2**30:6.1f} GiB ({fits})")
    without = training_memory(m, micro_batch=t.micro_batch_size, seq_len=t.seq_len, num_devices=8, sharding="fsdp",
                              precision="bf16-mixed", activation_checkpointing=False,
                              loss_chunk_tokens=t.loss_chunk_tokens, grad_accum_steps=grad_accum_steps(cfg, 8))["total"]
    per_token = training_flops_per_token(m, t.seq_len)
    tt = training_time(per_token, tokens, get_accelerator("B200"), 8, mfu=0.4)
    tokens_per_micro_batch = t.micro_batch_size * t.seq_len
    unchunked = (loss_bytes(tokens_per_micro_batch, m.vocab_size, 2, 0)
                 - loss_bytes(tokens_per_micro_batch, m.vocab_size, 2, t.loss_chunk_tokens))
    lines += [(f"# at {t.seq_len:,}: the unchunked loss (train.loss_chunk_tokens = 0) would add {unchunked / 2**30:.1f} "
               f"GiB; without activation checkpointing {without / 2**30:.1f} GiB per GPU"),
              (f"# this run: {t.max_steps:,} steps x {t.global_batch_tokens:,} tokens = {tokens / 1e9:.2f}B "
               f"tokens, {per_token * tokens:.3g} FLOPs: {tt['hours']:.1f} h on 8 x B200 at 40% MFU")]
    return lines


def test_long_context_config_comments_are_current():
    text = LONG.read_text()
    for line in long_context_estimates(LONG):
        assert line in text, f"stale comment in {LONG}; regenerate with `python tests/test_context.py`:\n{line}"


def test_long_context_config_is_the_8b_model_at_128k():
    from scalelab.train.config import load_config

    long, short = load_config(LONG), load_config(ROOT / "configs" / "llama3.1-8b.toml")
    from scalelab.train.init_from import weight_changes

    assert weight_changes(short.model, long.model) == []  # init_from the pretraining run is allowed
    assert long.train.seq_len == long.model.block_size == 131072
    assert long.model.rope_scaling["original_max_position_embeddings"] == short.train.seq_len
    assert long.train.activation_checkpointing and long.parallel.strategy == "fsdp"


def test_count_shows_the_extended_context(tmp_path):
    """`scalelab count` on the 128K config reports FLOPs and memory at S' = 131072 (the train
    section's seq_len), not at the original 8192."""
    import json

    from scalelab.counting import training_flops_per_token
    from scalelab.train.config import load_config

    r = cli("count", LONG, "--gpus", "8", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    flat = json.dumps(report)
    assert '"seq_len": 131072' in flat
    m = load_config(LONG).model
    per_token = training_flops_per_token(m, 131072)
    assert str(per_token) in flat
    # Independent check of the growth with S: only the attention scores and their use of V grow,
    # 2 matmuls x 2 FLOPs x S x n_embd per token per layer forward, x 3 for training.
    L, d = m.n_layer, m.n_embd
    assert per_token - training_flops_per_token(m, 8192) == 3 * 2 * 2 * L * d * (131072 - 8192)

if __name__ == "__main__":
    print("\n".join(long_context_estimates(LONG)))
