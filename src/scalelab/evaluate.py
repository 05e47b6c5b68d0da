"""Measure a language model on prepared data: loss, perplexity, bits per byte, loss by position.

    model, tokenizer = load_eval_model("runs/x")        # run dir, checkpoint, native or HF directory
    result = evaluate(model, "data/shakespeare", split="val", seq_len=512, tokenizer=tokenizer)

The walk is fixed: the split's shards are one token stream (as data.loader reads them), cut into
non-overlapping windows of S + 1 tokens, window w = tokens [w*S, w*S + S + 1): the model reads
its first S and predicts its last S. Windows are taken in order 0, 1, 2, ... up to the split's
end, or fewer when `max_tokens` is given (rounded up to whole windows). So two runs, on any
machine, score the same tokens. Under torchrun rank r takes windows r, r + R, r + 2R, ...; the
per-position sums, token and byte counts are all-reduced (float64), so the result is the
single-process one up to summation order.

Positions: target position t (0-based) is the token predicted from the t + 1 tokens before it
in its window. Buckets group target positions [start, end); the default edges are 0, 128, 512,
2048, 8192, ... (×4), cut at S: buckets 0-127, 128-511, 512-2047, ... Every window contributes
to every position, so each bucket's loss is a mean over (end - start) × windows tokens, and the
token-weighted mean of the buckets is the overall loss.

Bits per byte: loss / ln 2 × tokens / bytes, where bytes are those of the decoded target text of
each window with the tokenizer the data was prepared with, BOS/EOS counting zero bytes — the
trainer's val_bpb uses the same `target_bytes`. None when that tokenizer cannot be loaded.

Limits on S: learned positions stop at block_size; RoPE was trained up to block_size, so longer
windows are refused unless `rope_scaling` covers them (factor × original_max_position_embeddings,
the latter defaulting to block_size). `--set block_size=N` on the command line lifts the limit on
purpose (to measure untrained RoPE extrapolation).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from scalelab.errors import UserError

# A text that exercises letters, digits, whitespace, punctuation and multi-byte characters: two
# tokenizers that encode it to the same ids (with the same vocabulary and EOS) are taken to be one.
TOKENIZER_PROBE = ("The quick brown fox, 1234567890 times: \"jumps\" over\tthe lazy dog.\n\n"
                   "KING RICHARD III. — Now is the winter of our discontent; café naïve Straße 東京 ✓\n")


@dataclass
class PositionBucket:
    """Target positions [start, end) of every window: how many tokens, their mean loss (nats)."""

    start: int
    end: int
    tokens: int
    loss: float


@dataclass
class EvalResult:
    loss: float  # mean nats per target token
    perplexity: float
    bits_per_byte: float | None  # None when the data's byte count is unknown
    tokens: int
    seq_len: int
    buckets: list[PositionBucket]
    windows: int = 0
    bytes: int | None = None
    split: str = "val"
    position_loss: list[float] = field(default_factory=list, repr=False)  # mean loss at each target position

    def to_dict(self, *, positions: bool = False) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not positions:
            d.pop("position_loss")
        return d


# ---- checks -----------------------------------------------------------------------------------

def max_positions(cfg) -> tuple[int, str]:
    """(the longest window the model can be evaluated at, why) from its ModelConfig."""
    if cfg.position_encoding == "learned":
        return cfg.block_size, f"the model has learned position embeddings for {cfg.block_size} positions (block_size)"
    scaling = cfg.rope_scaling
    if not scaling:
        return cfg.block_size, (f"the model's RoPE was trained up to block_size {cfg.block_size} and has no "
                                "rope_scaling to extend it")
    original = int(scaling.get("original_max_position_embeddings") or cfg.block_size)
    covered = int(float(scaling["factor"]) * original)
    kind = scaling.get("type", scaling.get("rope_type"))
    if covered <= cfg.block_size:
        return cfg.block_size, f"the model's block_size is {cfg.block_size} (its {kind} rope_scaling covers {covered})"
    return covered, (f"the model's {kind} rope_scaling covers factor {float(scaling['factor']):g} × {original} "
                     f"= {covered} positions")


def check_seq_len(cfg, seq_len: int) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise UserError(f"--seq-len {seq_len} must be a positive integer")
    limit, why = max_positions(cfg)
    if seq_len <= limit:
        return
    if cfg.position_encoding == "learned":
        raise UserError(f"--seq-len {seq_len} is longer than the model can read: {why}; use --seq-len {limit} "
                        "or less")
    raise UserError(f"--seq-len {seq_len} is past the model's positions: {why}; use --seq-len {limit} or less, "
                    "extend the context with rope_scaling (e.g. --set 'rope_scaling={type=\"yarn\", "
                    f"factor={math.ceil(seq_len / cfg.block_size)}}}'), or --set block_size={seq_len} to "
                    "measure RoPE extrapolated untrained")


def default_buckets(seq_len: int) -> list[int]:
    """Bucket edges 0, 128, 512, 2048, ... (×4) below seq_len, then seq_len."""
    edges, e = [0], 128
    while e < seq_len:
        edges.append(e)
        e *= 4
    return edges + [seq_len]


def bucket_edges(buckets: Sequence[int] | None, seq_len: int) -> list[int]:
    """Edges [0, ..., seq_len] from inner edges given by the user (or the default)."""
    if buckets is None:
        return default_buckets(seq_len)
    inner = sorted({int(b) for b in buckets} - {0, seq_len})
    bad = [b for b in inner if not 0 < b < seq_len]
    if bad:
        raise UserError(f"--buckets {bad[0]} is outside the target positions 1..{seq_len - 1} of a window of "
                        f"{seq_len}")
    return [0, *inner, seq_len]


def check_tokenizer(model_tokenizer, data_tok, data_dir: Path, meta: dict) -> None:
    """UserError when the data was prepared with another tokenizer than the model's: the same
    recorded kind and files hash, or else the same vocabulary, EOS and ids for TOKENIZER_PROBE.
    `data_tok`: the data's tokenizer (`data_tokenizer`), or None when it cannot be read."""
    if model_tokenizer is None:
        return
    recorded = meta["tokenizer"]
    try:
        if (model_tokenizer.kind == recorded.get("kind") and
                model_tokenizer.files_sha256() == recorded.get("sha256")):
            return
    except OSError:
        pass
    if data_tok is None:
        return  # nothing to compare with; the vocabulary check still runs
    same = (data_tok.vocab_size == model_tokenizer.vocab_size and data_tok.eos_id == model_tokenizer.eos_id
            and data_tok.encode(TOKENIZER_PROBE) == model_tokenizer.encode(TOKENIZER_PROBE))
    if not same:
        raise UserError(f"{data_dir} was prepared with tokenizer {recorded.get('spec')} (vocab {data_tok.vocab_size}), "
                        f"not the model's ({model_tokenizer.spec}, vocab {model_tokenizer.vocab_size}): the token "
                        "ids mean different text; prepare the data again with the model's tokenizer "
                        "(scalelab prepare --tokenizer ...)")


