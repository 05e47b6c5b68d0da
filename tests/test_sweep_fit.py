"""`scalelab sweep fit`: synthetic sweeps whose final losses are drawn from known laws (no training), read
through the same code path as real runs (run directories, sweep.toml, the CLI)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from sweep_synthetic import HP_LAW, LAW, SPACE, make_sweep, write_sweep_file

from scalelab.cli import main
from scalelab.scaling.search import search
from scalelab.sweep.fit import fit_sweep, grown_range, public


def test_recovers_the_law_and_the_hyperparameter_laws(tmp_path):
    """Noise-free runs from LAW, learning-rate x batch grids around HP_LAW at every budget: Approach 3 gives LAW
    back, the hyperparameter fit HP_LAW, and the recommendation at 10x is the planner's under the true law."""
    doc = write_sweep_file(tmp_path, make_sweep(tmp_path, tune=True))
    res = public(fit_sweep(tmp_path, doc, bootstrap=0))
    v = res["variants"][""]
    for key in ("E", "A", "B", "alpha", "beta"):
        assert v["approach3"][key] == pytest.approx(getattr(LAW, key), rel=1e-4), key
    h = v["hyperparameter_law"]
    assert h["fitted"] and h["lr"]["exponent"] == pytest.approx(HP_LAW.lr_exponent, abs=0.01)
    assert h["batch_tokens"]["exponent"] == pytest.approx(HP_LAW.batch_exponent, abs=0.02)
    rec = res["recommendation"]
    assert res["budget"] == pytest.approx(1e15)
    space = dataclasses.replace(SPACE, hidden=grown_range("32:256:32"), layers=grown_range("1:8:1"))
    truth = search(1e15, LAW, space, top=1).best
    assert (rec["n_layer"], rec["n_embd"]) == (truth["n_layer"], truth["n_embd"])
    assert rec["loss"] == pytest.approx(float(LAW.loss(rec["N"], rec["D"])), rel=1e-5)
    assert rec["steps"] * rec["hyperparameters"]["batch_tokens"] == rec["D"]
    assert rec["flops"] == pytest.approx(1e15, rel=0.1)
    a2 = v["approach2"]  # exact-FLOPs shapes, no 6ND: near the law's exponents, not equal to them
    assert len(a2["budgets"]) == 3 and a2["N_opt"]["exponent"] == pytest.approx(LAW.a, abs=0.15)


def test_the_prediction_interval_holds_the_true_loss_with_noisy_runs(tmp_path):
    doc = write_sweep_file(tmp_path, make_sweep(tmp_path, noise=0.003, seed=3))
    rec = public(fit_sweep(tmp_path, doc, bootstrap=40))["recommendation"]
    lo, hi = rec["loss_interval_95"]
    assert lo < float(LAW.loss(rec["N"], rec["D"])) < hi


@pytest.mark.parametrize("dE, noise, verdict", [(0.05, 0.002, "wins"), (0.0, 0.01, "not distinguishable")])
def test_ab_names_the_winner_or_says_not_distinguishable(tmp_path, dE, noise, verdict):
    laws = {"rope_theta=10000": dataclasses.replace(LAW, E=LAW.E + dE), "rope_theta=500000": LAW}
    doc = write_sweep_file(tmp_path, make_sweep(tmp_path, laws, noise=noise, seed=1))
    c = public(fit_sweep(tmp_path, doc, bootstrap=20))["comparison"]
    assert verdict in c["verdict"]
    if verdict == "wins":
        assert c["winner"] == "rope_theta=500000" and c["distinguishable"]
        assert c["difference"] == pytest.approx(dE, rel=0.5)
    else:
        lo, hi = c["difference_interval_95"]
        assert lo <= 0 <= hi and not c["distinguishable"]


