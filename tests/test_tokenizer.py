"""Tokenizers: exact round trips on arbitrary Unicode, special-token handling, tiktoken equality."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from scalelab.data.tokenizer import ByteTokenizer, load_tokenizer, llama3_special_tokens, train_bpe
from scalelab.errors import UserError

# Meta's llama3/tokenizer.py, copied here independently of scalelab's constant.
META_LLAMA3_PAT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501

SPECIAL_LOOKALIKES = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|endoftext|>", "<|bos|>", "<|eos|>",
                      "<|reserved_special_token_7|>", "<s>", "</s>"]
# Arbitrary Unicode (hypothesis' default alphabet: every code point but surrogates), with special-token
# look-alikes, CR/LF and emoji mixed in so the interesting cases turn up often.
TEXTS = st.lists(st.one_of(st.text(), st.sampled_from(SPECIAL_LOOKALIKES + ["\r\n", "\n\n", "  ", "😀", "é"])),
                 max_size=8).map("".join)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

CORPUS = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
          "Ünïcödé wörds, 日本語のテキスト, ελληνικά, русский текст, emoji 😀🚀 and   spaces\t\r\n") * 40


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    return train_bpe([CORPUS, CORPUS.upper()], 600, d)


def _llama3_like_ranks(n: int = 128000, seed: int = 0) -> dict[bytes, int]:
    """All 256 bytes, then printable-ASCII pairs, 2-byte UTF-8 characters and random ASCII
    strings up to `n` ranks: the size of LLaMA 3's table, so ids reach 127999 and specials 128000+."""
    tokens: list[bytes] = [bytes([b]) for b in range(256)]
    seen = set(tokens)

    def add(t: bytes) -> None:
        if t not in seen and len(tokens) < n:
            seen.add(t)
            tokens.append(t)

    printable = [bytes([c]) for c in range(32, 127)]
    for a in printable:
        for b in printable:
            add(a + b)
    for i in range(1000):  # digit triples: LLaMA 3's pattern cuts numbers into threes
        add(f"{i:03d}".encode())
    for cp in range(0xA0, 0x800):
        add(chr(cp).encode())
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"etaoinshrdlucmfwypvbgkqjxz ETAOINSHRDLU", dtype=np.uint8)
    while len(tokens) < n:
        for row in rng.choice(letters, size=(20000, 3)):
            add(row.tobytes())
        for row in rng.choice(letters, size=(5000, 4)):
            add(row.tobytes())
    return {t: i for i, t in enumerate(tokens)}


@pytest.fixture(scope="module")
def llama3_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama3")
    ranks = _llama3_like_ranks()
    path = d / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path, ranks


@pytest.fixture(scope="module")
def llama3(llama3_files):
    return load_tokenizer(f"tiktoken:{llama3_files[0]}")


@pytest.fixture(scope="module")
def tiktoken_reference(llama3_files):
    import tiktoken

    _, ranks = llama3_files
    names = llama3_special_tokens()
    return tiktoken.Encoding(name="reference", pat_str=META_LLAMA3_PAT, mergeable_ranks=ranks,
                             special_tokens={t: len(ranks) + i for i, t in enumerate(names)})


# ----------------------------------------------------------------------------- byte

@FAST
@given(TEXTS)
def test_byte_round_trip_and_ids_are_utf8(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode(text, bos=True, eos=True) == [256, *ids, 257]
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == "<|bos|>" + text + "<|eos|>"


def test_byte_spec():
    tok = load_tokenizer("byte")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.spec) == (258, 256, 257, "byte")
    with pytest.raises(ValueError):
        tok.decode([300])


# ----------------------------------------------------------------------------- trained BPE / hf

def test_trained_bpe_shape(bpe, tmp_path):
    assert bpe.vocab_size <= 600
    assert (bpe.bos_id, bpe.eos_id) == (0, 1)
    assert bpe.spec.startswith("hf:") and bpe.files[0].name == "tokenizer.json"
    # it learned merges: English text takes far fewer tokens than bytes
    assert len(bpe.encode("To be, or not to be, that is the question")) < 25
    # `bpe:DIR` and `hf:FILE` load the same tokenizer
    again = load_tokenizer(f"bpe:{bpe.files[0].parent}")
    assert again.encode(CORPUS[:500]) == bpe.encode(CORPUS[:500])


