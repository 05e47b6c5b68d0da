"""The MoE feed-forward (scalelab.moe) against transformers' MixtralForCausalLM and Qwen3MoeForCausalLM:
logits equal after import and after export (tiny random models, fp32), the load-balancing loss equal to
transformers' router_aux_loss_coef · load_balancing_loss_func, the grouped-matmul path equal to the
per-expert loop (FlopCounterMode against counting: tests/test_block_flops.py). Training: a MoE+MLA
model trains, logs its expert load, and its routing biases continue exactly across a resume; 2 gloo
ranks (DDP and FSDP2, one torchrun launch) equal one process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

from scalelab import hf
from scalelab.config import ModelConfig
from scalelab.model import Transformer
from scalelab.moe import MoE
from hf_checks import assert_exports_with_equal_logits
from test_hf import randomize as randomize_like_hf
from test_train import env_1thread, losses, make_corpus_dir, train_inprocess, write_config

transformers.logging.set_verbosity_error()
V = 101


def mixtral(**kw) -> MixtralConfig:
    return MixtralConfig(**{**dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_local_experts=6,
                                   num_experts_per_tok=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                                   sliding_window=None), **kw})


def qwen3_moe(**kw) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(**{**dict(vocab_size=V, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                    num_experts=8, num_experts_per_tok=3, max_position_embeddings=64,
                                    rms_norm_eps=1e-6), **kw})


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))


CASES = {"mixtral": ("mixtral", mixtral()), "qwen3_moe": ("qwen3_moe", qwen3_moe(norm_topk_prob=True)),
         "qwen3_moe-unnormalised": ("qwen3_moe", qwen3_moe(norm_topk_prob=False))}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers_both_ways(case, idx, tmp_path):
    arch, config = CASES[case]
    reference = randomize_like_hf(AutoModelForCausalLM.from_config(config), 0, scale=0.2)
    reference.save_pretrained(tmp_path / "hf")  # one tensor per expert on disk, as on the Hub
    ours = hf.load(tmp_path / "hf")
    cfg = ours.config
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok) == (config.num_local_experts, config.num_experts_per_tok)
    assert cfg.norm_topk_prob == (arch == "mixtral" or config.norm_topk_prob)
    with torch.no_grad():
        expected, got = reference(idx).logits, ours(idx)
    print(f"max |logit diff| {case} import: {(got - expected).abs().max().item():.3g}")
    assert expected.std() > 0.3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # every expert is used somewhere, so every expert's weights were mapped
    with torch.no_grad():
        ours(idx)
    assert all((layer.ffn.last_routing[0] > 0).all() for layer in ours.layers)

    mine = randomize_like_hf(Transformer(cfg), 1, scale=0.2)
    assert_exports_with_equal_logits(mine, tmp_path / "export", arch, idx, case)


def test_training_loss_with_aux_loss_equals_transformers(idx):
    """Our training loss = cross-entropy + router_aux_loss_coef × the load-balancing loss, pooled over the
    layers exactly as MixtralForCausalLM's (output_router_logits)."""
    config = mixtral(router_aux_loss_coef=0.3, output_router_logits=True)
    reference = randomize_like_hf(AutoModelForCausalLM.from_config(config), 2, scale=0.2)
    ours = Transformer(hf.config_from_hf(config.to_dict()), loss_chunk_tokens=0)
    ours.load_state_dict(_via_disk(reference, ours.config))
    assert ours.config.router_aux_loss_coef == 0.3
    targets = torch.cat([idx[:, 1:], torch.full((idx.size(0), 1), -1)], dim=1)  # HF shifts its labels itself
    with torch.no_grad():
        out = reference(idx, labels=idx)
        ours.train()
        got = ours(idx, targets)[1]
        plain = ours.eval()(idx, targets)[1]  # evaluation reports the language-model loss alone
    assert out.aux_loss > 1.0  # E · Σ f·P is 1 when perfectly balanced
    torch.testing.assert_close(got, out.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(got - plain, 0.3 * out.aux_loss, atol=1e-5, rtol=0)


def _via_disk(reference, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        reference.save_pretrained(d)
        return hf._native_from_hf(hf.read_safetensors(d), cfg, "mixtral")


def tiny_moe(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(n_layer=2, n_head=4, n_embd=32, vocab_size=V, block_size=64, d_ff=48,
                                 n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                 moe_intermediate_size=16, first_k_dense_replace=1, scoring_func="sigmoid",
                                 topk_method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True,
                                 routed_scaling_factor=2.5), **kw})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_matmul_equals_the_per_expert_loop(dtype):
    """The default path (tokens sorted by expert, one torch._grouped_mm per projection) computes what the
    math path's plain matmul per expert does, forward and backward."""
    from scalelab.moe import grouped_mm_works

    assert grouped_mm_works("cpu", dtype)  # torch 2.13 runs it on the CPU in fp32 and bf16
    torch.manual_seed(0)
    cfg = tiny_moe()
    fast, loop = MoE(cfg, "sdpa"), MoE(cfg, "math")
    fast.init_weights(0.2, 0.2)
    with torch.no_grad():
        fast.router.e_score_correction_bias.normal_(0, 0.1)
    loop.load_state_dict(fast.state_dict())
    fast, loop = fast.to(dtype), loop.to(dtype)
    x = torch.randn(3, 20, 32, dtype=dtype)
    grads = []
    for layer in (fast, loop):
        xi = x.clone().requires_grad_()
        with torch.autograd.profiler.profile() as prof:
            y = layer(xi)
        assert any(e.name == "aten::_grouped_mm" for e in prof.function_events) == (layer is fast)
        y.backward(torch.ones_like(y))
        grads.append((y, xi.grad, layer.gate_up.grad, layer.down.grad, layer.router.weight.grad))
    tol = dict(atol=1e-5, rtol=0) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **tol)


