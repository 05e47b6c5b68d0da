"""scalelab.harness: downstream tasks through EleutherAI's lm-evaluation-harness, end to end on
a local multiple-choice task (tests/data/lm_eval_tasks, no network), checked against the same
log-likelihoods computed directly with scalelab's own model."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scalelab import harness, hf
from scalelab.errors import UserError
from scalelab.model import Transformer
from scalelab.presets import style_config

TASKS = Path(__file__).parent / "data" / "lm_eval_tasks"
TASK = "scalelab_tiny_mc"


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """O(1) logits, so the choices' log-likelihoods differ by far more than float rounding."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if p.dim() == 1 and name.endswith("norm.weight") else 0.1 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory as the trainer leaves it: config.toml (its marker line), model.toml,
    data.json + tokenizer/ (byte tokenizer) and the weights in final/. Returns (run directory,
    model, tokenizer)."""
    from scalelab.data import prepare as P
    from scalelab.data.tokenizer import find_run_tokenizer
    from scalelab.train.trainer import RUN_MARKER

    d = tmp_path_factory.mktemp("harness")
    (d / "corpus.txt").write_text("Question: what?\nAnswer: this.\n" * 20)
    P.prepare(P.iter_files([d / "corpus.txt"]), "byte", d / "data", val_fraction=0.0, workers=1, progress=False)
    run = d / "run"
    run.mkdir()
    shutil.copytree(d / "data" / "tokenizer", run / "tokenizer")
    shutil.copy(d / "data" / "meta.json", run / "data.json")
    tok = find_run_tokenizer(run)
    model = randomize(Transformer(style_config("llama3", 2, 32, 4, num_key_value_heads=2, block_size=128,
                                              vocab_size=tok.vocab_size + 2)))
    (run / "config.toml").write_text(RUN_MARKER + "\n")
    (run / "model.toml").write_text(model.config.to_toml())
    hf.save_native(model, run / "final")
    return run, model, tok


def direct_scores(model, tok, doc) -> np.ndarray:
    """Sum of log P(choice token | everything before it) over the tokens of " " + choice, after the
    task's prompt, for each choice: the multiple-choice log-likelihood, computed with our model."""
    context = tok.encode(f"Question: {doc['question']}\nAnswer:")
    scores = []
    for choice in doc["choices"]:
        continuation = tok.encode(" " + choice)
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids[:, :-1]).double(), dim=-1)[0]
        targets = torch.tensor(continuation)
        scores.append(logprobs[len(context) - 1:].gather(1, targets[:, None]).sum().item())
    return np.array(scores)


def expected_accuracy(model, tok, docs) -> tuple[float, float]:
    """(acc, acc_norm) from direct_scores: argmax of the log-likelihoods, and of them divided by
    each choice's length in characters (the harness's acc_norm)."""
    acc, acc_norm = [], []
    for doc in docs:
        scores = direct_scores(model, tok, doc)
        lengths = np.array([len(c) for c in doc["choices"]], dtype=float)
        acc.append(np.argmax(scores) == doc["label"])
        acc_norm.append(np.argmax(scores / lengths) == doc["label"])
    return float(np.mean(acc)), float(np.mean(acc_norm))


def read_docs() -> list[dict]:
    return [json.loads(line) for line in (TASKS / f"{TASK}.jsonl").read_text().splitlines()]