def check_vocab(cfg, data_dir: Path, meta: dict, split: str) -> None:
    """The data's vocabulary, and every id in the split's shards, must fit the model's."""
    from scalelab.data.loader import check_token_ids

    if meta["vocab_size"] > cfg.vocab_size:
        raise UserError(f"{data_dir} was prepared with tokenizer {meta['tokenizer'].get('spec')} of vocab "
                        f"{meta['vocab_size']}, larger than the model's vocab_size {cfg.vocab_size}: it is not the "
                        "model's tokenizer; prepare the data again with the model's tokenizer")
    check_token_ids(data_dir, {**meta, "splits": {split: meta["splits"][split]}}, cfg.vocab_size, "the model's")


def data_tokenizer(loader):
    """The tokenizer the data was prepared with (TokenLoader.tokenizer: its copy in DATA/tokenizer),
    or None if unreadable."""
    try:
        return loader.tokenizer()
    except (UserError, OSError, ValueError, KeyError):
        return None


def target_bytes(tokenizer, targets: np.ndarray) -> int:
    """UTF-8 bytes of the text of each row of `targets` (B, S), decoded row by row; BOS/EOS count zero."""
    rows = np.asarray(targets)
    keep = (rows != tokenizer.bos_id) & (rows != tokenizer.eos_id)
    return sum(len(tokenizer.decode(row[mask].tolist()).encode("utf-8")) for row, mask in zip(rows, keep))


# ---- evaluation -------------------------------------------------------------------------------