@FAST
@given(TEXTS)
def test_bpe_round_trip_with_special_lookalikes(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.bos_id not in ids and bpe.eos_id not in ids  # text never injects a special token
    wrapped = bpe.encode(text, bos=True, eos=True)
    assert wrapped == [bpe.bos_id, *ids, bpe.eos_id]
    assert bpe.decode(wrapped) == "<|begin_of_text|>" + text + "<|end_of_text|>"
    assert bpe.encode_batch([text, text[::-1]]) == [ids, bpe.encode(text[::-1])]


def test_hf_tokenizer_finds_eos_by_config_and_rejects_none(bpe, tmp_path):
    data = json.loads(bpe.files[0].read_text())
    # rename the specials to names we do not guess; tokenizer_config.json names them
    for t in data["added_tokens"]:
        t["content"] = {"<|begin_of_text|>": "[START]", "<|end_of_text|>": "[STOP]"}[t["content"]]
    for name, i in (("[START]", 0), ("[STOP]", 1)):
        data["model"]["vocab"][name] = i
    for old in ("<|begin_of_text|>", "<|end_of_text|>"):
        data["model"]["vocab"].pop(old)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="no end-of-text token"):
        load_tokenizer(f"hf:{tmp_path}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "[START]", "eos_token": {"content": "[STOP]"}}))
    tok = load_tokenizer(f"hf:{tmp_path}")
    assert (tok.bos_id, tok.eos_id) == (0, 1)


def test_bad_specs_are_user_errors(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "ranks.model").write_text("not-a-rank-line\n")
    for spec in ("nope", "hf:", f"hf:{tmp_path / 'missing'}", f"hf:{tmp_path}", f"tiktoken:{tmp_path / 'ranks.model'}",
                 f"tiktoken:{tmp_path / 'missing.model'}"):
        with pytest.raises(UserError):
            load_tokenizer(spec)


# ----------------------------------------------------------------------------- LLaMA 3 tiktoken format

def test_llama3_special_tokens_match_meta(llama3):
    names = llama3_special_tokens()
    assert len(names) == 256 and len(set(names)) == 256
    ids = {name: 128000 + i for i, name in enumerate(names)}
    assert ids["<|begin_of_text|>"] == 128000 and ids["<|end_of_text|>"] == 128001
    assert ids["<|reserved_special_token_0|>"] == 128002 and ids["<|reserved_special_token_3|>"] == 128005
    assert ids["<|start_header_id|>"] == 128006 and ids["<|end_header_id|>"] == 128007
    assert ids["<|reserved_special_token_4|>"] == 128008 and ids["<|eot_id|>"] == 128009
    assert ids["<|reserved_special_token_5|>"] == 128010 and ids["<|reserved_special_token_250|>"] == 128255
    assert (llama3.vocab_size, llama3.bos_id, llama3.eos_id) == (128256, 128000, 128001)
    assert llama3.decode([128006, 128009]) == "<|start_header_id|><|eot_id|>"


@FAST
@given(TEXTS)
def test_llama3_equals_tiktoken_encoding(llama3, tiktoken_reference, text):
    ref = tiktoken_reference.encode(text, disallowed_special=())
    assert llama3.encode(text) == ref
    assert llama3.encode(text, bos=True, eos=True) == [128000, *ref, 128001]
    assert llama3.decode(ref) == text
    assert llama3.encode_batch([text, "x" + text]) == tiktoken_reference.encode_ordinary_batch([text, "x" + text])


def test_llama3_pattern_matters(llama3, tiktoken_reference):
    """The equality above is not vacuous: the rank file yields multi-byte tokens up to id ~128K,
    and the regex decides where they may form (LLaMA 3 splits digits in threes)."""
    text = "The 1234567 quick brown foxes don't jump; they're LAZY.\n\n  ok"
    ids = llama3.encode(text)
    assert len(ids) < len(text.encode()) / 1.8 and max(ids) > 20000
    digits = [llama3.decode([i]) for i in llama3.encode("1234567")]
    assert digits == ["123", "456", "7"]
    assert ids == tiktoken_reference.encode(text)


# ----------------------------------------------------------------------------- gpt2

def test_gpt2_offline_is_a_clear_user_error(monkeypatch, tmp_path):
    import tiktoken.load
    import tiktoken.registry

    def offline(url):
        raise ConnectionError(f"Failed to resolve host for {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty cache
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    with pytest.raises(UserError, match="offline") as e:
        load_tokenizer("gpt2")
    assert "\n" not in str(e.value)


def test_gpt2_rank_file_copy_uses_gpt2_pattern(tmp_path, llama3_files):
    """The copy of gpt2 kept beside prepared data (`gpt2:FILE`) encodes like tiktoken with r50k's regex."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = {t: r for t, r in llama3_files[1].items() if r < 50256}
    path = tmp_path / "gpt2.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    tok = load_tokenizer(f"gpt2:{path}")
    ref = tiktoken.Encoding("ref", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})
    text = "Hello world 1234567 don't <|endoftext|> stop"
    assert tok.encode(text) == ref.encode(text, disallowed_special=())
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (50257, 50256, 50256)


# ----------------------------------------------------------------------------- CLI

def test_cli_tokenizer_train_and_encode(tmp_path, cli):
    (tmp_path / "a.txt").write_text(CORPUS)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "hello hello hello"}) + "\n")
    r = cli("tokenizer", "train", "--input", tmp_path / "a.txt", tmp_path / "b.jsonl", "--vocab-size", "300",
            "--out", tmp_path / "tok", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["vocab_size"] == 300 and (tmp_path / "tok" / "tokenizer.json").is_file()
    r = cli("tokenizer", "encode", "--tokenizer", f"hf:{tmp_path / 'tok'}", "--json", "héllo <|end_of_text|>")
    assert r.returncode == 0, r.stderr
    ids = json.loads(r.stdout)["ids"]
    assert load_tokenizer(f"hf:{tmp_path / 'tok'}").decode(ids) == "héllo <|end_of_text|>"
    r = cli("tokenizer", "encode", "--tokenizer", "tiktoken:/nonexistent/tokenizer.model", "x")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "scalelab tokenizer: error:" in r.stderr


def test_tokenizer_train_output_rules_match_prepare(tmp_path, cli):
    """`tokenizer train --out` used to overwrite silently while `prepare` asked for --overwrite:
    both now refuse an existing non-empty output without --overwrite, and a file as --out."""
    (tmp_path / "a.txt").write_text(CORPUS)
    train = ("tokenizer", "train", "--input", tmp_path / "a.txt", "--vocab-size", "300")
    assert cli(*train, "--out", tmp_path / "tok").returncode == 0
    before = (tmp_path / "tok" / "tokenizer.json").read_bytes()
    r = cli(*train[:-1], "290", "--out", tmp_path / "tok")
    assert r.returncode == 2 and "--overwrite" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == before
    r = cli(*train[:-1], "290", "--out", tmp_path / "tok", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert load_tokenizer(f"hf:{tmp_path / 'tok'}").vocab_size == 290
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    for out in (tmp_path / "notes", tmp_path / "file"):
        for extra in ((), ("--overwrite",)):
            for verb in (train, ("prepare", "--input", tmp_path / "a.txt", "--no-progress")):
                r = cli(*verb, "--out", out, *extra)
                assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine" and (tmp_path / "file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "file", "notes", "tok"]


@pytest.mark.parametrize("name,content", [
    ("tokenizer.json", None),  # a valid tokenizers file with an empty vocabulary
    ("tokenizer.json", '{"model": {}, "added_tokens": []}'),
    ("tokenizer.json", b"\xff\xfe\x00binary"),
    ("ranks.model", "YQ== 0\nYg== x\n"),  # a rank that is not a number
    ("ranks.model", "YQ== 0 extra\n"),
    ("ranks.model", "!!!! 0\n"),  # not base64
    ("ranks.model", b"\xff\xfe garbage\n"),
    ("ranks.model", "".join(f"{base64.b64encode(bytes([b])).decode()} {b + (b > 100)}\n" for b in range(256))),  # a gap
])
def test_damaged_tokenizer_files_are_one_line(tmp_path, cli, name, content):
    path = tmp_path / name
    if content is None:
        from tokenizers import Tokenizer, models

        Tokenizer(models.BPE()).save(str(path))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    spec = f"{'hf' if name == 'tokenizer.json' else 'tiktoken'}:{path}"
    r = cli("tokenizer", "encode", "--tokenizer", spec, "x")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and str(path) in r.stderr, r.stderr


def test_tokenizer_train_on_a_full_disk_is_one_line_naming_out(tmp_path, tiny_fs, cli):
    (tmp_path / "a.txt").write_text(CORPUS)
    with open(tiny_fs / "filler", "wb", buffering=0) as f:  # leave a few KiB: the staging directory fits
        for _ in range((256 - 8) * 1024 // 4096):
            f.write(b"\0" * 4096)
    r = cli("tokenizer", "train", "--input", tmp_path / "a.txt", "--vocab-size", "600", "--out", tiny_fs / "tok")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{tiny_fs / 'tok'}: the disk is full" in r.stderr, r.stderr
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["filler"]