def test_harness_accuracy_equals_direct_log_likelihoods(run, tmp_path, capsys, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    run_dir, model, tok = run
    seen = {}  # (context, continuation) -> the harness's log-likelihood, recorded as it runs
    original = HFLM.loglikelihood

    def recording(self, requests, *args, **kwargs):
        out = original(self, requests, *args, **kwargs)
        seen.update({tuple(r.args): ll for r, (ll, _) in zip(requests, out)})
        return out

    monkeypatch.setattr(HFLM, "loglikelihood", recording)
    results = harness.evaluate_tasks(run_dir / "final", [TASK], include_path=TASKS)

    docs = read_docs()
    for doc in docs:  # each request's log-likelihood, not only the accuracy they add up to
        scores = direct_scores(model, tok, doc)
        top2 = np.sort(scores)[-2:]
        assert top2[1] - top2[0] > 1e-3, "choices too close to call: the comparison would hang on rounding"
        prompt = f"Question: {doc['question']}\nAnswer:"
        theirs = [seen[(prompt, " " + c)] for c in doc["choices"]]
        np.testing.assert_allclose(theirs, scores, atol=1e-4, rtol=0)
    assert len(seen) == sum(len(d["choices"]) for d in docs)
    acc, acc_norm = expected_accuracy(model, tok, docs)
    got = results["results"][TASK]
    assert (got["acc,none"], got["acc_norm,none"]) == pytest.approx((acc, acc_norm), abs=1e-12)
    assert 0 < acc < 1 and acc != acc_norm  # random weights: a mix of right and wrong, and the norm matters

    out = capsys.readouterr().out
    assert TASK in out and "acc_norm" in out and "|" in out  # the harness's own table
    written = json.loads((run_dir / harness.RESULTS_FILE).read_text())  # beside the run, not in final/
    assert written["results"][TASK]["acc,none"] == got["acc,none"]
    assert written["config"]["model_args"]["pretrained"] == str(run_dir / "final")


def test_a_hugging_face_directory_is_evaluated_as_it_is(run, tmp_path, capsys):
    """export-hf's output (model + tokenizer) goes to the harness unchanged; the JSON lands in it."""
    from scalelab.cli import main as cli_main

    run_dir, model, tok = run
    assert cli_main(["export-hf", str(run_dir / "final"), str(tmp_path / "hf")]) == 0
    results = harness.evaluate_tasks(tmp_path / "hf", [TASK], include_path=TASKS, limit=5)
    got = results["results"][TASK]
    assert (got["acc,none"], got["acc_norm,none"]) == pytest.approx(expected_accuracy(model, tok, read_docs()[:5]))
    assert json.loads((tmp_path / "hf" / harness.RESULTS_FILE).read_text())["results"][TASK] == got


def test_unknown_task_is_one_line_before_any_work(run, tmp_path):
    run_dir, _, _ = run
    with pytest.raises(UserError) as e:
        harness.evaluate_tasks(run_dir / "final", ["arc_eassy"], include_path=TASKS, out_dir=tmp_path / "out")
    message = str(e.value)
    assert "\n" not in message and "arc_eassy" in message and "arc_easy" in message and "lm-eval ls tasks" in message
    assert not (tmp_path / "out").exists()


def test_a_task_whose_data_cannot_be_fetched_is_one_line(run, monkeypatch, tmp_path):
    """arc_easy with no network: datasets raises ConnectionError (as it does offline); one line."""
    import datasets

    def offline(path, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as e:
        harness.evaluate_tasks(run[0] / "final", ["arc_easy"], out_dir=tmp_path / "out", limit=1)
    message = str(e.value)
    assert "\n" not in message and "allenai/ai2_arc" in message and "network access" in message
    assert not (tmp_path / "out").exists()


def test_model_without_tokenizer_and_missing_include_path_are_one_line(run, tmp_path):
    _, model, _ = run
    hf.save_native(model, tmp_path / "bare")
    with pytest.raises(UserError, match="no tokenizer.*export-hf") as e:
        harness.evaluate_tasks(tmp_path / "bare", [TASK], include_path=TASKS)
    assert "\n" not in str(e.value) and not (tmp_path / "bare" / harness.RESULTS_FILE).exists()
    with pytest.raises(UserError, match="no such directory"):
        harness.evaluate_tasks(tmp_path / "bare", [TASK], include_path=tmp_path / "missing")


def test_without_lm_eval_the_error_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError, as when not installed
    with pytest.raises(UserError) as e:
        harness.evaluate_tasks(tmp_path, [TASK])
    assert "\n" not in str(e.value) and 'pip install "scalelab[eval]"' in str(e.value)
