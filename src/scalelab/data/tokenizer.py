"""Tokenizers behind one small interface: `load_tokenizer(spec) -> Tokenizer`.

Specs:
  byte            256 byte values, then BOS = 256 and EOS = 257 (vocab 258); always available.
  hf:PATH         a Hugging Face `tokenizer.json` (the file or its directory), e.g. one made by
                  `scalelab tokenizer train`. `bpe:PATH` is an alias.
  tiktoken:PATH   a tiktoken rank file (base64 token + rank per line) such as LLaMA 3's
                  `tokenizer.model`, with LLaMA 3's pre-tokenisation pattern and its 256 special
                  tokens numbered from the end of the ranks (128000..128255 for LLaMA 3).
  gpt2            GPT-2's 50257-token BPE via tiktoken, when its files can be downloaded or are
                  cached (TIKTOKEN_CACHE_DIR); offline and uncached it is a UserError.

Special tokens: `encode(text)` treats text that *looks* like a special token
("<|end_of_text|>") as ordinary text, so a document can never inject one; BOS/EOS enter only
through `bos=True` / `eos=True`. `decode` renders special ids as their names, so
`decode(encode(t)) == t` for any string t and `decode(encode(t, bos=True, eos=True))` is
`BOS_NAME + t + EOS_NAME`.

The heavy libraries (tokenizers, tiktoken) are imported lazily by the backends that need them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from scalelab.errors import UserError

# LLaMA 3's pre-tokenisation regex, verbatim from Meta's llama3 `tokenizer.py`.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_RESERVED_SPECIAL_TOKENS = 256


def llama3_special_tokens() -> list[str]:
    """LLaMA 3's 256 special tokens in id order (Meta's llama3 `tokenizer.py`)."""
    n = LLAMA3_NUM_RESERVED_SPECIAL_TOKENS
    return [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|reserved_special_token_2|>",
        "<|reserved_special_token_3|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|reserved_special_token_4|>",
        "<|eot_id|>",  # end of turn
    ] + [f"<|reserved_special_token_{i}|>" for i in range(5, n - 5)]


# Special-token names we recognise in an arbitrary tokenizer.json, most specific first.
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>", "<|bos|>", "[CLS]")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>", "<|eos|>", "[SEP]")


class Tokenizer:
    """The interface every backend implements.

    Attributes: `spec` (how to load it again), `kind` ("byte", "hf", "tiktoken", "gpt2"),
    `vocab_size`, `bos_id`, `eos_id`, `files` (the files it was loaded from; copied next to
    prepared data and hashed into its metadata).
    """

    spec: str
    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    files: tuple[Path, ...] = ()

    def _encode_ordinary(self, text: str) -> list[int]:
        raise NotImplementedError

    def _encode_ordinary_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._encode_ordinary(t) for t in texts]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._encode_ordinary(text)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        out = self._encode_ordinary_batch(list(texts))
        for ids in out:
            if bos:
                ids.insert(0, self.bos_id)
            if eos:
                ids.append(self.eos_id)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def files_sha256(self) -> str:
        """sha256 over the backend kind and the name + bytes of each tokenizer file."""
        return files_sha256(self.kind, self.files)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec} vocab={self.vocab_size} bos={self.bos_id} eos={self.eos_id}>"


def files_sha256(kind: str, files: Iterable[os.PathLike | str]) -> str:
    h = hashlib.sha256(kind.encode())
    for f in sorted(Path(p) for p in files):
        h.update(b"\0" + f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255; BOS = 256, EOS = 257."""

    kind = "byte"
    BOS_NAME, EOS_NAME = "<|bos|>", "<|eos|>"

    def __init__(self) -> None:
        self.spec = "byte"
        self.vocab_size = 258
        self.bos_id, self.eos_id = 256, 257
        self.files = ()

    def _encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            if i == self.bos_id:
                out.append(self.BOS_NAME)
            elif i == self.eos_id:
                out.append(self.EOS_NAME)
            else:
                raise ValueError(f"id {i} is outside the byte tokenizer's vocabulary of {self.vocab_size}")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json (byte-level BPE for the ones we train)."""

    kind = "hf"

    def __init__(self, path: str | os.PathLike) -> None:
        from tokenizers import Tokenizer as _HF

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"no tokenizer.json at {path}; give hf:FILE_OR_DIR of a Hugging Face tokenizer")
        try:
            self._tok = _HF.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise UserError(f"{path} is not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        # Text that spells a special token is encoded as text, never as the special id. That
        # mode is ~1.4x slower, so a second instance uses it only for texts that need it.
        self._literal = _HF.from_file(str(path))
        self._literal.encode_special_tokens = True
        self._specials = [t.content for t in self._tok.get_added_tokens_decoder().values()]
        self.spec = f"hf:{path}"
        self.files = (path,)
        # ids may have holes: the embedding must cover the largest id
        vocab = self._tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise UserError(f"{path} has an empty vocabulary; train it first (`scalelab tokenizer train`)")
        self.vocab_size = max(vocab.values()) + 1
        self.bos_id, self.eos_id = self._find_bos_eos(path)

    def _find_bos_eos(self, path: Path) -> tuple[int, int]:
        names: dict[str, str] = {}
        config = path.parent / "tokenizer_config.json"
        if config.is_file():
            try:
                cfg = json.loads(config.read_text())
                for key in ("bos_token", "eos_token"):
                    val = cfg.get(key)
                    if isinstance(val, dict):
                        val = val.get("content")
                    if isinstance(val, str) and self._tok.token_to_id(val) is not None:
                        names[key] = val
            except (OSError, ValueError):
                pass
        vocab_names = [t for t in _EOS_NAMES + _BOS_NAMES if self._tok.token_to_id(t) is not None]
        eos = names.get("eos_token") or next((t for t in _EOS_NAMES if t in vocab_names), None)
        bos = names.get("bos_token") or next((t for t in _BOS_NAMES if t in vocab_names), None)
        if eos is None:
            raise UserError(
                f"{path} has no end-of-text token (looked for {', '.join(_EOS_NAMES)}); "
                "add one as a special token or train one with `scalelab tokenizer train`"
            )
        if bos is None:  # GPT-2 style: one <|endoftext|> serves as both
            bos = eos
        return self._tok.token_to_id(bos), self._tok.token_to_id(eos)

    def _needs_literal(self, text: str) -> bool:
        return any(s in text for s in self._specials)

    @staticmethod
    def _batch(tok, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.21) skips character offsets: about 2x faster.
        fast = getattr(tok, "encode_batch_fast", None) or tok.encode_batch
        return [e.ids for e in fast(texts, add_special_tokens=False)]

    def _encode_ordinary(self, text: str) -> list[int]:
        return self._encode_ordinary_batch([text])[0]

    def _encode_ordinary_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        literal = [self._needs_literal(t) for t in texts]
        if not any(literal):
            return self._batch(self._tok, texts)
        return [self._batch(self._literal if lit else self._tok, [t])[0] for t, lit in zip(texts, literal)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE (rank file + regex + special tokens)."""

    def __init__(self, *, kind: str, spec: str, name: str, ranks: dict[bytes, int], pattern: str,
                 special_tokens: dict[str, int], bos: str, eos: str, files: Sequence[Path]) -> None:
        import tiktoken

        self.kind, self.spec, self.files = kind, spec, tuple(files)
        self.encoding = tiktoken.Encoding(
            name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens
        )
        self.vocab_size = self.encoding.n_vocab
        self.bos_id, self.eos_id = special_tokens[bos], special_tokens[eos]

    def _encode_ordinary(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def _encode_ordinary_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_ordinary_batch fans out over threads; the Rust core releases the GIL.
        return self.encoding.encode_ordinary_batch(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode([int(i) for i in ids], errors="replace")


def read_rank_file(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken rank file (`base64token rank` per line) with a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no tiktoken rank file at {path}; give tiktoken:PATH of e.g. LLaMA 3's tokenizer.model")
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise UserError(
                    f"{path}:{lineno} is not `base64token rank`; is this a tiktoken rank file?"
                ) from None
    if len(ranks) < 256 or set(ranks.values()) != set(range(len(ranks))):
        raise UserError(f"{path}: ranks must be 0..N-1 with no gaps and cover all 256 bytes; got {len(ranks)} tokens")
    return ranks


def write_rank_file(path: str | os.PathLike, ranks: dict[bytes, int]) -> None:
    from scalelab.files import atomic_write_text

    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    atomic_write_text(path, "\n".join(lines) + "\n")


def llama3_tiktoken(path: str | os.PathLike) -> TiktokenTokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.model"
    ranks = read_rank_file(path)
    n = len(ranks)
    specials = {tok: n + i for i, tok in enumerate(llama3_special_tokens())}
    return TiktokenTokenizer(
        kind="tiktoken", spec=f"tiktoken:{path}", name=path.stem, ranks=ranks, pattern=LLAMA3_PATTERN,
        special_tokens=specials, bos="<|begin_of_text|>", eos="<|end_of_text|>", files=[path],
    )


def _gpt2_pattern() -> str:
    from tiktoken_ext.openai_public import r50k_pat_str

    return r50k_pat_str


def gpt2_from_rank_file(path: str | os.PathLike) -> TiktokenTokenizer:
    """GPT-2 from a rank file we wrote (the copy kept beside prepared data)."""
    path = Path(path)
    ranks = read_rank_file(path)
    return TiktokenTokenizer(
        kind="gpt2", spec=f"gpt2:{path}", name="gpt2", ranks=ranks, pattern=_gpt2_pattern(),
        special_tokens={"<|endoftext|>": len(ranks)}, bos="<|endoftext|>", eos="<|endoftext|>", files=[path],
    )


def gpt2_tiktoken() -> TiktokenTokenizer:
    """GPT-2 via tiktoken's registry: downloads once into tiktoken's cache."""
    import tiktoken

    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests.ConnectionError, HTTPError, OSError, ...
        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or "the tiktoken cache"
        raise UserError(
            f"the gpt2 tokenizer files are not in {cache} and could not be downloaded "
            f"({type(e).__name__}; offline?); copy a tiktoken cache there (TIKTOKEN_CACHE_DIR) "
            "or use --tokenizer byte, hf:PATH or tiktoken:PATH"
        ) from None
    tok = TiktokenTokenizer.__new__(TiktokenTokenizer)
    tok.kind, tok.spec, tok.files = "gpt2", "gpt2", ()
    tok.encoding = enc
    tok.vocab_size = enc.n_vocab
    tok.bos_id = tok.eos_id = enc.eot_token
    return tok


def load_tokenizer(spec: str) -> Tokenizer:
    """Load a tokenizer from its spec string (see the module docstring)."""
    spec = str(spec)
    kind, _, arg = spec.partition(":")
    if spec == "byte":
        return ByteTokenizer()
    if spec == "gpt2":
        return gpt2_tiktoken()
    if kind in ("hf", "bpe") and arg:
        return HFTokenizer(arg)
    if kind == "tiktoken" and arg:
        return llama3_tiktoken(arg)
    if kind == "gpt2" and arg:
        return gpt2_from_rank_file(arg)
    raise UserError(f"unknown tokenizer {spec!r}; use byte, gpt2, hf:PATH (tokenizer.json) or tiktoken:PATH (rank file)")


def save_tokenizer_files(tok: Tokenizer, out_dir: str | os.PathLike) -> tuple[str, list[str]]:
    """Copy the tokenizer's files into `out_dir`; return (spec relative to out_dir, file names).

    (`gpt2` loaded from tiktoken's cache is written out as a rank file, `gpt2.tiktoken`.)

    The relative spec is `KIND:NAME`; `load_saved_tokenizer(out_dir, spec)` resolves it.
    """
    import shutil

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tok.kind == "byte":
        return "byte", []
    if tok.kind == "gpt2" and not tok.files:
        assert isinstance(tok, TiktokenTokenizer)
        write_rank_file(out_dir / "gpt2.tiktoken", tok.encoding._mergeable_ranks)  # noqa: SLF001
        return "gpt2:gpt2.tiktoken", ["gpt2.tiktoken"]
    files = list(tok.files)
    if tok.kind == "hf":  # keep its tokenizer_config.json (names of BOS/EOS) if there is one
        cfg = tok.files[0].parent / "tokenizer_config.json"
        if cfg.is_file():
            files.append(cfg)
    for f in files:
        shutil.copyfile(f, out_dir / f.name)
    return f"{tok.kind}:{files[0].name}", [f.name for f in files]


def load_saved_tokenizer(out_dir: str | os.PathLike, relative_spec: str) -> Tokenizer:
    kind, _, name = relative_spec.partition(":")
    if not name:
        return load_tokenizer(kind)
    return load_tokenizer(f"{kind}:{Path(out_dir) / name}")


# ----------------------------------------------------------------------------- for transformers

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the alphabet of byte-level BPE
    vocabularies in tokenizer.json files)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list that makes a `tokenizers` BPE encode as tiktoken does with these ranks.

    tiktoken repeatedly merges the adjacent pair whose concatenation has the lowest rank; a
    `tokenizers` BPE merges the pair listed first. So every split of a token into two tokens
    is listed, ordered by the rank of the token they make (transformers' TikTokenConverter
    does the same)."""
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def _byte_level_json(ranks: dict[bytes, int], pattern: str | None, specials: dict[str, int]) -> str:
    """tokenizer.json for a byte-level BPE given as tiktoken ranks (no merges for the byte
    tokenizer), pre-tokenized by `pattern` (None: the whole text is one piece)."""
    from tokenizers import AddedToken, Regex, Tokenizer as _HF, decoders, models, pre_tokenizers

    table = _bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {text(t): r for t, r in ranks.items()}
    merges = [(text(a), text(b)) for a, b in _bpe_merges(ranks)]
    # ignore_merges: a piece that is itself a token is taken whole, as tiktoken does
    tok = _HF(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pattern is None:
        tok.pre_tokenizer = byte_level
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False), byte_level])
    tok.decoder = decoders.ByteLevel()
    for name, token_id in sorted(specials.items(), key=lambda kv: kv[1]):
        if tok.get_vocab_size(with_added_tokens=True) != token_id:
            raise UserError(f"special token {name} has id {token_id}, but the next free id is "
                            f"{tok.get_vocab_size(with_added_tokens=True)}; cannot export this tokenizer")
        tok.add_special_tokens([AddedToken(name, special=True, normalized=False)])
    return tok.to_str(pretty=True)


def transformers_tokenizer_files(tok: Tokenizer, model_max_length: int) -> dict[str, str]:
    """The files `transformers.AutoTokenizer.from_pretrained` reads for this tokenizer, by name:
    tokenizer.json (a fast tokenizer encoding text to the same ids), tokenizer_config.json and
    special_tokens_map.json (BOS/EOS by name).

    hf: its tokenizer.json as is (and the keys of its tokenizer_config.json, if it had one).
    byte: a byte-level BPE with no merges whose ids are the UTF-8 bytes, BOS 256, EOS 257.
    tiktoken (LLaMA 3 style) and gpt2: converted to a byte-level BPE with the same pattern,
    merges recovered from the ranks and the same special-token ids.
    One difference stays: transformers reads text that spells a special token ("<|eos|>") as
    that token, where scalelab encodes it as text."""
    config: dict = {}
    if isinstance(tok, HFTokenizer):
        tokenizer_json = tok.files[0].read_text(encoding="utf-8")
        source_config = tok.files[0].parent / "tokenizer_config.json"
        if source_config.is_file():
            try:
                config = json.loads(source_config.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise UserError(f"{source_config} is not valid JSON ({e}); fix or remove it") from None
            config = config if isinstance(config, dict) else {}
        bos, eos = tok._tok.id_to_token(tok.bos_id), tok._tok.id_to_token(tok.eos_id)  # noqa: SLF001
    elif isinstance(tok, ByteTokenizer):
        bos, eos = tok.BOS_NAME, tok.EOS_NAME
        tokenizer_json = _byte_level_json({bytes([b]): b for b in range(256)}, None,
                                          {bos: tok.bos_id, eos: tok.eos_id})
    elif isinstance(tok, TiktokenTokenizer):
        enc = tok.encoding
        specials = dict(enc._special_tokens)  # noqa: SLF001
        names = {i: name for name, i in specials.items()}
        bos, eos = names[tok.bos_id], names[tok.eos_id]
        tokenizer_json = _byte_level_json(enc._mergeable_ranks, enc._pat_str, specials)  # noqa: SLF001
    else:
        raise UserError(f"cannot export a {tok.kind} tokenizer for transformers")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **config,
              "bos_token": bos, "eos_token": eos, "model_max_length": model_max_length}
    special = {"bos_token": bos, "eos_token": eos}
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(special, indent=2) + "\n"}


def find_run_tokenizer(start: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer a training run copied beside its checkpoints: `data.json` (the prepared
    data's metadata) + `tokenizer/`, in `start` or up to 3 parents (a run directory, its
    final/ or checkpoints/step_N). None if there is none; a one-line UserError if the copy is
    damaged (data.json not JSON, no saved spec, tokenizer files missing or unreadable)."""
    start = Path(start)
    for d in [start, *list(start.resolve().parents)[:3]]:
        meta_file = d / "data.json"
        if not meta_file.is_file():
            continue
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            spec = meta["tokenizer"]["saved_spec"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            raise UserError(f"{meta_file} is not the data.json a training run writes (no tokenizer.saved_spec); "
                            "pass --tokenizer SPEC") from None
        if not isinstance(spec, str):
            raise UserError(f"{meta_file}: tokenizer.saved_spec {spec!r} is not a tokenizer spec; pass --tokenizer SPEC")
        return load_saved_tokenizer(d / "tokenizer", spec)
    return None


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike,
              bos: str = "<|begin_of_text|>", eos: str = "<|end_of_text|>", *, overwrite: bool = False) -> HFTokenizer:
    """Train a byte-level BPE with the `tokenizers` library; write OUT_DIR/tokenizer.json.

    BOS and EOS are special tokens with ids 0 and 1. Byte-level means all 256 bytes are in the
    base alphabet, so any Unicode text round-trips exactly. OUT_DIR follows prepare's rule: new
    or empty, or an earlier tokenizer directory replaced (whole, once complete) with `overwrite`.
    """
    from tokenizers import Tokenizer as _HF, decoders, models, pre_tokenizers, trainers

    from scalelab.data.prepare import check_output_dir
    from scalelab.files import atomic_directory

    out_dir = Path(out_dir)
    if vocab_size < 258 + 2:
        raise UserError(f"--vocab-size {vocab_size} is too small for a byte-level BPE; use at least 260")
    check_output_dir(out_dir, overwrite, marker="tokenizer.json", what="tokenizer")
    tok = _HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[bos, eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    with atomic_directory(out_dir) as tmp:
        (tmp / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    return HFTokenizer(out_dir / "tokenizer.json")