def num_windows_for(max_tokens: int | None, available: int, seq_len: int) -> int:
    if max_tokens is None:
        return available
    if isinstance(max_tokens, bool) or max_tokens < 1:
        raise UserError(f"--tokens {max_tokens} must be at least 1 (or omit it to evaluate the whole split)")
    return min(available, math.ceil(max_tokens / seq_len))


@torch.no_grad()
def evaluate(model: torch.nn.Module, data_dir: str | os.PathLike, *, split: str = "val", seq_len: int | None = None,
             max_tokens: int | None = None, batch_size: int = 8, buckets: Sequence[int] | None = None,
             device: str | torch.device | None = None, progress: bool = True, dist=None,
             tokenizer=None) -> EvalResult:
    """Score `model` (a scalelab Transformer) on the split's windows (see the module docstring).

    `tokenizer`: the model's tokenizer, when known, checked against the data's. `dist`: a
    scalelab.train.parallel.Dist under torchrun (each rank holds the whole model and scores its
    share of windows); None for one process. `device`: where to run (the model is moved there;
    default: the Dist's device, else the model's)."""
    from scalelab.data.loader import TokenLoader
    from scalelab.train.parallel import Dist, all_reduce_sum

    cfg = model.config
    seq_len = cfg.block_size if seq_len is None else seq_len
    check_seq_len(cfg, seq_len)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be a positive integer")
    edges = bucket_edges(buckets, seq_len)
    d = dist or Dist(device=torch.device(device) if device is not None else next(model.parameters()).device)
    device = d.device if device is None else torch.device(device)
    model.to(device)
    data_dir = Path(data_dir)
    loader = TokenLoader(data_dir, split, seq_len=seq_len, micro_batch_size=1)
    meta = loader.metadata
    check_vocab(cfg, data_dir, meta, split)
    data_tok = data_tokenizer(loader)
    check_tokenizer(tokenizer, data_tok, data_dir, meta)
    windows = num_windows_for(max_tokens, loader.num_windows, seq_len)
    mine = list(range(d.rank, windows, d.world_size))

    model.eval()
    position_sum = torch.zeros(seq_len, dtype=torch.float64)  # on the CPU: MPS has no float64
    n_bytes, bytes_known = 0, data_tok is not None
    bar = _progress_bar(windows * seq_len, progress and d.is_main)
    try:
        for i in range(0, len(mine), batch_size):
            chunk = mine[i:i + batch_size]
            buf = np.stack([loader.read(w * seq_len, seq_len + 1) for w in chunk])
            x = torch.from_numpy(buf[:, :-1]).to(device)
            y = torch.from_numpy(buf[:, 1:]).to(device)
            position_sum += position_losses(model, x, y).sum(0).cpu().double()
            if bytes_known:
                try:
                    n_bytes += target_bytes(data_tok, buf[:, 1:])
                except (ValueError, UnicodeError):
                    bytes_known = False
            if bar is not None:
                bar.update(len(chunk) * seq_len * d.world_size)
    finally:
        if bar is not None:
            bar.close()
    sums = all_reduce_sum([*position_sum.tolist(), float(n_bytes), 0.0 if bytes_known else 1.0], d)
    per_position = np.array(sums[:seq_len]) / windows
    total_bytes = int(sums[seq_len]) if sums[seq_len + 1] == 0 and sums[seq_len] > 0 else None
    tokens = windows * seq_len
    loss = float(per_position.mean())
    bpb = None if total_bytes is None else loss * tokens / (math.log(2) * total_bytes)
    result_buckets = [PositionBucket(start=a, end=b, tokens=(b - a) * windows, loss=float(per_position[a:b].mean()))
                      for a, b in zip(edges[:-1], edges[1:])]
    return EvalResult(loss=loss, perplexity=math.exp(loss) if loss < 700 else math.inf, bits_per_byte=bpb,
                      tokens=tokens, seq_len=seq_len, buckets=result_buckets, windows=windows, bytes=total_bytes,
                      split=split, position_loss=per_position.tolist())


LOGIT_CHUNK_ELEMENTS = 1 << 28  # float32 logits computed at once: 1 GiB, whatever the batch and vocabulary


