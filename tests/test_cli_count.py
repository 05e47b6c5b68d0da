"""`scalelab count` end to end: JSON keys, bad input, start-up without torch."""

import json

import pytest
from conftest import heavy_modules_loaded


def test_count_json_llama31_8b(cli):
    r = cli("count", "llama3.1-8b", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["params"]["total"] == 8030261248
    for key in ("embedding", "non_embedding"):
        assert key in out["params"]
    for key in ("forward_per_token", "training_per_token", "training_per_token_6n"):
        assert key in out["flops"]
    assert {"weights", "gradients", "optimizer", "activations", "total"} <= set(out["memory"])
    assert "time" not in out


def test_count_checkpointing_modes_report_the_timeline_and_hfu(cli, tmp_path):
    """--activation-checkpointing takes a mode (the flag alone is full); the memory names its peak's
    phase and runtime reserve; the time shows HFU = MFU x executed / model FLOPs; a training config's
    old `activation_checkpointing = true` and its selective option are read as the trainer reads them."""
    from scalelab import counting

    out = {}
    for mode in (["--activation-checkpointing"], ["--activation-checkpointing", "selective"],
                 ["--activation-checkpointing", "selective", "--selective-ac-option", "4"]):
        r = cli("count", "llama3.1-8b", *mode, "--gpus", "8", "--gpu-type", "H100", "--tokens", "1T", "--json")
        assert r.returncode == 0, r.stderr
        out[" ".join(mode[1:]) or "full"] = json.loads(r.stdout)
    full, op, layer = out["full"], out["selective"], out["selective --selective-ac-option 4"]
    assert full["memory"]["activation_checkpointing"] == "full" and layer["memory"]["selective_ac_option"] == "4"
    assert full["memory"]["activations"] < layer["memory"]["activations"] and \
        full["memory"]["activations"] < op["memory"]["activations"]
    for r in out.values():
        m, f, t = r["memory"], r["flops"], r["time"]
        assert m["peak_phase"] in counting.PHASES and m["peak"] == m[f"phase_{m['peak_phase']}"]
        assert m["total"] == m["peak"] + m["runtime_reserve"] and m["runtime_reserve"] > 0
        assert t["hfu"] == pytest.approx(t["mfu"] * f["training_per_token_executed"] / f["training_per_token"])
        assert t["hfu"] > t["mfu"]
    config = tmp_path / "c.toml"
    config.write_text('[model]\npreset = "gpt2"\n[train]\nactivation_checkpointing = true\n')
    assert json.loads(cli("count", str(config), "--json").stdout)["memory"]["activation_checkpointing"] == "full"
    config.write_text('[model]\npreset = "gpt2"\n[train]\nactivation_checkpointing = "selective"\n'
                      'selective_ac_option = 2\n')
    m = json.loads(cli("count", str(config), "--json").stdout)["memory"]
    assert (m["activation_checkpointing"], m["selective_ac_option"]) == ("selective", "2")


def test_count_time_and_fit_verdict(cli):
    r = cli("count", "llama3.1-70b", "--gpus", "1", "--gpu-type", "H100", "--tokens", "1T", "--json")
    out = json.loads(r.stdout)
    assert out["memory"]["fits"] is False and out["time"]["seconds"] > 0
    human = cli("count", "llama3.1-70b", "--gpus", "1", "--gpu-type", "H100")
    assert "DOES NOT FIT" in human.stdout


@pytest.mark.parametrize("args, fragment", [
    (["llama3.1-8b", "--set", "num_key_value_heads=5"], "num_key_value_heads"),
    (["no-such-model"], "unknown model"),
    (["llama3.1-8b", "--set", "n_layer=-1"], "n_layer must be a positive"),
    (["llama3.1-8b", "--gpu-type", "TPUv9", "--tokens", "1T"], "unknown GPU type"),
    (["llama3.1-8b", "--tokens", "lots", "--gpu-type", "H100"], "--tokens must be a number"),
    (["llama3.1-8b", "--bogus-flag"], "unrecognized arguments"),
    (["gpt2", "--set", "n_layer=1e30"], "n_layer must be a positive integer at most"),
    (["gpt2", "--set", "vocab_size=1e30"], "vocab_size must be a positive integer at most"),
    (["gpt2", "--set", "ffn_expansion_ratio=1e300"], "ffn_expansion_ratio must be positive and at most"),
    (["llama3.1-8b", "--set", "rope_theta=inf"], "rope_theta must be positive"),
    (["llama3.1-8b", "--seq-len", str(10**30)], "--seq-len must be between 1 and"),
    (["mixtral-8x7b", "--set", "num_experts_per_tok=9"], "num_experts_per_tok (9) must be at most n_routed_experts (8)"),
    (["llama3.1-8b", "--set", "qk_rope_head_dim=64"], "qk_rope_head_dim applies only to MLA models"),
    (["llama3.1-8b", "--set", "kv_lora_rank=512"], "MLA (kv_lora_rank set) needs qk_nope_head_dim"),
    (["deepseek-v3", "--set", "qk_rope_head_dim=63"], "RoPE needs an even qk_rope_head_dim, got 63"),
    (["deepseek-v3", "--set", "num_key_value_heads=8"], "MLA (kv_lora_rank) does not support num_key_value_heads"),
    (["llama3.1-8b", "--set", "head_dim=0"], "head_dim must be a positive integer"),
    (["llama3.1-8b", "--set", "n_shared_experts=1"], "n_shared_experts applies only to MoE models"),
])
def test_bad_input_exits_2_with_one_line(cli, args, fragment):
    r = cli("count", *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in r.stderr


def test_malformed_toml_exits_2(cli, tmp_path):
    bad = tmp_path / "m.toml"
    bad.write_text("[model\nn_layer=")
    r = cli("count", str(bad))
    assert r.returncode == 2 and "malformed TOML" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_count_does_not_import_torch():
    assert heavy_modules_loaded(["count", "llama3.1-405b", "--json"]) == []


def test_seq_len_past_learned_positions_is_refused(cli):
    r = cli("count", "gpt2", "--seq-len", "2048")
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "1024 learned positions (block_size)" in lines[0] and "--seq-len 1024" in lines[0]
    assert cli("count", "gpt2", "--seq-len", "1024").returncode == 0


def test_seq_len_past_rope_block_size_warns(cli):
    r = cli("count", "llama3-8b", "--seq-len", "16384", "--json")
    assert r.returncode == 0
    assert "beyond block_size 8192" in r.stderr
    assert json.loads(r.stdout)["flops"]["seq_len"] == 16384


def test_width_override_follows_gpt2_ffn_rule(cli):
    out = json.loads(cli("count", "gpt2", "--set", "n_embd=128", "--set", "n_head=4", "--json").stdout)
    assert out["params"]["breakdown"]["ffn"] == 12 * (2 * 128 * 512 + 512 + 128)  # fc 128->512, proj 512->128


def test_count_shows_total_active_and_mla_kv_cache(cli):
    """DeepSeek-V3: 58 MoE layers each skip 248 of 256 experts (3 matrices of 7168 x 2048) per token; the KV cache
    holds the 512 latent + 64 RoPE-key entries per layer, against 128 heads x (192 key + 128 value) for MHA."""
    out = json.loads(cli("count", "deepseek-v3", "--json").stdout)
    assert out["params"]["total"] == 671_026_404_352
    assert out["params"]["active"] == 671_026_404_352 - 58 * (256 - 8) * 3 * 7168 * 2048
    assert out["kv_cache_bytes_per_token"] == 61 * (512 + 64) * 2 == out["gqa"]["kv_cache_bytes_per_token"]
    assert out["gqa"]["kv_cache_bytes_per_token_mha"] == 61 * 128 * (128 + 64 + 128) * 2
    human = cli("count", "deepseek-v3").stdout
    assert "Active per token           37,552,282,624 (37.6B" in human and "70,272 B (latent + RoPE key" in human
    dense = json.loads(cli("count", "llama3.1-8b", "--json").stdout)["params"]
    assert dense["active"] == dense["total"] and "router" not in dense["breakdown"]


def test_count_takes_the_accumulation_from_the_global_batch_as_the_trainer_does(cli, tmp_path):
    """A training config's global_batch_tokens (or --global-batch-tokens) sets the gradient
    accumulation; count's memory then holds the accumulated gradients, exactly the trainer's
    prediction and memory check (FSDP2, reduce-scattering every micro-step: sharded, fp32), and the JSON says
    how many micro-batches; one micro-batch per step holds none."""
    from scalelab.counting import count_params
    from scalelab.train.config import config_from_dict
    from scalelab.train.trainer import memory_problem, predicted_memory

    model = {"style": "llama3", "n_layer": 2, "n_embd": 64, "n_head": 4, "num_key_value_heads": 2,
             "vocab_size": 512, "block_size": 64}
    train = {"seq_len": 64, "micro_batch_size": 2, "max_steps": 1, "dtype": "bf16", "global_batch_tokens": 4 * 2 * 64 * 3}
    toml = tmp_path / "run.toml"
    toml.write_text("\n".join(f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in section.items())
                              for name, section in (("model", model), ("train", train), ("parallel", {"strategy": "fsdp"}))))
    r = cli("count", str(toml), "--gpus", "4", "--json")
    assert r.returncode == 0, r.stderr
    counted = json.loads(r.stdout)["memory"]
    cfg = config_from_dict({"model": model, "data": {"dir": "unused"}, "train": train})
    trainer = predicted_memory(cfg, "fsdp", 4)
    n = count_params(cfg.model).total
    assert counted["grad_accum_steps"] == trainer["grad_accum_steps"] == 3
    assert counted["accumulated_gradients"] == trainer["accumulated_gradients"] == 4 * n / 4
    assert counted["total"] == trainer["total"]
    assert "accumulate fewer micro-batches per step" in memory_problem(cfg, "fsdp", 4, (1e3, "free"))
    single = json.loads(cli("count", str(toml), "--gpus", "4", "--global-batch-tokens", str(4 * 2 * 64),
                            "--json").stdout)["memory"]
    assert single["grad_accum_steps"] == 1 and single["accumulated_gradients"] == 0
    assert single["total"] < counted["total"]