# ---- training ----------------------------------------------------------------------------------

MOE_MLA_MODEL = """block_size = 64
num_key_value_heads = 4
kv_lora_rank = 16
qk_nope_head_dim = 8
qk_rope_head_dim = 8
v_head_dim = 16
n_routed_experts = 4
num_experts_per_tok = 2
n_shared_experts = 1
moe_intermediate_size = 32
first_k_dense_replace = 1
scoring_func = "sigmoid"
topk_method = "noaux_tc"
norm_topk_prob = true
router_aux_loss_coef = 0.01
"""


@pytest.fixture(scope="module")
def moe_setup(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("moe")
    data = make_corpus_dir(d / "data", docs=200)
    cfg = write_config(d / "c.toml", data, steps=8, ckpt_every=4)
    text = cfg.read_text().replace("block_size = 64\n", MOE_MLA_MODEL, 1)
    cfg.write_text(text.replace("[train]\n", "[train]\nrouter_bias_update_rate = 0.01\n", 1))
    return d, cfg


@pytest.fixture(scope="module")
def straight_run(moe_setup) -> Path:
    """8 steps in one process (2 micro-batches of 4 × 32 tokens per step)."""
    d, cfg = moe_setup
    train_inprocess(cfg, d / "straight")
    return d / "straight"


def final_biases(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(run / "final" / "model.safetensors").items() if "e_score_correction_bias" in k}


def test_moe_mla_trains_logs_expert_load_and_resumes_exactly(moe_setup, straight_run):
    """8 steps straight == 4 steps, resume from that checkpoint, 4 more: identical losses and routing
    biases (the bias is a buffer in the checkpoint; the update rule runs once per optimizer step)."""
    d, cfg = moe_setup
    straight = losses(straight_run)
    records = [json.loads(line) for line in (straight_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 8 and straight[8] < straight[1] - 0.5
    for r in train:  # one MoE layer (first_k_dense_replace = 1) of 4 experts; 256 tokens × top-2 per step
        (load,) = r["moe_tokens_per_expert"]
        assert len(load) == 4 and sum(load) == 256 * 2
        assert r["moe_load_max_over_mean"] == pytest.approx(max(load) / (sum(load) / 4))
        assert r["moe_load_cv"] >= 0
    biases = final_biases(straight_run)
    assert list(biases) == ["layers.1.ffn.router.e_score_correction_bias"]
    (bias,) = biases.values()
    assert bias.abs().sum() > 0 and torch.allclose(bias * 100, (bias * 100).round(), atol=1e-4)  # k × 0.01 steps

    run = d / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight_run / "checkpoints" / "step_00000004", run / "checkpoints" / "step_00000004")
    shutil.copy2(straight_run / "config.toml", run / "config.toml")
    train_inprocess(cfg, run)
    resumed = losses(run)
    assert [resumed[s] for s in range(5, 9)] == [straight[s] for s in range(5, 9)]
    assert torch.equal(final_biases(run)["layers.1.ffn.router.e_score_correction_bias"], bias)


WORKER = """
import sys, torch, torch.distributed as dist
import scalelab.train.trainer as trainer
from scalelab.train.config import load_config
torch.set_num_threads(1)
dist.init_process_group("gloo")
trainer.destroy_distributed = lambda: None  # one process group for every layout of this launch
for strategy in ("ddp", "fsdp"):
    trainer.train(load_config(sys.argv[1], [f"parallel.strategy={strategy}"]), f"{sys.argv[2]}/{strategy}",
                  log=lambda m: None)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_gloo_ranks_ddp_and_fsdp_equal_one_process(moe_setup, straight_run):
    """One torchrun launch trains the MoE+MLA model with DDP, then FSDP2, on 2 ranks (global batch 256
    tokens: micro-batch 4 × 32 on each); both equal one process with 2 micro-batches, loss and expert load
    (the load is summed over the ranks before the bias update, so every rank moves its bias alike)."""
    d, cfg = moe_setup
    single = straight_run
    (d / "worker.py").write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(d / "worker.py"), str(cfg), str(d / "two")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env_1thread(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    want = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    for strategy in ("ddp", "fsdp"):
        got = [json.loads(line) for line in (d / "two" / strategy / "metrics.jsonl").read_text().splitlines()]
        assert len(got) == len(want) == 8
        for a, b in zip(got, want):
            assert abs(a["loss"] - b["loss"]) < 1e-5, (strategy, a["step"], a["loss"], b["loss"])
            assert a["moe_tokens_per_expert"] == b["moe_tokens_per_expert"], (strategy, a["step"])
        bias = final_biases(d / "two" / strategy)["layers.1.ffn.router.e_score_correction_bias"]
        torch.testing.assert_close(bias, final_biases(single)["layers.1.ffn.router.e_score_correction_bias"],
                                   atol=1e-6, rtol=0)


def test_activation_checkpointing_counts_each_token_once_and_keeps_the_aux_loss(moe_setup):
    """Recomputing the blocks in backward neither counts the expert load twice nor loses the auxiliary
    loss's gradient (the model reads each MoE layer's routing once per forward, outside the blocks)."""
    d, cfg = moe_setup
    runs = {}
    for checkpointing in ("false", "true"):
        run = d / f"ac_{checkpointing}"
        train_inprocess(cfg, run, ["train.max_steps=3", f"train.activation_checkpointing={checkpointing}",
                                   "model.router_aux_loss_coef=0.1"])
        runs[checkpointing] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(runs["false"], runs["true"], strict=True):
        assert a["moe_tokens_per_expert"] == b["moe_tokens_per_expert"]
        assert sum(a["moe_tokens_per_expert"][0]) == 256 * 2
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-6


def test_a_moe_layer_compiles():
    """train.compile traces each block with dynamo: in fp32 the layer takes its per-expert path there
    (torch 2.13's fake-tensor rule for _grouped_mm accepts bf16 only), and computes the same."""
    torch.manual_seed(0)
    layer = MoE(tiny_moe())
    layer.init_weights(0.2, 0.2)
    x = torch.randn(2, 12, 32)
    compiled = torch.compile(layer, backend="eager", fullgraph=False)
    torch.testing.assert_close(compiled(x), layer(x), atol=1e-6, rtol=0)
