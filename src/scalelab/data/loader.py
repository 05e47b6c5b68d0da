"""Read prepared token shards by memory map and serve deterministic (x, y) batches.

Windows. A split's shards are one virtual token stream (shard boundaries are invisible). Window
w covers tokens [w*S, w*S + S + 1) for S = seq_len: x is its first S tokens, y its last S. There
are (num_tokens - 1) // S windows; they may span document boundaries (documents are separated
by EOS, which the model learns to predict) and shard boundaries.

Order. Micro-batch g (global, counted over all ranks) holds the sequences g*B + b, b < B; the
k-th sequence overall is window perm_e(k mod W) of epoch e = k // W, where perm_e is a seeded
pseudo-random permutation of range(W) computed index by index (a Feistel network with cycle
walking), so nothing of size W is ever materialised and every epoch visits every window once.
For (step, micro_step, rank): g = step * grad_accum_steps * world_size + micro_step * world_size
+ rank. Ranks never overlap, and (world 2, accum 1) sees exactly what (world 1, accum 2) sees.

`get_batch` is stateless; the loader only remembers the next step (for `state_dict`), which is
the step after the last one whose final micro-batch was served.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.errors import UserError

FORMAT_VERSION = 1
META_NAME = "meta.json"
_MASK64 = (1 << 64) - 1
MAX_OPEN_SHARDS = 64


# ----------------------------------------------------------------------------- metadata

def read_metadata(data_dir: str | os.PathLike, *, check_tokenizer_hash: bool = True) -> dict:
    """Load and validate DIR/meta.json against the shards and tokenizer files beside it."""
    d = Path(data_dir)
    path = d / META_NAME
    if d.exists() and not d.is_dir():
        raise UserError(f"{d} is a file, not a prepared data directory (the directory `scalelab prepare --out` wrote)")
    if not d.is_dir():
        raise UserError(f"data directory {d} does not exist; create it with `scalelab prepare`")
    if not path.is_file():
        raise UserError(f"{d} has no {META_NAME} (not prepared, or prepare was interrupted); run `scalelab prepare --out {d}`")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); re-run `scalelab prepare`") from None

    def bad(msg: str) -> UserError:
        return UserError(f"{path}: {msg}; re-run `scalelab prepare --overwrite --out {d}`")

    if not isinstance(meta, dict):
        raise bad("expected a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise bad(f"format_version {meta.get('format_version')!r} is not {FORMAT_VERSION}")
    vocab, dtype = meta.get("vocab_size"), meta.get("dtype")
    if not isinstance(vocab, int) or vocab < 2:
        raise bad(f"vocab_size {vocab!r} is not a positive integer")
    if dtype not in ("uint16", "uint32"):
        raise bad(f"dtype {dtype!r} is not uint16 or uint32")
    if vocab > np.iinfo(dtype).max + 1:
        raise bad(f"vocab_size {vocab} does not fit dtype {dtype}")
    for key in ("bos_id", "eos_id"):
        if not isinstance(meta.get(key), int) or not 0 <= meta[key] < vocab:
            raise bad(f"{key} {meta.get(key)!r} is outside the vocabulary of {vocab}")
    splits = meta.get("splits")
    if not isinstance(splits, dict) or "train" not in splits:
        raise bad("no splits.train")
    itemsize = np.dtype(dtype).itemsize
    for name, split in splits.items():
        try:
            shards = split["shards"]
            if not all(isinstance(s, dict) and isinstance(s.get("file"), str) for s in shards):
                raise TypeError
            total = sum(int(s["tokens"]) for s in shards)
            if total != int(split["tokens"]) or int(split["documents"]) < 0:
                raise bad(f"split {name}: shard token counts sum to {total}, not {split['tokens']}")
        except (KeyError, TypeError, ValueError):
            raise bad(f"split {name} lacks tokens/documents/shards (each shard a file name and a token count)") from None
        for s in shards:
            f = d / s["file"]
            if Path(s["file"]).name != s["file"] or not f.is_file():
                raise bad(f"shard {s['file']} is missing")
            if f.stat().st_size != int(s["tokens"]) * itemsize:
                raise bad(f"shard {s['file']} is {f.stat().st_size} bytes, expected {int(s['tokens']) * itemsize}")
            if "max_id" in s:
                if isinstance(s["max_id"], bool) or not isinstance(s["max_id"], int) or s["max_id"] < -1:
                    raise bad(f"shard {s['file']} has max_id {s['max_id']!r}, not a token id")
                if s["max_id"] >= vocab:
                    raise UserError(_id_outside(f, s["max_id"], vocab, "the data's tokenizer"))
    tok = meta.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("saved_spec"), str):
        raise bad("no tokenizer section")
    if not isinstance(tok.get("kind", ""), str) or not isinstance(tok.get("files", []), list) or \
            not all(isinstance(f, str) for f in tok.get("files", [])):
        raise bad("tokenizer.kind must be a name and tokenizer.files a list of file names")
    if check_tokenizer_hash:
        from scalelab.data.tokenizer import files_sha256

        files = [d / f for f in tok.get("files", [])]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise bad(f"tokenizer file {missing[0]} is missing")
        if files_sha256(tok.get("kind", ""), files) != tok.get("sha256"):
            raise bad("the tokenizer files do not match the sha256 recorded when the data was prepared")
    return meta


def _id_outside(shard: Path, token_id: int, vocab: int, whose: str) -> str:
    return (f"{shard} holds token id {token_id}, outside {whose} vocabulary of {vocab} (ids 0..{vocab - 1}); "
            "re-prepare the data with the model's tokenizer (or raise the model's vocab_size)")


def shard_max_id(path: str | os.PathLike, dtype: str) -> int:
    """The largest token id in a shard file (-1 if it is empty), by one pass over its memmap."""
    tokens = np.memmap(path, dtype=dtype, mode="r") if os.path.getsize(path) else np.zeros(0, dtype)
    return int(tokens.max()) if tokens.size else -1


def check_token_ids(data_dir: str | os.PathLike, meta: dict, vocab_size: int, whose: str) -> None:
    """Raise a one-line UserError naming the first shard holding a token id >= vocab_size.

    Uses each shard's `max_id` from meta.json (recorded by prepare); for data prepared before
    that was recorded, computes it once over the memmap and stores it in `meta` (in memory)."""
    for split in meta["splits"].values():
        for s in split["shards"]:
            if "max_id" not in s:
                s["max_id"] = shard_max_id(Path(data_dir) / s["file"], meta["dtype"])
            if s["max_id"] >= vocab_size:
                raise UserError(_id_outside(Path(data_dir) / s["file"], s["max_id"], vocab_size, whose))


# ----------------------------------------------------------------------------- permutation

def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(index: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """A keyed bijection of range(n), evaluated at `index` (values in [0, n)).

    A balanced Feistel network over the smallest even number of bits covering n, with cycle
    walking: re-apply until the value lands below n. The domain is < 4n, so that takes a few
    iterations on average.
    """
    index = np.asarray(index, dtype=np.uint64)
    if n <= 1:
        return np.zeros_like(index)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = [np.uint64((key * 0x9E3779B97F4A7C15 + r * 0xD1B54A32D192ED03 + 1) & _MASK64) for r in range(rounds)]

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << np.uint64(half)) | right

    out = feistel(index)
    todo = out >= np.uint64(n)
    while todo.any():
        out[todo] = feistel(out[todo])
        todo = out >= np.uint64(n)
    return out


def _epoch_key(seed: int, epoch: int) -> int:
    x = np.array([(seed * 0x2545F4914F6CDD1D + epoch * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64], dtype=np.uint64)
    return int(_mix64(x)[0])


# ----------------------------------------------------------------------------- loader

class TokenLoader:
    """Deterministic (B, S) batches from a prepared data directory (see the module docstring)."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", *, seq_len: int, micro_batch_size: int,
                 grad_accum_steps: int = 1, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        for name, v in (("seq_len", seq_len), ("micro_batch_size", micro_batch_size),
                        ("grad_accum_steps", grad_accum_steps), ("world_size", world_size)):
            if int(v) < 1:
                raise UserError(f"{name} must be a positive integer, got {v}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        self.data_dir = Path(data_dir)
        self.metadata = read_metadata(self.data_dir)
        if split not in self.metadata["splits"]:
            raise UserError(f"{self.data_dir} has no split {split!r}; it has {', '.join(self.metadata['splits'])}")
        self.split = split
        self.seq_len, self.micro_batch_size = int(seq_len), int(micro_batch_size)
        self.grad_accum_steps, self.rank, self.world_size = int(grad_accum_steps), int(rank), int(world_size)
        self.seed = int(seed)
        self.step = 0
        self.vocab_size: int = self.metadata["vocab_size"]
        self.dtype = np.dtype(self.metadata["dtype"])
        shards = [s for s in self.metadata["splits"][split]["shards"] if int(s["tokens"]) > 0]
        self._shard_files = [self.data_dir / s["file"] for s in shards]
        self._starts = np.cumsum([0] + [int(s["tokens"]) for s in shards])
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()  # an LRU: each map holds a file descriptor
        self.num_tokens = int(self._starts[-1])
        self.num_windows = (self.num_tokens - 1) // self.seq_len if self.num_tokens > 0 else 0
        if self.num_windows < 1:
            raise UserError(
                f"split {split!r} of {self.data_dir} has {self.num_tokens} tokens, fewer than seq_len + 1 = "
                f"{self.seq_len + 1}; prepare more data (or a larger --val-fraction) or lower seq_len"
            )

    # -- reading

    def _map(self, i: int) -> np.memmap:
        m = self._maps.get(i)
        if m is None:
            m = self._maps[i] = np.memmap(self._shard_files[i], dtype=self.dtype, mode="r")
            if len(self._maps) > MAX_OPEN_SHARDS:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(i)
        return m

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the split's stream as int64, across shards."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside [0, {self.num_tokens})")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = 0
        while pos < length:
            local = start + pos - int(self._starts[i])
            n = min(length - pos, int(self._starts[i + 1]) - (start + pos))
            out[pos:pos + n] = self._map(i)[local:local + n]
            pos += n
            i += 1
        return out

    def window_indices(self, step: int, micro_step: int) -> np.ndarray:
        """The window ids of the B sequences served at (step, micro_step) to this rank."""
        if not 0 <= micro_step < self.grad_accum_steps:
            raise ValueError(f"micro_step {micro_step} outside [0, {self.grad_accum_steps})")
        if step < 0:
            raise ValueError(f"step {step} is negative")
        g = step * self.grad_accum_steps * self.world_size + micro_step * self.world_size + self.rank
        k = g * self.micro_batch_size + np.arange(self.micro_batch_size, dtype=np.int64)
        epochs, pos = np.divmod(k, self.num_windows)
        out = np.empty_like(pos)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = permute(pos[sel], self.num_windows, _epoch_key(self.seed, int(e))).astype(np.int64)
        return out

    def get_batch(self, step: int, micro_step: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(x, y), int64 arrays of shape (micro_batch_size, seq_len); y is x shifted by one."""
        windows = self.window_indices(step, micro_step)
        S = self.seq_len
        buf = np.stack([self.read(int(w) * S, S + 1) for w in windows])
        if micro_step == self.grad_accum_steps - 1:
            self.step = step + 1
        return np.ascontiguousarray(buf[:, :-1]), np.ascontiguousarray(buf[:, 1:])

    # -- state

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "step": self.step, "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size, "grad_accum_steps": self.grad_accum_steps,
            "world_size": self.world_size, "num_tokens": self.num_tokens, "split": self.split,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state['step']`. The data and the sequences per step must match; the split of
        those sequences into ranks x micro-steps may change (the global index is the same)."""
        mine = self.state_dict()
        for key in ("seq_len", "micro_batch_size", "num_tokens", "split"):
            if key in state and state[key] != mine[key]:
                raise UserError(f"cannot resume the data loader: checkpoint has {key}={state[key]!r}, "
                                f"this run has {mine[key]!r}; use the same data and batch shape")
        old = state.get("grad_accum_steps", 1) * state.get("world_size", 1)
        if old != self.grad_accum_steps * self.world_size:
            raise UserError(f"cannot resume the data loader: grad_accum_steps x world_size was {old}, now "
                            f"{self.grad_accum_steps * self.world_size}; keep the global batch the same")
        self.seed = int(state["seed"])
        self.step = int(state["step"])

    # -- checks

    def check_vocab(self, model_vocab_size: int) -> None:
        """Refuse data whose tokenizer, or any token id in any split's shards, does not fit the
        model's embedding (which would be an IndexError in the middle of training)."""
        if self.vocab_size > model_vocab_size:
            tok = self.metadata["tokenizer"]["spec"]
            raise UserError(
                f"the data in {self.data_dir} uses tokenizer {tok} with vocab {self.vocab_size}, larger than the "
                f"model's vocab_size {model_vocab_size}; set model vocab_size >= {self.vocab_size} or re-prepare the data"
            )
        check_token_ids(self.data_dir, self.metadata, model_vocab_size, "the model's")

    def tokenizer(self):
        from scalelab.data.tokenizer import load_saved_tokenizer

        return load_saved_tokenizer(self.data_dir / "tokenizer", self.metadata["tokenizer"]["saved_spec"])

    def __repr__(self) -> str:
        return (f"<TokenLoader {self.data_dir} split={self.split} tokens={self.num_tokens:,} "
                f"windows={self.num_windows:,} S={self.seq_len} B={self.micro_batch_size}>")