def position_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (nats, float32) of each target: (B, S).

    The model runs without its lm_head (swapped for an identity for the call, so the forward is
    the model's own), giving the final hidden states; the logits are then computed a chunk of
    positions at a time, at most LOGIT_CHUNK_ELEMENTS floats: a 128K-token window of a 128K-vocab
    model would otherwise need 64 GiB of float32 logits."""
    head = model.lm_head
    model.lm_head = torch.nn.Identity()
    try:
        hidden = model(x)
    finally:
        model.lm_head = head
    hidden, targets = hidden.reshape(-1, hidden.size(-1)), y.reshape(-1)
    rows = max(1, LOGIT_CHUNK_ELEMENTS // head.out_features)
    losses = torch.empty(targets.numel(), dtype=torch.float32, device=hidden.device)
    for i in range(0, targets.numel(), rows):
        logits = head(hidden[i:i + rows]).float()
        losses[i:i + rows] = F.cross_entropy(logits, targets[i:i + rows], reduction="none")
    return losses.view(y.shape)


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc="eval", file=sys.stderr, mininterval=0.5,
                dynamic_ncols=True)


# ---- loading ----------------------------------------------------------------------------------

def load_eval_model(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    overrides: Iterable[str] = ()):
    """(model, tokenizer or None) from a run directory (its newest intact checkpoint), a trainer
    checkpoint, a native checkpoint directory (model.safetensors + model.toml, e.g. RUN/final) or a
    Hugging Face directory (config.json + safetensors, imported on the fly). `overrides` are
    `--set FIELD=VALUE` strings applied to the model's config (e.g. rope_scaling, block_size)."""
    from scalelab.train.checkpoint import load_model_for_inference

    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such model; give a run directory, a checkpoint or a Hugging Face directory "
                        "(config.json + model.safetensors)")
    if not p.is_dir():
        raise UserError(f"{p} is a file; give a run directory, a checkpoint or a Hugging Face directory")
    try:
        model = load_model_for_inference(p, device=device, dtype=dtype)
    except UserError as e:
        if (p / "config.json").exists():
            raise
        raise UserError(f"{e}; or give a Hugging Face directory (config.json + model.safetensors)") from None
    overrides = list(overrides)
    if overrides:
        model = with_config_overrides(model, overrides)
    return model, model_tokenizer(p)


def with_config_overrides(model: torch.nn.Module, overrides: Sequence[str]) -> torch.nn.Module:
    """The same weights in a Transformer built from the overridden config (RoPE frequencies are
    derived from the config when a model is built)."""
    from scalelab.model import Transformer

    cfg = model.config.with_overrides(overrides)
    if cfg == model.config:
        return model
    with torch.device("meta"):
        new = Transformer(cfg, attention=model.attention)
    try:
        new.load_state_dict(model.state_dict(), strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"--set {' '.join(overrides)}: the checkpoint's weights do not fit the changed model "
                        f"({first}); change only fields that keep the weights' shapes (rope_scaling, rope_theta, "
                        "block_size for RoPE models)") from None
    new.tie_weights()
    return new.eval()


def model_tokenizer(path: Path):
    """The tokenizer that belongs to the model at `path`: a Hugging Face directory's own
    tokenizer.json, else the copy a training run keeps (data.json + tokenizer/ in the directory or a
    parent); None when there is none or it cannot be read (said on stderr: the data is then checked
    against the model's vocabulary only)."""
    from scalelab import hf
    from scalelab.data.tokenizer import HFTokenizer, find_run_tokenizer

    hugging_face = (path / "config.json").is_file() and hf.native_config(path) is None
    try:
        if hugging_face:
            return HFTokenizer(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else None
        return find_run_tokenizer(path)
    except (UserError, ValueError, OSError) as e:
        print(f"scalelab eval: warning: cannot read the model's tokenizer ({e}); the data is checked against the "
              "model's vocabulary only", file=sys.stderr)
        return None


def trained_seq_len(path: str | os.PathLike) -> int | None:
    """train.seq_len of the run that `path` belongs to (a run directory, RUN/final or a checkpoint
    under RUN/checkpoints), or None."""
    import tomllib

    from scalelab.train.trainer import enclosing_run_dir

    run_dir = enclosing_run_dir(Path(path).resolve())
    if run_dir is None:
        return None
    try:
        value = tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))["train"]["seq_len"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
