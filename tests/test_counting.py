"""Counting against independent truth: official parameter counts, hand-derived FLOPs,
and the arithmetic of memory and time."""

import numpy as np
import pytest

from scalelab import counting
from scalelab.config import ModelConfig
from scalelab.hardware import ACCELERATORS, get_accelerator
from scalelab.presets import PRESETS, get_preset, style_config

# Each preset's published Hugging Face config.json, the fields that set the parameter count, written
# out here (not read from presets.py): huggingface.co/<repo>/blob/main/config.json.
GPT2 = "gpt2"
HF_CONFIGS = {
    # openai-community/gpt2, -medium, -large, -xl (n_inner null = 4 * n_embd; n_positions 1024; tied)
    "gpt2": (GPT2, dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)),
    "gpt2-medium": (GPT2, dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024)),
    "gpt2-large": (GPT2, dict(n_layer=36, n_embd=1280, n_head=20, vocab_size=50257, n_positions=1024)),
    "gpt2-xl": (GPT2, dict(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257, n_positions=1024)),
    # meta-llama/Llama-2-7b-hf, -13b-hf, -70b-hf
    "llama2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)),
    "llama2-13b": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                 num_attention_heads=40, num_key_value_heads=40, vocab_size=32000)),
    "llama2-70b": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, vocab_size=32000)),
    # meta-llama/Meta-Llama-3-8B, Llama-3.1-8B, -70B, -405B
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
    "llama3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
    "llama3.1-70b": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                   num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)),
    "llama3.1-405b": ("llama", dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                                    num_attention_heads=128, num_key_value_heads=8, vocab_size=128256)),
    # meta-llama/Llama-3.2-1B, -3B (tie_word_embeddings true)
    "llama3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                  tie_word_embeddings=True)),
    "llama3.2-3b": ("llama", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                  num_attention_heads=24, num_key_value_heads=8, vocab_size=128256,
                                  tie_word_embeddings=True)),
    # mistralai/Mistral-7B-v0.1
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)),
    # Qwen/Qwen2.5-0.5B, -1.5B (tied), -7B (untied)
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                   tie_word_embeddings=True)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                   tie_word_embeddings=True)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 tie_word_embeddings=False)),
    # Qwen/Qwen3-0.6B (tied), Qwen3-8B: head_dim 128 whatever hidden_size / heads, q/k norms
    "qwen3-0.6b": ("qwen3", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                 tie_word_embeddings=True)),
    "qwen3-8b": ("qwen3", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                               tie_word_embeddings=False)),
    # mistralai/Mixtral-8x7B-v0.1
    "mixtral-8x7b": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                     num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)),
    # Qwen/Qwen3-30B-A3B
    "qwen3-30b-a3b": ("qwen3_moe", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                        head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                                        decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
                                        tie_word_embeddings=False)),
    # deepseek-ai/DeepSeek-V3 (DeepseekV3ForCausalLM builds the main model: no MTP layer)
    "deepseek-v3": ("deepseek_v3", dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                                        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                                        num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
                                        kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
                                        qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
                                        first_k_dense_replace=3, tie_word_embeddings=False)),
    # deepseek-ai/DeepSeek-V2-Lite (q_lora_rank null: full-rank query)
    "deepseek-v2-lite": ("deepseek_v2", dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                                             moe_intermediate_size=1408, num_hidden_layers=27,
                                             num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
                                             n_routed_experts=64, kv_lora_rank=512, q_lora_rank=None,
                                             qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
                                             num_experts_per_tok=6, first_k_dense_replace=1,
                                             tie_word_embeddings=False)),
}

