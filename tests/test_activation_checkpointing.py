"""Activation checkpointing modes (train/parallel.py apply_activation_checkpointing): none, full,
selective by layer (every k-th block) and selective by op (torchtitan's policy).

Independent truths: the unwrapped model's losses and gradients; the allocator's live bytes when
forward has returned (PyTorch profiler memory events), against counting's saved activations; and
torch.utils.flop_counter.FlopCounterMode over forward + backward, against counting's executed
(hardware) FLOPs. Fixed, non-per-token differences are stated where they arise:
- the non-reentrant checkpoint stores the CPU RNG state (torch.get_rng_state(), 5056 bytes) per
  wrapped block call (preserve_rng_state=True);
- the math path's bool S x S causal mask is saved by an unwrapped block only.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from scalelab import counting
from scalelab.config import ModelConfig
from scalelab.model import Transformer
from scalelab.train.config import checkpointing_mode, config_from_dict, resume_differences, selective_option
from scalelab.train.parallel import apply_activation_checkpointing, checkpointed_layers

B, S = 2, 48
LLAMA = dict(n_layer=4, n_embd=96, n_head=6, num_key_value_heads=2, d_ff=256, vocab_size=384, block_size=S)
MODES = [("none", "op"), ("full", "op"), ("selective", "op"), ("selective", "2"), ("selective", "3")]


def batch(cfg: ModelConfig):
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, cfg.vocab_size, (B, S), generator=g),
            torch.randint(0, cfg.vocab_size, (B, S), generator=g))


def wrapped(base: torch.nn.Module, mode: str, option: str) -> torch.nn.Module:
    model = copy.deepcopy(base)
    if mode != "none":
        apply_activation_checkpointing(model, mode, option)
    return model


def test_which_blocks_each_mode_wraps():
    assert checkpointed_layers(6, "none") == []
    assert checkpointed_layers(6, "full") == checkpointed_layers(6, "selective", "op") == list(range(6))
    assert checkpointed_layers(6, "selective", "2") == [1, 3, 5]  # torchtitan counts blocks from 1
    assert checkpointed_layers(7, "selective", "3") == [2, 5]
    for n, k in ((6, "2"), (7, "3"), (4, "5")):
        assert counting.checkpointed_layer_count(n, "selective", k) == len(checkpointed_layers(n, "selective", k))


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_every_mode_gives_the_same_loss_and_gradients(attention):
    cfg = ModelConfig(**LLAMA)
    torch.manual_seed(0)
    base = Transformer(cfg, attention=attention, loss_chunk_tokens=0)
    idx, targets = batch(cfg)
    results = {}
    for mode, option in MODES:
        model = wrapped(base, mode, option)
        _, loss = model(idx, targets)
        loss.backward()
        results[mode, option] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
        # parameter names are unchanged, so checkpoints stay interchangeable between modes
        assert set(model.state_dict()) == set(base.state_dict())
    loss0, grads0 = results["none", "op"]
    for key, (loss, grads) in results.items():
        assert torch.equal(loss, loss0), key
        for name, g in grads.items():
            torch.testing.assert_close(g, grads0[name], rtol=0, atol=1e-6, msg=f"{key} {name}")


def live_after_forward(model: torch.nn.Module, cfg: ModelConfig, autocast: bool) -> int:
    """Bytes that one training forward (with the loss) allocated and left alive, summed from the
    profiler's allocation and free events."""
    from torch.profiler import ProfilerActivity, profile

    idx, targets = batch(cfg)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _, loss = model(idx, targets)
    assert loss.requires_grad
    return sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")


@pytest.mark.parametrize("attention", ["sdpa", "math"])
@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_saved_bytes_of_each_mode_are_what_counting_says(precision, attention):
    """What each mode saves beyond (or short of) the unwrapped model, measured by the allocator, is
    counting's activations + autocast weight copies difference, to the byte (plus the fixed items in
    the module docstring). The unwrapped model's own figure is proven in tests/test_memory.py."""
    cfg = ModelConfig(**LLAMA)
    torch.manual_seed(0)
    base = Transformer(cfg, attention=attention, loss_chunk_tokens=0)
    autocast = precision == "bf16-mixed"

    def predicted(mode, option):
        m = counting.training_memory(cfg, micro_batch=B, seq_len=S, precision=precision, sharding="none",
                                     attention=attention, activation_checkpointing=mode, selective_ac_option=option,
                                     loss_chunk_tokens=0, device="cpu")
        return m["activations"] + m["weight_copies"]

    none = live_after_forward(base, cfg, autocast)
    rng_state = torch.get_rng_state().nbytes
    for mode, option in MODES[1:]:
        n_wrapped = len(checkpointed_layers(cfg.n_layer, mode, option))
        fixed = n_wrapped * (rng_state - (S * S if attention == "math" else 0))
        got = live_after_forward(wrapped(base, mode, option), cfg, autocast) - none
        assert got == predicted(mode, option) - predicted("none", "op") + fixed, (mode, option)


@pytest.mark.parametrize("ffn_type", ["swiglu", "gelu"])
def test_executed_flops_of_each_mode_are_what_counting_says(ffn_type):
    """FlopCounterMode counts what runs, recomputation included: training FLOPs + counting's
    recompute FLOPs, exactly (math attention: FlopCounterMode does not count the CPU's fused SDPA)."""
    cfg = ModelConfig(**{**LLAMA, "ffn_type": ffn_type})
    torch.manual_seed(0)
    base = Transformer(cfg, attention="math", loss_chunk_tokens=0)
    idx, targets = batch(cfg)
    for mode, option in MODES:
        model = wrapped(base, mode, option)
        with FlopCounterMode(display=False) as counter:
            model(idx, targets)[1].backward()
        executed = counting.executed_training_flops(cfg, B, S, activation_checkpointing=mode,
                                                    selective_ac_option=option, attention="math")
        assert counter.get_total_flops() == executed, (mode, option)
        assert (executed > counting.training_flops(cfg, B, S)) == (mode != "none")


def test_config_reads_old_bools_and_checks_the_selective_option(tmp_path):
    assert checkpointing_mode(True) == "full" and checkpointing_mode(False) == "none"
    assert [selective_option(v) for v in ("op", 2, "2", 2.0, "02", 0, "0", "layer", True, -1)] == \
        ["op", "2", "2", "2", "2", None, None, None, None, None]
    base = {"model": {"preset": "gpt2"}, "data": {"dir": "d"}, "train": {"max_steps": 1}}
    old = config_from_dict({**base, "train": {"max_steps": 1, "activation_checkpointing": True}})
    assert old.train.activation_checkpointing == "full"
    new = config_from_dict({**base, "train": {"max_steps": 1, "activation_checkpointing": "selective",
                                              "selective_ac_option": 2}})
    assert (new.train.activation_checkpointing, new.train.selective_ac_option) == ("selective", "2")
    from scalelab.errors import UserError

    for bad in ({"activation_checkpointing": "yes"}, {"selective_ac_option": "layer"}, {"selective_ac_option": 0}):
        with pytest.raises(UserError, match="activation_checkpointing|selective_ac_option"):
            config_from_dict({**base, "train": {"max_steps": 1, **bad}})
    # a run directory written when the key was a bool resumes with its mode unchanged, silently
    written_before = {"train": {"activation_checkpointing": True}}
    assert resume_differences(written_before, {"train": {"activation_checkpointing": "full"}}) == ([], [])
    assert resume_differences({"train": {"activation_checkpointing": False}}, {"train": {}}) == ([], [])
