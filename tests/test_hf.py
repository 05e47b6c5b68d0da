"""Hugging Face import/export against `transformers` itself (test-only dependency): same
logits to 1e-4 in fp32 in both directions, exact round trips, sharded checkpoints, both
config key styles, and the CLI verbs. Tiny configs (2 layers, 64 wide) keep it fast."""

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from scalelab import hf
from scalelab.cli import main as cli_main
from scalelab.errors import UserError
from scalelab.model import Transformer, rope_frequencies
from scalelab.presets import get_preset, style_config

V = 101
transformers.logging.set_verbosity_error()
LLAMA = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

HF_CONFIGS = {
    "llama2-mha": lambda: LlamaConfig(**LLAMA),
    "llama-gqa-bias": lambda: LlamaConfig(**LLAMA, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    "llama3.1-rope-scaling": lambda: LlamaConfig(**LLAMA, num_key_value_heads=2, rope_parameters=dict(LLAMA31_ROPE)),
    "llama3.2-tied": lambda: LlamaConfig(**LLAMA, num_key_value_heads=1, tie_word_embeddings=True,
                                         rope_parameters=dict(LLAMA31_ROPE, factor=32.0)),
    "llama-linear": lambda: LlamaConfig(**LLAMA, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                                  "factor": 4.0}),
    "llama-yarn": lambda: LlamaConfig(**LLAMA, num_key_value_heads=2, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}),
    # DeepSeek's YaRN attention factor: mscale / mscale_all_dim (transformers' _compute_yarn_parameters)
    "llama-yarn-mscale": lambda: LlamaConfig(**LLAMA, num_key_value_heads=2, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "mscale": 0.707, "mscale_all_dim": 1.3}),
    # heads independent of the width: 4 heads of 32 on a 64-wide stream (q_proj 64 -> 128, o_proj 128 -> 64)
    "llama-head-dim": lambda: LlamaConfig(**LLAMA, num_key_value_heads=2, head_dim=32),
    "mistral": lambda: MistralConfig(**LLAMA, num_key_value_heads=2, sliding_window=None),
    "mistral-sliding-window": lambda: MistralConfig(**LLAMA, num_key_value_heads=2, sliding_window=8),
    "qwen2-tied": lambda: Qwen2Config(**LLAMA, num_key_value_heads=2, tie_word_embeddings=True),
    "gpt2": lambda: GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64),
    "gpt2-untied": lambda: GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      tie_word_embeddings=False),
}


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """O(1) logits, and norm weights / biases away from 1 / 0 so every tensor's mapping matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm = p.dim() == 1 and any(k in name for k in ("norm", "ln_")) and name.endswith("weight")
            p.copy_(1 + 0.1 * noise if is_norm else scale * noise)
    return model.eval()


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def ours_logits(model, idx):
    with torch.no_grad():
        return model(idx)


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, V, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_to_ours_to_hf(name, idx, tmp_path):
    # HF -> ours: a save_pretrained directory written by transformers
    reference = randomize(AutoModelForCausalLM.from_config(HF_CONFIGS[name]()))
    reference.save_pretrained(tmp_path / "hf")
    ours = hf.load(tmp_path / "hf")
    expected = hf_logits(reference, idx)
    assert expected.std() > 0.3
    torch.testing.assert_close(ours_logits(ours, idx), expected, atol=1e-4, rtol=0)

    # ours -> HF: our own random weights, exported, loaded by transformers' from_pretrained
    mine = randomize(Transformer(ours.config), seed=1)
    arch = hf.save(mine, tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(exported).__name__ == type(reference).__name__ == hf.HF_CLASS[arch]
    torch.testing.assert_close(hf_logits(exported, idx), ours_logits(mine, idx), atol=1e-4, rtol=0)

    # export -> import is exact, config included
    back = hf.load(tmp_path / "export")
    assert back.config == mine.config
    assert back.state_dict().keys() == mine.state_dict().keys()
    for key, tensor in mine.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key


def test_rope_scaling_is_exercised(idx, tmp_path):
    """Sanity for the test above: without the llama3 scaling the logits differ clearly."""
    reference = randomize(AutoModelForCausalLM.from_config(HF_CONFIGS["llama3.1-rope-scaling"]()))
    reference.save_pretrained(tmp_path)
    ours = hf.load(tmp_path)
    unscaled = Transformer(ours.config.replace(rope_scaling=None))
    unscaled.load_state_dict(ours.state_dict())
    assert (ours_logits(unscaled, idx) - hf_logits(reference, idx)).abs().max() > 1e-2


@pytest.mark.parametrize("preset,hf_rope", [
    ("llama3.1-8b", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}),
    ("llama3.2-1b", {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}),
    ("llama2-7b", {"rope_type": "linear", "factor": 4.0}),
    ("mistral-7b", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}),
])
def test_rope_frequencies_bit_equal_to_transformers(preset, hf_rope):
    cfg = get_preset(preset)
    scaling = {("type" if k == "rope_type" else k): v for k, v in hf_rope.items()}
    cfg = cfg.replace(rope_scaling=scaling)
    hf_config = LlamaConfig(hidden_size=cfg.n_embd, num_attention_heads=cfg.n_head,
                            max_position_embeddings=cfg.block_size,
                            rope_parameters={**hf_rope, "rope_theta": cfg.rope_theta})
    expected, attention_factor = ROPE_INIT_FUNCTIONS[hf_rope["rope_type"]](hf_config)
    ours, our_factor = rope_frequencies(cfg)
    assert torch.equal(ours, expected)
    assert our_factor == pytest.approx(attention_factor)


def test_old_style_config_keys(idx, tmp_path):
    """transformers 4.x wrote rope_theta and rope_scaling = {type: ...} at the top level."""
    reference = randomize(AutoModelForCausalLM.from_config(HF_CONFIGS["llama3.1-rope-scaling"]()))
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    config["torch_dtype"] = config.pop("dtype", "float32")
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.testing.assert_close(ours_logits(hf.load(tmp_path), idx), hf_logits(reference, idx), atol=1e-4, rtol=0)


def test_sharded_checkpoints_both_ways(idx, tmp_path):
    reference = randomize(AutoModelForCausalLM.from_config(HF_CONFIGS["llama3.2-tied"]()))
    reference.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / hf.SAFETENSORS_INDEX).is_file()
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    ours = hf.load(tmp_path / "hf")
    torch.testing.assert_close(ours_logits(ours, idx), hf_logits(reference, idx), atol=1e-4, rtol=0)

    hf.save(ours, tmp_path / "ours", max_shard_bytes=40_000)
    shards = sorted(p.name for p in (tmp_path / "ours").glob("model-*.safetensors"))
    assert len(shards) > 2
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(hf_logits(exported, idx), hf_logits(reference, idx), atol=1e-4, rtol=0)


def test_bfloat16_export_keeps_dtype(tmp_path):
    model = randomize(Transformer(style_config("llama3", 2, 64, 4, num_key_value_heads=2, vocab_size=V)))
    hf.save(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert next(hf.load(tmp_path).parameters()).dtype == torch.bfloat16
    exported = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert exported.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(exported.model.embed_tokens.weight, model.tok_embeddings.weight.bfloat16())


def test_unsupported_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="hidden_act"):
        hf.config_from_hf({**LlamaConfig(**LLAMA).to_dict(), "hidden_act": "gelu"})
    with pytest.raises(UserError, match="model_type"):
        hf.config_from_hf({"model_type": "bert"})
    assert hf.config_from_hf({**LlamaConfig(**LLAMA).to_dict(), "head_dim": 32}).head_dim == 32  # no longer refused
    with pytest.raises(UserError, match="no Hugging Face architecture"):
        hf.save(Transformer(style_config("gpt2", 2, 32, 4, vocab_size=V, norm_position="post")), tmp_path / "x")
    with pytest.raises(UserError, match="multi-head"):
        hf.save(Transformer(style_config("gpt2", 2, 32, 4, vocab_size=V, num_key_value_heads=2)), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # weights that do not match config.json
    randomize(AutoModelForCausalLM.from_config(HF_CONFIGS["llama2-mha"]())).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(UserError, match="does not use"):
        hf.load(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(UserError, match="missing tensor"):
        hf.load(tmp_path / "hf")


def test_mistral_sliding_window_is_imported():
    """Modelled, not warned about: the window is a ModelConfig field (tests/test_sliding_window.py)."""
    cfg = hf.config_from_hf(MistralConfig(**LLAMA, num_key_value_heads=2, sliding_window=32).to_dict())
    assert cfg.family == "mistral" and cfg.num_key_value_heads == 2 and cfg.sliding_window == 32
    assert hf.config_to_hf(cfg)["sliding_window"] == 32


# ---- native checkpoints and the CLI -----------------------------------------------------------

def test_native_round_trip_and_trainer_layout(idx, tmp_path):
    model = randomize(Transformer(style_config("gpt2", 2, 64, 4, vocab_size=V, block_size=64)))
    hf.save_native(model, tmp_path / "native")
    assert sorted(p.name for p in (tmp_path / "native").iterdir()) == ["model.safetensors", "model.toml"]
    back = hf.load_native(tmp_path / "native")
    assert back.config == model.config and back.lm_head.weight is back.tok_embeddings.weight
    torch.testing.assert_close(ours_logits(back, idx), ours_logits(model, idx), atol=0, rtol=0)
    # a trainer may write config.json with ModelConfig fields and a torch.compile'd state dict
    from safetensors.torch import save_file

    trainer_dir = tmp_path / "step_000010"
    trainer_dir.mkdir()
    sd = {f"_orig_mod.{k}": v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, trainer_dir / "model.safetensors")
    (trainer_dir / "config.json").write_text(json.dumps(model.config.to_dict()))
    loaded, source = hf.load_checkpoint(trainer_dir)
    assert source == "scalelab"
    torch.testing.assert_close(ours_logits(loaded, idx), ours_logits(model, idx), atol=0, rtol=0)


def test_cli_import_then_export(idx, tmp_path, capsys):
    reference = randomize(AutoModelForCausalLM.from_config(HF_CONFIGS["llama3.1-rope-scaling"]()))
    reference.save_pretrained(tmp_path / "hf")
    assert cli_main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params"] == sum(p.numel() for p in reference.parameters())
    assert report["files"] == ["model.safetensors", "model.toml"]
    assert cli_main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--max-shard-size", "50KB"]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert (tmp_path / "out" / hf.SAFETENSORS_INDEX).is_file()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(hf_logits(exported, idx), hf_logits(reference, idx), atol=1e-4, rtol=0)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # temporary directories were moved into place or removed


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    model = Transformer(style_config("llama3", 2, 32, 4, num_key_value_heads=2, vocab_size=V))
    hf.save_native(model, tmp_path / "ckpt")
    cases = [
        ["import-hf", str(tmp_path / "missing"), str(tmp_path / "a")],
        ["import-hf", str(tmp_path / "ckpt"), str(tmp_path / "b")],  # not a HF directory
        ["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "c"), "--arch", "gpt2"],
        ["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "d"), "--max-shard-size", "lots"],
        ["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "ckpt")],
    ]
    for argv in cases:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert cli_main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "full")]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli_main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "full"), "--force"]) == 0
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["config.json", "model.safetensors"]


def test_cli_export_from_trainer_run_directory(idx, tmp_path, capsys):
    """A run directory (checkpoints/latest -> step_*) as the trainer writes it."""
    from scalelab.train.checkpoint import save_checkpoint
    from scalelab.train.parallel import Dist

    model = randomize(Transformer(style_config("llama3", 2, 64, 4, num_key_value_heads=2, vocab_size=V)))
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path / "run", 10, model, optimizer, {"step": 10}, strategy="none", d=Dist(), keep=2)
    assert cli_main(["export-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0, capsys.readouterr().err
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(hf_logits(exported, idx), ours_logits(model, idx), atol=1e-4, rtol=0)


def test_gpt2_original_checkpoint_layout(idx, tmp_path):
    """openai-community/gpt2's safetensors have no 'transformer.' prefix and carry the causal-mask
    buffers h.N.attn.bias (and masked_bias in older exports); they must load all the same."""
    from safetensors.torch import load_file, save_file

    reference = randomize(AutoModelForCausalLM.from_config(HF_CONFIGS["gpt2"]()))
    reference.save_pretrained(tmp_path)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "model.safetensors").items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, tmp_path / "model.safetensors")
    torch.testing.assert_close(ours_logits(hf.load(tmp_path), idx), hf_logits(reference, idx), atol=1e-4, rtol=0)


# ---- hostile config.json files and checkpoint keys --------------------------------------------

def _saved_llama(tmp_path, **overrides):
    randomize(AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA, num_key_value_heads=2, **overrides))
              ).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("field,edit", [
    ("hidden_size", lambda c: c.update(hidden_size="abc")),
    ("num_hidden_layers", lambda c: c.pop("num_hidden_layers")),
    ("vocab_size", lambda c: c.update(vocab_size=1.5)),
    ("intermediate_size", lambda c: c.update(intermediate_size=None)),
    ("num_key_value_heads", lambda c: c.update(num_key_value_heads=[2])),
    ("rms_norm_eps", lambda c: c.update(rms_norm_eps="tiny")),
    ("tie_word_embeddings", lambda c: c.update(tie_word_embeddings="yes")),
    ("max_position_embeddings", lambda c: c.update(max_position_embeddings=True)),
    ("rope_parameters", lambda c: c.update(rope_parameters="llama3")),
    ("rope_theta", lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": "big"})),
    ("factor", lambda c: c.update(rope_parameters={**LLAMA31_ROPE, "factor": "x8"})),
    ("original_max_position_embeddings", lambda c: c.update(
        rope_parameters={**LLAMA31_ROPE, "original_max_position_embeddings": 16.5})),
    ("num_attention_heads", lambda c: c.update(num_attention_heads=0)),
    ("n_head", lambda c: c.update(hidden_size=64, num_attention_heads=5)),  # ModelConfig's check, file named
    ("model_type", lambda c: c.update(model_type=None, architectures=7)),
])
def test_bad_config_json_fields_are_one_line_naming_field_and_file(tmp_path, capsys, field, edit):
    config = _saved_llama(tmp_path / "hf")
    edit(config)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert cli_main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert field in err and str(tmp_path / "hf" / "config.json") in err, err
    assert not (tmp_path / "out").exists()


def test_config_json_that_is_not_an_object(tmp_path, capsys):
    _saved_llama(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("[1, 2]")
    capsys.readouterr()
    assert cli_main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "JSON object" in err


def test_yarn_without_any_context_length_uses_transformers_default(idx, tmp_path):
    """No original_max_position_embeddings and no max_position_embeddings: transformers falls back
    to its default context (2048); the import used to set None and die in float(None)."""
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    reference = randomize(AutoModelForCausalLM.from_config(
        LlamaConfig(**{**LLAMA, "max_position_embeddings": 2048}, rope_parameters=rope)))
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["max_position_embeddings"]
    config["rope_parameters"].pop("original_max_position_embeddings", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = hf.load(tmp_path)
    assert ours.config.rope_scaling["original_max_position_embeddings"] == 2048
    torch.testing.assert_close(ours_logits(ours, idx), hf_logits(reference, idx), atol=1e-4, rtol=0)


def test_only_leading_wrapper_prefixes_are_stripped(idx, tmp_path):
    from safetensors.torch import load_file, save_file

    model = randomize(Transformer(style_config("llama3", 2, 64, 4, num_key_value_heads=2, vocab_size=V)))
    hf.save_native(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({f"module._orig_mod.{k}": v for k, v in tensors.items()}, tmp_path / "model.safetensors")
    torch.testing.assert_close(ours_logits(hf.load_native(tmp_path), idx), ours_logits(model, idx))
    # a wrapper name further inside a key is part of a real parameter name, not a wrapper
    assert hf.strip_wrapper_prefixes("layers.0.submodule.weight") == "layers.0.submodule.weight"
    assert hf.strip_wrapper_prefixes("_orig_mod.module.norm.weight") == "norm.weight"
    save_file({f"layers.0.module.{k}": v for k, v in tensors.items()}, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="does not match"):
        hf.load_native(tmp_path)


@pytest.mark.parametrize("how", ["missing-shard", "no-weight-map", "index-not-json", "corrupt-shard", "traversal"])
def test_broken_sharded_hf_directories_are_user_errors(tmp_path, capsys, how):
    model = randomize(AutoModelForCausalLM.from_config(HF_CONFIGS["llama2-mha"]()))
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    index = tmp_path / "hf" / hf.SAFETENSORS_INDEX
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 1
    if how == "missing-shard":
        shards[-1].unlink()
    elif how == "no-weight-map":
        index.write_text(json.dumps({"metadata": {}}))
    elif how == "index-not-json":
        index.write_text("{not json")
    elif how == "corrupt-shard":
        shards[0].write_bytes(shards[0].read_bytes()[:100])
    else:
        data = json.loads(index.read_text())
        data["weight_map"] = {k: "../" + v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data))
    capsys.readouterr()
    assert cli_main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(index.parent) in err, err
    assert not (tmp_path / "out").exists()


def test_cli_unwritable_outputs_are_one_line_before_any_work(tmp_path, readonly_dir, tiny_fs, capsys, monkeypatch):
    model = randomize(Transformer(style_config("llama3", 2, 128, 4, num_key_value_heads=2, vocab_size=V)))
    hf.save_native(model, tmp_path / "ckpt")
    hf.save(model, tmp_path / "hfdir")
    (tmp_path / "file").write_text("mine")
    readonly, full = readonly_dir, tiny_fs  # a 256 KiB tmpfs; the weights are 2 MB
    loaded = []
    monkeypatch.setattr(hf, "load_checkpoint", lambda *a, **k: loaded.append(a) or (model, "scalelab"))
    monkeypatch.setattr(hf, "load", lambda *a, **k: loaded.append(a) or model)
    for verb, src in (("export-hf", "ckpt"), ("import-hf", "hfdir")):
        for out, words in ((tmp_path / "file", "is an existing file"), (readonly / "out", "not writable")):
            capsys.readouterr()
            assert cli_main([verb, str(tmp_path / src), str(out)]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and str(out) in err and words in err, err
    assert loaded == []  # refused before loading anything
    monkeypatch.undo()
    for verb, src in (("export-hf", "ckpt"), ("import-hf", "hfdir")):  # disk full while writing
        capsys.readouterr()
        assert cli_main([verb, str(tmp_path / src), str(full / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(full / "out") in err and "disk is full" in err, err
        assert list(full.iterdir()) == []
    assert (tmp_path / "file").read_text() == "mine"


# ---- sample: bad numbers and devices ----------------------------------------------------------

@pytest.mark.parametrize("flags,words", [
    (["--temperature", "nan"], "--temperature nan"),
    (["--temperature", "inf"], "--temperature inf"),
    (["--temperature", "-1"], "--temperature -1"),
    (["--temperature", "1e-300"], "--temperature 1e-300"),  # logits / T overflow to inf, then NaN
    (["--top-k", "0"], "--top-k 0"),
    (["--top-p", "nan"], "--top-p nan"),
    (["--top-p", "1.5"], "--top-p 1.5"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["--max-new-tokens", "1000000000000"], "--max-new-tokens 1000000000000"),
    (["--num-samples", "0"], "--num-samples 0"),
    (["--seed", str(2**64)], "--seed"),
    (["--device", "quantum"], "--device 'quantum'"),
    (["--device", "meta"], "not meta"),
    pytest.param(["--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    pytest.param(["--device", "mps"], "MPS",
                 marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")),
    pytest.param(["--device", "cuda:64"], "CUDA", marks=pytest.mark.skipif(
        torch.cuda.device_count() > 64, reason="64 GPUs")),
])
def test_sample_bad_numbers_and_devices_are_one_line(tmp_path, capsys, flags, words):
    model = randomize(Transformer(style_config("llama3", 1, 32, 4, vocab_size=258, block_size=32)))
    hf.save_native(model, tmp_path / "ckpt")
    assert cli_main(["sample", str(tmp_path / "ckpt"), "--tokenizer", "byte", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    assert cli_main(["sample", str(tmp_path / "ckpt"), "--tokenizer", "byte", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scalelab sample: error: ") and err.count("\n") == 1 and words in err, err


def test_sample_with_a_damaged_run_tokenizer_is_one_line(tmp_path, capsys):
    model = randomize(Transformer(style_config("llama3", 1, 32, 4, vocab_size=258, block_size=32)))
    hf.save_native(model, tmp_path / "run" / "final")
    for text, words in (("{not json", "data.json"), ('{"tokenizer": 3}', "data.json"),
                        ('{"tokenizer": {"saved_spec": "hf:tokenizer.json"}}', "tokenizer.json")):
        (tmp_path / "run" / "data.json").write_text(text)
        assert cli_main(["sample", str(tmp_path / "run" / "final")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and "Traceback" not in err, err


# ---- export with the run's tokenizer: transformers loads both halves ---------------------------

def _tokenizer_spec(kind: str, d) -> str:
    """A small tokenizer of each kind scalelab has, made without a network."""
    import base64

    from scalelab.data.tokenizer import train_bpe

    if kind == "byte":
        return "byte"
    if kind == "hf":
        train_bpe(["the quick brown fox jumps over the lazy dog, Ünïcödé 😀\n" * 50], 300, d / "bpe")
        return f"hf:{d / 'bpe'}"
    letters = [bytes([c]) for c in b"abcdefghijklmnopqrstuvwxyz "]
    tokens = [bytes([b]) for b in range(256)] + [a + b for a in letters for b in letters] + [b"the", b" the", b"fox"]
    (d / "ranks.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return f"{'tiktoken' if kind == 'tiktoken' else 'gpt2'}:{d / 'ranks.tiktoken'}"


@pytest.mark.parametrize("kind", ["byte", "hf", "tiktoken", "gpt2"])
def test_export_with_run_tokenizer_loads_end_to_end_in_transformers(tmp_path, kind, capsys):
    """A run directory as the trainer leaves it (data.json + tokenizer/ copied from the prepared
    data, the model in final/) exported with export-hf: transformers' AutoTokenizer encodes text to
    the ids scalelab's tokenizer gives, and AutoModelForCausalLM's logits on them equal ours."""
    import shutil

    from transformers import AutoTokenizer, GenerationConfig

    from scalelab.data import prepare as P
    from scalelab.data.tokenizer import find_run_tokenizer

    (tmp_path / "corpus.txt").write_text("the quick brown fox\n" * 20)
    P.prepare(P.iter_files([tmp_path / "corpus.txt"]), _tokenizer_spec(kind, tmp_path), tmp_path / "data",
              val_fraction=0.0, workers=1, progress=False)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(tmp_path / "data" / "tokenizer", run / "tokenizer")
    shutil.copy(tmp_path / "data" / "meta.json", run / "data.json")
    tok = find_run_tokenizer(run)
    model = randomize(Transformer(style_config("llama3", 2, 32, 4, num_key_value_heads=2, block_size=64,
                                               vocab_size=tok.vocab_size + 3)))
    hf.save_native(model, run / "final")
    capsys.readouterr()
    assert cli_main(["export-hf", str(run / "final"), str(tmp_path / "export")]) == 0, capsys.readouterr().err
    assert "note" not in capsys.readouterr().err
    names = {p.name for p in (tmp_path / "export").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"} <= names

    their_tok = AutoTokenizer.from_pretrained(tmp_path / "export")
    text = "the quick brown fox, Ünïcödé 😀 jumps\n  over"
    ids = their_tok(text)["input_ids"]
    assert ids == tok.encode(text) and their_tok.decode(ids) == text
    assert (their_tok.bos_token_id, their_tok.eos_token_id) == (tok.bos_id, tok.eos_id)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_id, tok.eos_id)
    assert GenerationConfig.from_pretrained(tmp_path / "export").eos_token_id == tok.eos_id
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    x = torch.tensor([[tok.eos_id] + ids])
    torch.testing.assert_close(hf_logits(theirs, x), ours_logits(model, x), atol=1e-4, rtol=0)


def test_export_without_a_tokenizer_says_so_and_a_too_large_one_is_refused(tmp_path, capsys):
    model = randomize(Transformer(style_config("llama3", 1, 32, 4, vocab_size=200, block_size=32)))
    hf.save_native(model, tmp_path / "ckpt")
    capsys.readouterr()
    assert cli_main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "--tokenizer" in err and "AutoTokenizer" in err
    assert cli_main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "b"), "--tokenizer", "byte"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "258" in err and "200" in err and not (tmp_path / "b").exists()