# Published totals (sum of tensor sizes in each release's safetensors, as its model card / the
# Hub's "Model size" states), restated here: a second, transformers-free truth.
PUBLISHED = {
    "gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200,
    "llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248, "llama3.1-8b": 8_030_261_248, "llama3.1-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800, "llama3.2-1b": 1_235_814_400, "llama3.2-3b": 3_212_749_824,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512,
    "mixtral-8x7b": 46_702_792_704,  # the figure, the sum of the release's tensors
    # Model cards that give the total rounded, in billions, as (figure, decimals): Qwen3-0.6B "0.6B",
    # Qwen3-8B "8.2B", Qwen3-30B-A3B "30.5B", DeepSeek-V3 "671B" (main model; 685B with the MTP
    # module), DeepSeek-V2-Lite "15.7B"
    "qwen3-0.6b": (0.6, 1), "qwen3-8b": (8.2, 1), "qwen3-30b-a3b": (30.5, 1), "deepseek-v3": (671, 0),
    "deepseek-v2-lite": (15.7, 1),
}
# Published activated parameters, in billions (figure, decimals, counts the token embedding?):
# Mixtral "12.9B active", Qwen3-30B-A3B "3.3B activated" (3.35B), DeepSeek-V3 "37B activated", DeepSeek-V2-Lite
# "2.4B activated" (its figure leaves out the token embedding: 2.45B; with it 2.66B)
PUBLISHED_ACTIVE = {"mixtral-8x7b": (12.9, 1, True), "qwen3-30b-a3b": (3.3, 1, True), "deepseek-v3": (37, 0, True),
                    "deepseek-v2-lite": (2.4, 1, False)}


def hf_meta_numel(kind: str, fields: dict) -> int:
    """transformers' own model class for the config, built on the meta device (no memory), counted."""
    return sum(p.numel() for p in hf_meta_model(kind, fields).parameters())  # a tied matrix: counted once


