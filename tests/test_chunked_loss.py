"""The chunked (fused) lm_head + cross-entropy: the same loss and gradients as forming all the
logits, without ever holding [tokens × vocab] of them, and the memory that saves, measured.

Truth here is the unchunked path (`loss_chunk_tokens=0`: nn.Linear, then F.cross_entropy), and for
memory PyTorch's own accounting: the tensors autograd saves (`saved_tensors_hooks`) and the CPU
allocator's every allocation and free as the profiler records them (`profile_memory=True`),
summed in time order into the real peak.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from scalelab import counting
from scalelab.config import ModelConfig
from scalelab.model import Transformer

B, S = 3, 16  # 48 tokens: chunks of 16 divide them, chunks of 7 do not, 4096 is one chunk
SHAPES = {
    "llama": ModelConfig(n_layer=2, n_embd=64, n_head=4, num_key_value_heads=2, d_ff=128, vocab_size=300,
                         block_size=S),
    "llama-tied": ModelConfig(n_layer=2, n_embd=64, n_head=4, num_key_value_heads=2, d_ff=128, vocab_size=300,
                              block_size=S, tie_embeddings=True),
    "gpt2": ModelConfig(n_layer=2, n_embd=64, n_head=4, d_ff=256, vocab_size=300, block_size=S, ffn_type="gelu",
                        normalization="layernorm", position_encoding="learned", bias=True, tie_embeddings=True),
}


def batches(vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two micro-batches; ignored targets (-1) cover the whole first chunk of 7 and part of another."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(2):
        idx, targets = (torch.randint(0, vocab, (B, S), generator=g) for _ in range(2))
        targets[0, :9] = -1
        targets[2, 5] = -1
        out.append((idx, targets))
    return out


def train_grads(model: Transformer, autocast: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses and accumulated gradients of two micro-batches, each loss halved, as the trainer's
    gradient accumulation does (so backward also sees an incoming gradient other than 1)."""
    model.zero_grad(set_to_none=True)
    losses = []
    for idx, targets in batches(model.config.vocab_size):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, loss = model(idx, targets)
        assert (logits is None) == (model.loss_chunk_tokens > 0)
        (loss / 2).backward()
        losses.append(loss.item())
    return losses, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("chunk", [7, 16, 4096])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_loss_and_every_gradient_equal_the_unchunked_path(shape, chunk, autocast):
    """fp32: within fp32 rounding (the two paths sum in different orders): relative 1e-4, or 1e-5 of
    the tensor's largest gradient. bf16 autocast: both paths run lm_head's matmuls in bf16 (8
    significant bits) and round the weight gradient at different points (the unchunked path once,
    over all tokens; the chunked one per chunk, summed in fp32), so gradients agree to 2^-6 of the
    tensor's largest; losses, from the same bf16 logits scored in fp32, to 1e-5."""
    torch.manual_seed(0)
    reference = Transformer(SHAPES[shape], loss_chunk_tokens=0)
    chunked = Transformer(SHAPES[shape], loss_chunk_tokens=chunk)
    chunked.load_state_dict(reference.state_dict())
    want_losses, want = train_grads(reference, autocast)
    got_losses, got = train_grads(chunked, autocast)
    assert got_losses == pytest.approx(want_losses, rel=1e-5)
    assert got.keys() == want.keys()
    largest = max(g.abs().max().item() for g in want.values())
    for name, g in want.items():
        # K's bias has a zero gradient in exact arithmetic (it shifts a query's scores over all keys
        # alike, which softmax ignores): rounding noise there is measured against the model's scale
        scale = max(g.abs().max().item(), 1e-3 * largest)
        atol, rtol = (2**-6 * scale, 0.0) if autocast else (1e-5 * scale, 1e-4)
        torch.testing.assert_close(got[name], g, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
    if SHAPES[shape].tie_embeddings:
        assert chunked.lm_head.weight is chunked.tok_embeddings.weight


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_eval_loss_without_grad_equals_the_unchunked_path(autocast):
    """Under no_grad (the trainer's eval) the chunked path only scores: no gradient buffers."""
    torch.manual_seed(0)
    reference = Transformer(SHAPES["llama"], loss_chunk_tokens=0)
    chunked = Transformer(SHAPES["llama"], loss_chunk_tokens=7)
    chunked.load_state_dict(reference.state_dict())
    idx, targets = batches(300)[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        want, (logits, got) = reference(idx, targets)[1], chunked(idx, targets)
    assert logits is None and not got.requires_grad
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    # inference is untouched: logits without targets, as before
    torch.testing.assert_close(chunked(idx), reference(idx), atol=0, rtol=0)


def test_all_targets_ignored_gives_nan_like_cross_entropy():
    torch.manual_seed(0)
    model = Transformer(SHAPES["llama"], loss_chunk_tokens=7)
    idx = torch.zeros(1, 8, dtype=torch.long)
    reference = torch.nn.functional.cross_entropy(torch.zeros(8, 300), torch.full((8,), -1), ignore_index=-1)
    assert reference.isnan() and model(idx, torch.full((1, 8), -1))[1].isnan()


def test_default_is_chunked_for_training():
    from scalelab.train.config import TrainSection

    assert Transformer(SHAPES["llama"]).loss_chunk_tokens == counting.DEFAULT_LOSS_CHUNK_TOKENS > 0
    assert TrainSection().loss_chunk_tokens == counting.DEFAULT_LOSS_CHUNK_TOKENS


@pytest.mark.parametrize("bad", [-1, 2.5, True, "8"])
def test_bad_chunk_size_is_refused(bad):
    from scalelab.errors import UserError

    with pytest.raises(UserError, match="loss_chunk_tokens must be a whole number >= 0"):
        Transformer(SHAPES["llama"], loss_chunk_tokens=bad)


# ---- memory -------------------------------------------------------------------------------------

def saved_shapes(model: Transformer, idx: torch.Tensor, targets: torch.Tensor) -> list[tuple[int, ...]]:
    shapes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, targets)
    return shapes


def test_nothing_per_vocabulary_entry_and_token_is_saved_for_backward():
    """Unchunked, cross_entropy saves the fp32 log-probabilities, (tokens, vocab); chunked, the loss
    saves the hidden states' gradient (tokens, n_embd) and lm_head's weight gradient (vocab, n_embd):
    no saved tensor holds anything per vocabulary entry and token."""
    cfg = SHAPES["llama"]
    vocab, tokens = cfg.vocab_size, 2 * B * S  # more tokens than n_embd: the largest saved tensor tells
    idx, targets = torch.cat([x for x, _ in batches(vocab)]), torch.cat([t for _, t in batches(vocab)])
    torch.manual_seed(0)
    unchunked = saved_shapes(Transformer(cfg, loss_chunk_tokens=0), idx, targets)
    chunked = saved_shapes(Transformer(cfg, loss_chunk_tokens=16), idx, targets)
    assert max(unchunked, key=math.prod) == (tokens, vocab)
    assert max(math.prod(s) for s in chunked) == vocab * cfg.n_embd < tokens * vocab
    assert (tokens, cfg.n_embd) in chunked and (vocab, cfg.n_embd) in chunked


def peak_bytes(step) -> int:
    """The real peak of the CPU allocator during step(), above what was allocated before it: every
    allocation and free the profiler records (`profile_memory=True`), summed in time order."""
    from scalelab.train.metrics import allocator_peak_bytes

    return allocator_peak_bytes(step)[0]


def test_chunked_loss_lowers_the_measured_peak_by_the_predicted_amount():
    """One forward + backward at LLaMA 3's 128,256-token vocabulary (fp32, a one-layer model so that
    the loss dominates): the measured peak falls by what counting.loss_bytes predicts for the two
    paths, less lm_head's weight gradient, which the chunked loss forms during forward (so it is
    live at that path's peak) and the unchunked one only after its peak; each peak is what counting
    predicts for the activations and the loss (plus, chunked, that gradient). (Under bf16 autocast on the CPU, the
    fp32 gradient's `+=` of each chunk's bf16 product first casts the product to fp32: a weight-sized
    transient that CUDA's kernels, which cast inside, do not have; fp32 has neither.)"""
    vocab, chunk, batch, seq = 128256, 32, 2, 128
    cfg = ModelConfig(n_layer=1, n_embd=32, n_head=2, num_key_value_heads=1, d_ff=64, vocab_size=vocab,
                      block_size=seq)
    g = torch.Generator().manual_seed(0)
    idx, targets = (torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(2))
    tokens = batch * seq
    peaks = {}
    for c in (0, chunk):
        torch.manual_seed(0)
        model = Transformer(cfg, loss_chunk_tokens=c)

        def step(model=model):
            model(idx, targets)[1].backward()

        step()  # a first step allocates what later steps reuse; measure the second
        model.zero_grad(set_to_none=True)
        peaks[c] = peak_bytes(step)
    lm_head_grad = 4 * vocab * cfg.n_embd
    predicted_drop = counting.loss_bytes(tokens, vocab, 4, 0) - counting.loss_bytes(tokens, vocab, 4, chunk)
    assert peaks[0] - peaks[chunk] == pytest.approx(predicted_drop - lm_head_grad, rel=0.002)
    # what counting says is live at the loss's backward: the saved activations, the loss's
    # temporaries and (chunked) lm_head's weight gradient, formed during forward
    memory = {c: counting.training_memory(cfg, micro_batch=batch, seq_len=seq, precision="fp32", sharding="none",
                                          loss_chunk_tokens=c) for c in (0, chunk)}
    predicted = {c: m["activations"] + m["loss"] + m["loss_gradient"] for c, m in memory.items()}
    assert memory[0]["loss_gradient"] == 0 and memory[chunk]["loss_gradient"] == lm_head_grad
    assert peaks[0] == pytest.approx(predicted[0], rel=0.002)  # before any gradient exists
    assert peaks[chunk] == pytest.approx(predicted[chunk], rel=0.01)
    assert peaks[chunk] < peaks[0] / 10


# ---- where the setting reaches ----------------------------------------------------------------

def test_trainer_prediction_and_count_follow_the_setting(cli, tmp_path):
    """train.loss_chunk_tokens reaches the trainer's predicted memory and `scalelab count` (as a
    training config's default and as --loss-chunk-tokens), in the loss term."""
    from scalelab.train.config import config_from_dict
    from scalelab.train.trainer import predicted_memory

    model = {"style": "llama3", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 32000, "block_size": 256}
    train = {"seq_len": 256, "micro_batch_size": 4, "max_steps": 1, "dtype": "fp32"}
    cfgs = {c: config_from_dict({"model": model, "data": {"dir": "unused"},
                                 "train": {**train, "loss_chunk_tokens": c}}) for c in (0, 128)}
    tokens = 4 * 256
    want = counting.loss_bytes(tokens, 32000, 4, 0) - counting.loss_bytes(tokens, 32000, 4, 128)
    mem = {c: predicted_memory(cfg, "none", 1) for c, cfg in cfgs.items()}
    assert mem[0]["loss"] - mem[128]["loss"] == want

    toml = tmp_path / "run.toml"
    toml.write_text("[model]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in model.items())
                    + "[train]\nseq_len = 256\nmicro_batch_size = 4\ndtype = \"fp32\"\nloss_chunk_tokens = 0\n")
    from_config = json.loads(cli("count", str(toml), "--sharding", "none", "--json").stdout)["memory"]
    flag = json.loads(cli("count", str(toml), "--sharding", "none", "--loss-chunk-tokens", "128",
                          "--json").stdout)["memory"]
    assert from_config["loss_chunk_tokens"] == 0 and flag["loss_chunk_tokens"] == 128
    assert from_config["total"] == mem[0]["total"] and flag["total"] == mem[128]["total"]