def test_cli_writes_fit_json_report_and_plots(tmp_path, capsys):
    doc = write_sweep_file(tmp_path, make_sweep(tmp_path, noise=0.002, finished=0.9))
    assert main(["sweep", "fit", str(tmp_path), "--bootstrap", "8", "--budget", "3e15"]) == 0
    out, err = capsys.readouterr()
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert fit["fingerprint"] == doc["fingerprint"] and fit["budget"] == 3e15 and fit["largest_budget"] == 1e14
    rec = fit["recommendation"]
    for key in ("config", "steps", "seq_len", "loss", "loss_interval_95", "name"):
        assert key in rec
    assert {"peak_lr", "min_lr", "warmup", "schedule", "batch_tokens"} <= set(rec["hyperparameters"])
    assert len(fit["unfinished"]) == 1 and "1 runs are unfinished" in err
    report = (tmp_path / "report.md").read_text()
    assert "## Recommendation" in report and "C = 3e+15" in report
    from scalelab.scaling.hparams import hyperparameter_law_from_file
    from scalelab.scaling.laws import load_law_file

    law = load_law_file(tmp_path / "law.json")  # usable by plan --law-file
    assert law.alpha == pytest.approx(fit["variants"][""]["approach3"]["alpha"])
    assert hyperparameter_law_from_file(tmp_path / "law.json") is None  # no grids: no fitted hyperparameters
    for png in ("isoflop.png", "surface.png", "frontier.png", "residuals.png", "curves.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in report


@pytest.mark.parametrize("make, args, fragment", [
    (None, [], "no such sweep directory"),
    ("empty", [], "is not a sweep directory (no sweep.toml)"),
    ("unfinished", [], "no finished runs to fit"),
    ("sweep", ["--budget", "-1"], "--budget must be a positive number"),
    ("sweep", ["--budget", "lots"], "--budget"),
    ("sweep", ["--bootstrap", "1"], "--bootstrap needs 0 (off) or 2"),
    ("flat", [], "the fitted law has no compute optimum: its A/N^alpha term is flat"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, make, args, fragment):
    out = tmp_path / "s"
    if make == "empty":
        out.mkdir()
    elif make == "unfinished":
        write_sweep_file(out, make_sweep(out, finished=0.0))
    elif make == "sweep":
        write_sweep_file(out, make_sweep(out))
    elif make == "flat":
        write_sweep_file(out, make_sweep(out, flat_n=True))
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    assert main(["sweep", "fit", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and fragment in err, err
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before


def test_sweep_fit_imports_no_torch(tmp_path):
    from conftest import heavy_modules_loaded

    write_sweep_file(tmp_path, make_sweep(tmp_path))
    assert heavy_modules_loaded(["sweep", "fit", str(tmp_path), "--bootstrap", "0", "--no-plots"]) == []


def test_a_sweep_at_a_fixed_batch_extrapolates_at_that_batch(tmp_path):
    doc = make_sweep(tmp_path)
    doc["design"]["batch_tokens"] = 4096  # sweep design --batch-tokens 4096
    rec = public(fit_sweep(tmp_path, write_sweep_file(tmp_path, doc), bootstrap=0))["recommendation"]
    assert rec["hyperparameters"]["batch_tokens"] == 4096 and rec["D"] == rec["steps"] * 4096


def test_a_law_without_irreducible_loss_is_flagged(tmp_path):
    law = dataclasses.replace(LAW, E=1e-9)
    doc = write_sweep_file(tmp_path, make_sweep(tmp_path, {"": law}))
    res = public(fit_sweep(tmp_path, doc, bootstrap=0))
    assert any("no irreducible loss" in w for w in res["warnings"])
    assert not any("no irreducible loss" in w for w in public(fit_sweep(
        tmp_path / "ok", write_sweep_file(tmp_path / "ok", make_sweep(tmp_path / "ok")), bootstrap=0))["warnings"])


def test_a_style_variant_plans_with_the_kv_heads_its_runs_trained():
    from scalelab.sweep.fit import search_space

    design = {"space": {k: v for k, v in SPACE.describe().items() if v is not None},
              "compare": {"field": "style", "values": ["llama3", "llama2"]}}
    mha = [{"n_head": 4, "num_key_value_heads": 4}, {"n_head": 8, "num_key_value_heads": 8}]
    space, fields = search_space(design, "style=llama2", mha)
    assert space.style == "llama2" and space.mha and fields == {}
    space, _ = search_space(design, "style=llama3", [{"n_head": 8, "num_key_value_heads": 2}])
    assert space.kv_heads == (2,) and not space.mha


def test_the_designs_token_limit_holds_for_the_recommendation(tmp_path):
    """A design limited to one pass over its data (--max-tokens) recommends within it at the target."""
    doc = make_sweep(tmp_path)
    free = public(fit_sweep(tmp_path, write_sweep_file(tmp_path, doc), bootstrap=0))["recommendation"]
    limit = free["D"] / 3
    doc["design"]["space"]["max_tokens"] = limit
    rec = public(fit_sweep(tmp_path, write_sweep_file(tmp_path, doc), bootstrap=0))["recommendation"]
    assert rec["D"] <= limit * 1.01 and rec["N"] > free["N"]


def test_three_variants_rank_against_the_winner(tmp_path, capsys):
    laws = {"rope_theta=1": dataclasses.replace(LAW, E=LAW.E + 0.1), "rope_theta=2": LAW,
            "rope_theta=3": dataclasses.replace(LAW, E=LAW.E + 0.05)}
    write_sweep_file(tmp_path, make_sweep(tmp_path, laws))
    assert main(["sweep", "fit", str(tmp_path), "--bootstrap", "0"]) == 0
    c = json.loads((tmp_path / "fit.json").read_text())["comparison"]
    report = (tmp_path / "report.md").read_text()
    assert "## A/B" in report and all(f"| rope_theta={v} |" in report for v in (1, 2, 3))
    assert all((tmp_path / f"law-rope_theta-{v}.json").is_file() for v in (1, 2, 3))
    assert c["winner"] == "rope_theta=2" and c["loser"] == "rope_theta=3"
    assert [o["variant"] for o in c["others"]] == ["rope_theta=3", "rope_theta=1"]
    assert c["difference"] == pytest.approx(0.05, rel=1e-3) and c["distinguishable"] is None
    assert "no bootstrap intervals" in c["verdict"]


def test_a_dimension_the_design_fixed_stays_fixed_in_the_recommendation(tmp_path):
    """A design that fixed the depth (--layers 3) never varied it, so its law says nothing about other depths:
    the Shakespeare study's --layers 1 ladder was recommended a 4-layer model (the single value "grown" to
    1..4). Now a single value stays, and the recommendation is the planner's best at that depth."""
    doc = make_sweep(tmp_path)
    doc["design"]["space"]["layers"] = "3"
    doc = write_sweep_file(tmp_path, doc)
    rec = public(fit_sweep(tmp_path, doc, bootstrap=0))["recommendation"]
    space = dataclasses.replace(SPACE, hidden=grown_range("32:256:32"), layers=(3,))
    truth = search(1e15, LAW, space, top=1).best
    assert (rec["n_layer"], rec["n_embd"]) == (3, truth["n_embd"])
    assert grown_range("1") == (1,) and grown_range("64,64") == (64,)