def hf_meta_model(kind: str, fields: dict):
    """transformers' own model class for the config, built on the meta device (no memory)."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    config_class = {GPT2: transformers.GPT2Config, "llama": transformers.LlamaConfig,
                    "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
                    "qwen3": transformers.Qwen3Config, "mixtral": transformers.MixtralConfig,
                    "qwen3_moe": transformers.Qwen3MoeConfig, "deepseek_v3": transformers.DeepseekV3Config,
                    "deepseek_v2": transformers.DeepseekV2Config}[kind]
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config_class(**fields))


def test_every_preset_has_an_independent_truth():
    assert set(HF_CONFIGS) == set(PUBLISHED) == set(PRESETS)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_equals_transformers_and_the_published_count(name):
    ours = counting.count_params(PRESETS[name]).total
    assert ours == hf_meta_numel(*HF_CONFIGS[name])
    published = PUBLISHED[name]
    if isinstance(published, tuple):  # a model card's rounded figure
        assert round(ours / 1e9, published[1]) == published[0]
    else:
        assert ours == published


@pytest.mark.parametrize("name", list(PUBLISHED_ACTIVE))
def test_active_params_are_all_but_the_unchosen_experts(name):
    """Active = total less (E - k)/E of the routed experts' weights, brute-forced from transformers' own
    model (every tensor under mlp.experts.), and against the published activated figure."""
    cfg = PRESETS[name]
    model = hf_meta_model(*HF_CONFIGS[name])
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    total = sum(p.numel() for p in model.parameters())
    k, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    p = counting.count_params(cfg)
    assert experts * k % E == 0 and p.active == total - experts * (E - k) // E
    assert p.breakdown["experts"] == experts
    figure, decimals, with_token_embedding = PUBLISHED_ACTIVE[name]
    active = p.active if with_token_embedding else p.active - p.breakdown["token_embedding"]
    # within one unit of the figure's last digit: Mistral rounds (12.88 -> 12.9), Qwen truncates (3.35 -> 3.3)
    assert abs(active / 1e9 - figure) < 10 ** -decimals


@pytest.mark.parametrize("overrides, hf_fields", [
    # GPT2Config(n_inner=None): the FFN is 4 * n_embd whatever n_embd is
    (["n_embd=128", "n_head=4"], dict(n_layer=12, n_embd=128, n_head=4, vocab_size=50257, n_positions=1024)),
    (["n_embd=1536", "n_layer=2"], dict(n_layer=2, n_embd=1536, n_head=12, vocab_size=50257, n_positions=1024)),
    # an explicit d_ff wins (n_inner given)
    (["n_embd=128", "n_head=4", "d_ff=1000"], dict(n_layer=12, n_embd=128, n_head=4, vocab_size=50257,
                                                  n_positions=1024, n_inner=1000)),
])
def test_gpt2_width_override_follows_the_4x_rule_as_transformers(overrides, hf_fields):
    cfg = get_preset("gpt2").with_overrides(overrides)
    assert counting.count_params(cfg).total == hf_meta_numel(GPT2, hf_fields)


def test_llama_style_width_override_follows_the_style_rule():
    # a style (not a preset) keeps its FFN rule: LLaMA 3's 3.5 x n_embd rounded up to a multiple of 128
    cfg = style_config("llama3", 4, 4096, 32).replace(n_embd=2048, n_head=16)
    assert cfg.ffn_hidden == 7168
    # a preset keeps the published intermediate_size, as transformers' LlamaConfig does
    assert get_preset("llama3.1-8b").replace(n_embd=2048, n_head=16).ffn_hidden == 14336


def llama_state_dict_shapes(cfg: ModelConfig):
    """Brute force: the tensor shapes of a Hugging Face LlamaForCausalLM checkpoint."""
    h, kv, f, v = cfg.n_embd, cfg.kv_dim, cfg.ffn_hidden, cfg.vocab_size
    shapes = [(v, h), (h,)]  # embed_tokens, final norm
    if not cfg.tie_embeddings:
        shapes.append((v, h))
    for _ in range(cfg.n_layer):
        shapes += [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f), (h,), (h,)]
    return shapes


@pytest.mark.parametrize("name", ["llama2-13b", "llama3.2-3b", "llama3.1-8b", "mistral-7b"])
def test_params_equal_brute_force_tensor_shapes(name):
    cfg = get_preset(name)
    assert counting.count_params(cfg).total == sum(int(np.prod(s)) for s in llama_state_dict_shapes(cfg))


def test_breakdown_sums_and_embedding_split():
    for cfg in PRESETS.values():
        p = counting.count_params(cfg)
        assert sum(p.breakdown.values()) == p.total == p.embedding + p.non_embedding
    gpt2 = counting.count_params(get_preset("gpt2"))
    assert gpt2.breakdown["position_embedding"] == 1024 * 768 and gpt2.breakdown["lm_head"] == 0
    # Kaplan et al. quote ~85M non-embedding parameters for GPT-2 small.
    assert gpt2.non_embedding == 124_439_808 - 50257 * 768 - 1024 * 768 == 85_056_000


def test_forward_flops_hand_derived_gpt2():
    # GPT-2 small at S = 1024, written out matmul by matmul:
    L, H, V, S = 12, 768, 50257, 1024
    per_layer = 2 * (H * 3 * H) + 2 * (H * H) + 2 * (H * 4 * H) + 2 * (4 * H * H)  # qkv, proj, fc, proj
    attention = 2 * S * H + 2 * S * H  # QK^T and AV, per token
    expected = L * (per_layer + attention) + 2 * H * V  # + lm_head
    assert counting.forward_flops_per_token(get_preset("gpt2"), S) == expected
    assert counting.training_flops_per_token(get_preset("gpt2"), S) == 3 * expected


def test_flops_identity_with_6n_plus_attention_for_untied_llama():
    # For an untied model: training = 6·(N − token embedding − norms) + 12·L·H·S exactly.
    cfg, S = get_preset("llama2-7b"), 4096
    p = counting.count_params(cfg)
    expected = 6 * (p.total - p.breakdown["token_embedding"] - p.breakdown["norms"]) + 12 * 32 * 4096 * S
    assert counting.training_flops_per_token(cfg, S) == expected
    assert counting.flops_report(cfg, S)["training_per_token_6n"] == 6 * p.total


def test_shortcuts_computed_as_their_sources_do():
    """Each shortcut from its source's own formula, written out with literal numbers."""
    # nanoGPT estimate_mfu on GPT-2 small: N = get_num_params() = 123.65M (total less wpe 1024 x 768),
    # flops_per_token = 6*N + 12*L*H*Q*T with L=12, H=12, Q=64, T=1024
    r = counting.flops_report(get_preset("gpt2"), 1024)
    assert r["training_per_token_nanogpt"] == 6 * 123_653_376 + 12 * 12 * 12 * 64 * 1024
    # torchtitan on Llama-2-7B: get_num_params(exclude_embedding=True) = total − tok_embeddings (32000 x 4096);
    # that is the exact count plus 6 x the norms' (2·32 + 1)·4096 weights, which are no matmul
    S = 4096
    r = counting.flops_report(get_preset("llama2-7b"), S)
    assert r["training_per_token_torchtitan"] == 6 * (6_738_415_616 - 32000 * 4096) + 12 * 32 * 32 * 128 * S
    assert r["training_per_token_torchtitan"] - r["training_per_token"] == 6 * (2 * 32 + 1) * 4096
    # Megatron-LM transformer_flops (MHA/GQA branch), per token (batch_size * seq_length = 1 token):
    #   3*2*(h*(q + k + v) + q*S/2*2 + q*h) per layer, 3*2*h*ffn*(3 if swiglu else 2) per layer, 3*2*h*V
    for name, h, q, kv, ffn, L, V, swiglu, S in [("llama3.1-8b", 4096, 4096, 1024, 14336, 32, 128256, True, 8192),
                                                  ("gpt2", 768, 768, 768, 3072, 12, 50257, False, 1024)]:
        attn = 3 * 2 * (h * (q + 2 * kv) + q * S // 2 * 2 + q * h)
        mlp = 3 * 2 * h * ffn * (3 if swiglu else 2)
        assert counting.flops_report(get_preset(name), S)["training_per_token_megatron"] == \
            L * (attn + mlp) + 3 * 2 * h * V


def test_gqa_saves_what_the_kv_projections_hold():
    cfg = get_preset("llama3.1-8b")
    g = counting.gqa_comparison(cfg, 8192)
    # K and V shrink from 4096x4096 to 4096x1024 in each of 32 layers.
    assert g["params_saved"] == 32 * 2 * 4096 * (4096 - 1024)
    assert g["kv_cache_reduction"] == 4
    assert counting.kv_cache_bytes_per_token(cfg) == 2 * 32 * 1024 * 2  # 128 KiB per token in bf16


def test_vectorised_arrays_equal_scalar_counts():
    shapes = [(4, 256, 4, 2, 896), (24, 2048, 16, 8, 7168), (80, 8192, 64, 8, 28672)]
    arr = np.array(shapes).T
    totals = counting.param_breakdown_arrays(*arr, 128256)["total"]
    flops = counting.training_flops_per_token_arrays(*arr, 128256, 2048)
    for i, (l, h, a, kv, f) in enumerate(shapes):
        cfg = style_config("llama3", l, h, a, num_key_value_heads=kv, d_ff=f)
        assert totals[i] == counting.count_params(cfg).total
        assert flops[i] == counting.training_flops_per_token(cfg, 2048)


def test_memory_accounting():
    cfg = get_preset("llama3.1-8b")
    n = counting.count_params(cfg).total
    one = counting.training_memory(cfg, micro_batch=1, seq_len=2048, num_devices=1, sharding="ddp")
    assert one["weights"] + one["gradients"] + one["optimizer"] == 16 * n  # AdamW mixed precision
    fsdp = counting.training_memory(cfg, micro_batch=1, seq_len=2048, num_devices=8, sharding="fsdp")
    fsdp1 = counting.training_memory(cfg, micro_batch=1, seq_len=2048, num_devices=1, sharding="fsdp")
    assert fsdp["optimizer"] == one["optimizer"] / 8 and fsdp["activations"] == fsdp1["activations"]
    # FSDP's bf16 forward has a bf16 residual stream and no autocast casts or weight copies
    assert fsdp["activations"] < one["activations"] and fsdp["weight_copies"] == 0
    assert one["weight_copies"] == 2 * counting.matmul_weights_arrays(*counting._shape_args(cfg), ffn_type=cfg.ffn_type)
    ddp = counting.training_memory(cfg, micro_batch=1, seq_len=2048, num_devices=8, sharding="ddp")
    assert ddp["weights"] == one["weights"] and ddp["activations"] == one["activations"]
    ckpt = counting.training_memory(cfg, micro_batch=1, seq_len=2048, activation_checkpointing=True)
    assert ckpt["activations"] < one["activations"] / 5
    two = counting.training_memory(cfg, micro_batch=2, seq_len=2048, sharding="ddp")
    # saved activations grow with the batch; the chunked loss holds one chunk whatever the batch
    chunk = counting.loss_bytes(2048, cfg.vocab_size, 2)
    # (plus, under autocast, the bf16 copy of lm_head, a chunk's bf16 weight gradient and its fp32 form)
    assert chunk == 1024 * cfg.vocab_size * 6 and two["loss"] == one["loss"] == chunk + 8 * cfg.vocab_size * cfg.n_embd
    assert two["activations"] == 2 * one["activations"]
    unchunked = [counting.training_memory(cfg, micro_batch=m, seq_len=2048, sharding="ddp", loss_chunk_tokens=0)
                 for m in (1, 2)]
    assert unchunked[1]["loss"] == 2 * unchunked[0]["loss"] == 2 * 2048 * (8 + 12 * cfg.vocab_size)
    assert unchunked[0]["activations"] == one["activations"]
    math = counting.training_memory(cfg, micro_batch=1, seq_len=2048, sharding="ddp", attention="math")
    # per token and layer: the fp32 softmax and its bf16 copy (S per head) instead of one fp32
    # log-sum-exp per head, and K, V repeated to 32 heads instead of rotated K and packed [K | V]
    h, kv, heads = 4096, 1024, 32
    assert math["activations"] - one["activations"] == 2048 * 32 * (heads * (2048 * 6 - 4) + 2 * (2 * h - 2 * kv))


def test_time_arithmetic():
    cfg = get_preset("llama3.1-8b")
    per_token = counting.training_flops_per_token(cfg, 8192)
    h100 = get_accelerator("H100")
    t = counting.training_time(per_token, 1e12, h100, num_devices=8, mfu=0.5)
    assert t["tokens_per_second_per_device"] == pytest.approx(0.5 * 989e12 / per_token)
    assert t["seconds"] * t["tokens_per_second"] == pytest.approx(1e12)
    assert counting.mfu(t["tokens_per_second_per_device"], per_token, h100.peak_bf16_flops) == pytest.approx(0.5)


def test_hardware_table_is_physically_sane():
    for acc in ACCELERATORS.values():
        assert 100e12 < acc.peak_bf16_flops < 3e15 and 40 <= acc.memory_gib <= 192
    # The original system claimed 30-35K tokens/s for an 8B model on 4xA100: impossible.
    per_token = counting.training_flops_per_token(get_preset("llama3.1-8b"), 2048)
    ceiling = 4 * ACCELERATORS["A100-80GB"].peak_bf16_flops / per_token
    assert ceiling < 30_000


def test_gradient_accumulation_holds_the_gradients_through_later_micro_batches():
    """grad_accum_steps > 1: micro-batches 2..k run forward and backward beside the gradients so far
    (tests/test_memory_timeline.py measures it): full .grad for one process and DDP (no_sync), in the
    gradients' dtype; FSDP2, which reduce-scatters every micro-step (ParallelDims.grad_sync), the
    sharded ones. The root's new gradients are then added in place (no extra term) except under FSDP. The default, 1,
    is the one-micro-batch step; the optimizer step is the same either way."""
    cfg = ModelConfig(n_layer=2, n_embd=64, n_head=4, num_key_value_heads=2, d_ff=128, vocab_size=256, block_size=32)
    n = counting.count_params(cfg).total
    kw = dict(micro_batch=2, seq_len=32, loss_chunk_tokens=0)
    one = counting.training_memory(cfg, precision="fp32", sharding="none", **kw)
    assert one == counting.training_memory(cfg, precision="fp32", sharding="none", grad_accum_steps=1, **kw)
    assert one["accumulated_gradients"] == 0
    four = counting.training_memory(cfg, precision="fp32", sharding="none", grad_accum_steps=4, **kw)
    assert four["accumulated_gradients"] == 4 * n and four["root_gradients"] == 0
    for phase in ("forward_end", "loss_backward"):
        assert four[f"phase_{phase}"] - one[f"phase_{phase}"] == 4 * n
    assert four["phase_backward"] - one["phase_backward"] == 4 * n - one["root_gradients"]
    assert four["phase_optimizer_step"] == one["phase_optimizer_step"]
    assert counting.training_memory(cfg, precision="fp32", sharding="ddp", num_devices=2, grad_accum_steps=2,
                                    **kw)["accumulated_gradients"] == 4 * n
    assert counting.training_memory(cfg, precision="bf16", sharding="none", grad_accum_steps=2,
                                    **kw)["accumulated_gradients"] == 2 * n
    fsdp = counting.training_memory(cfg, precision="bf16-mixed", sharding="fsdp", num_devices=8, grad_accum_steps=2, **kw)
    assert fsdp["accumulated_gradients"] == fsdp["gradients"] == 4 * n / 8  # sharded, fp32
    arrays = counting.training_memory_arrays(*counting._shape_args(cfg), seq_len=32, micro_batch=2, precision="fp32",
                                             sharding="none", loss_chunk_tokens=0, grad_accum_steps=np.array([1, 4]),
                                             **counting._style_kwargs(cfg))
    assert list(arrays["peak"]) == [one["peak"], four["peak"]]
    with pytest.raises(ValueError, match="grad_accum_steps"):
        counting.training_memory(cfg, grad_accum_steps=0)
