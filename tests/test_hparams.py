"""Hyperparameter laws (scalelab.scaling.hparams): DeepSeek LLM's default, its compute convention, the width
rule, and law files."""

import json
import math

import pytest

from scalelab.config import ModelConfig
from scalelab.errors import UserError
from scalelab.scaling import hparams


def test_default_is_deepseek_llm_section_3_1():
    law = hparams.DEFAULT
    # DeepSeek LLM (arXiv 2401.02954) eq. 1, evaluated by hand at C = 1e20: 0.3118 * 1e20^-0.125 and 0.2920 * 1e20^0.3271
    hp = hparams.hyperparameters(1e20, law)
    assert hp["peak_lr"] == pytest.approx(0.3118 * 10 ** (-2.5), rel=1e-12)
    assert hp["batch_tokens"] == pytest.approx(0.2920 * 10 ** 6.542, rel=1e-12)
    assert hp["compute_convention"] == "non_embedding"
    assert hp["min_lr"] == pytest.approx(0.1 * hp["peak_lr"])
    assert "2401.02954" in hp["source"]


def test_non_embedding_flops_is_deepseeks_m():
    # DeepSeek LLM section 3.2: M = 72 n_layer d^2 + 6 n_layer d l_seq, for MHA blocks with a 4d FFN (12 d^2
    # GEMM weights a layer): our count must give exactly that for such a model, whatever the vocabulary
    cfg = ModelConfig(n_layer=3, n_embd=96, n_head=4, num_key_value_heads=4, ffn_type="gelu", d_ff=384,
                      vocab_size=1000, block_size=64)
    L, d, S = 3, 96, 64
    assert hparams.non_embedding_flops_per_token(cfg, S) == 72 * L * d * d + 6 * L * d * S
    hp = hparams.hyperparameters_for(cfg, S, 1e6)
    assert hp["compute"] == pytest.approx((72 * L * d * d + 6 * L * d * S) * 1e6)
    assert hp["batch_tokens"] % S == 0


def test_warmup_is_capped_for_short_runs():
    law = hparams.DEFAULT
    hp = hparams.hyperparameters(1e15, law, tokens=1e6, seq_len=128)
    steps = math.ceil(1e6 / hp["batch_tokens"])
    assert hp["warmup_steps"] == max(1, int(0.1 * steps)) and hp["warmup"] == hp["warmup_steps"]
    long = hparams.hyperparameters(1e15, law, tokens=1e12, seq_len=128)
    assert long["warmup_steps"] == 2000


def test_width_rule_scales_lr_inversely_with_width():
    rule = hparams.width_rule(3e-3, 128)
    a = hparams.hyperparameters(1e14, rule, width=128)
    b = hparams.hyperparameters(1e14, rule, width=256)
    assert a["peak_lr"] == pytest.approx(3e-3) and b["peak_lr"] == pytest.approx(1.5e-3)
    assert a["batch_tokens"] == hparams.hyperparameters(1e14)["batch_tokens"]
    with pytest.raises(UserError, match="n_embd"):
        hparams.hyperparameters(1e14, rule)


def test_law_file_round_trip_and_absence(tmp_path):
    law = hparams.HyperparameterLaw(lr_coef=2.0, lr_exponent=-0.2, batch_coef=0.5, batch_exponent=0.3,
                                    compute="training", name="mine")
    path = tmp_path / "law.json"
    path.write_text(json.dumps({"E": 1, "A": 1, "B": 1, "alpha": 0.3, "beta": 0.3, "hyperparameters": law.to_dict()}))
    assert hparams.hyperparameter_law_from_file(path) == law
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"E": 1, "A": 1, "B": 1, "alpha": 0.3, "beta": 0.3}))
    assert hparams.hyperparameter_law_from_file(plain) is None


@pytest.mark.parametrize("bad, match", [
    ({"lr": {"coef": 1}, "batch_tokens": {"coef": 1, "exponent": 0.3}}, "'lr'"),
    ({"lr": {"coef": -1, "exponent": 0}, "batch_tokens": {"coef": 1, "exponent": 0.3}}, "positive"),
    ({"lr": {"coef": 1, "exponent": "x"}, "batch_tokens": {"coef": 1, "exponent": 0.3}}, "finite"),
    ({"lr": {"coef": 1, "exponent": 0}, "batch_tokens": {"coef": 1, "exponent": 0.3}, "compute": "6nd"}, "compute"),
    ([], "JSON object"),
])
def test_bad_hyperparameter_law_is_one_user_error(tmp_path, bad, match):
    path = tmp_path / "law.json"
    path.write_text(json.dumps({"hyperparameters": bad}))
    with pytest.raises(UserError, match=match):
        hparams.hyperparameter_law_from_file(path)


def synthetic_grid(lr_law=(0.5, -0.12), batch_law=(0.3, 0.33), budgets=(1e15, 1e16, 1e17, 1e18), noise=0.0, seed=0):
    """Runs of one model per budget on a learning-rate x batch grid; loss a bowl in (ln lr, ln B) whose minimum is
    the known law (no training)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    C, N, lr, batch, loss = [], [], [], [], []
    for c in budgets:
        lr_opt, b_opt = lr_law[0] * c ** lr_law[1], batch_law[0] * c ** batch_law[1]
        # a grid not centred on the optimum (its centre off by a third of a step)
        for lr_i in lr_opt * 2.0 ** (np.arange(-4, 5) * 0.5 + 0.17):
            for b_i in b_opt * 2.0 ** (np.arange(-3, 4) * 0.5 - 0.11):
                C.append(c), N.append(1e6 * c ** 0.5), lr.append(lr_i), batch.append(b_i)
                bowl = 0.02 * np.log(lr_i / lr_opt) ** 2 + 0.01 * np.log(b_i / b_opt) ** 2
                loss.append((3.0 - 0.1 * np.log10(c) + bowl) * (1 + noise * rng.standard_normal()))
    return [np.array(a) for a in (C, N, lr, batch, loss)]


def test_fit_recovers_a_known_hyperparameter_law():
    res = hparams.fit_hyperparameter_law(*synthetic_grid())
    law = res["law"]
    # within the grid's resolution (steps of 2^0.5): the near-optimal band is relative to the loss, which falls with C
    assert law.lr_exponent == pytest.approx(-0.12, abs=0.02) and law.batch_exponent == pytest.approx(0.33, abs=0.02)
    for c in (1e15, 1e18):
        assert law.lr(c) == pytest.approx(0.5 * c ** -0.12, rel=0.15)
        assert law.batch_tokens(c) == pytest.approx(0.3 * c ** 0.33, rel=0.15)
    assert law.compute == "training" and len(res["budgets"]) == 4 and res["warnings"] == []


def test_fit_hyperparameter_law_needs_two_grids_and_flags_edges():
    import numpy as np

    C, N, lr, batch, loss = synthetic_grid(budgets=(1e15,))
    with pytest.raises(UserError, match="at 2 or more budgets"):
        hparams.fit_hyperparameter_law(C, N, lr, batch, loss)
    C, N, lr, batch, loss = synthetic_grid(budgets=(1e15, 1e16))
    keep = lr <= np.median(lr)  # the grid's top half removed: the optimum is at its upper edge
    res = hparams.fit_hyperparameter_law(C[keep], N[keep], lr[keep], batch[keep], loss[keep])
    assert any("best learning rate" in w and "edge of its grid" in w for w in res["warnings"])
    assert any("only 2 budgets" in w for w in res["warnings"])


def test_scalelab_fit_writes_the_hyperparameter_law_and_fits_the_loss_law_on_the_best_runs(tmp_path, cli):
    """A table of runs from the epoch law (well-tuned IsoFLOP ladder) plus learning-rate x batch grids at 3
    budgets around a known hyperparameter law, their losses worse off the optimum: `fit --out` recovers both."""
    import numpy as np

    from scalelab.scaling.laws import LAWS

    law = LAWS["epoch"]
    rows = []
    for c in (1e18, 1e19, 1e20, 1e21):
        for n in law.optimal_n(c) * np.geomspace(1 / 4, 4, 6):  # none at the grids' size
            rows.append((n, c / (6 * n), float(law.loss(n, c / (6 * n))), c, 0.5 * c ** -0.12, 0.3 * c ** 0.33))
    C, _, lr, batch, _ = synthetic_grid(budgets=(1e18, 1e19, 1e20))
    for c, lr_i, b_i in zip(C, lr, batch):
        n = float(law.optimal_n(c))
        bowl = 0.02 * np.log(lr_i / (0.5 * c ** -0.12)) ** 2 + 0.01 * np.log(b_i / (0.3 * c ** 0.33)) ** 2
        rows.append((n, c / (6 * n), float(law.loss(n, c / (6 * n))) + bowl, c, lr_i, b_i))
    path = tmp_path / "runs.csv"
    path.write_text("N,D,loss,flops,lr,batch_tokens\n" + "".join(",".join(map(repr, map(float, r))) + "\n" for r in rows))
    out = tmp_path / "law.json"
    r = cli("fit", path, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "hyperparameter laws" in r.stdout
    fitted = hparams.hyperparameter_law_from_file(out)
    assert fitted.compute == "training"
    assert fitted.lr_exponent == pytest.approx(-0.12, abs=0.02) and fitted.batch_exponent == pytest.approx(0.33, abs=0.02)
    saved = json.loads(out.read_text())
    # the grids' mistuned runs are not in the loss law: it is the epoch law
    assert saved["alpha"] == pytest.approx(law.alpha, rel=0.02) and saved["beta"] == pytest.approx(law.beta, rel=0.02)


def test_a_fixed_batch_replaces_the_laws_and_the_warmup_follows_it():
    hp = hparams.hyperparameters(1e15, tokens=1e7, seq_len=128, batch_tokens=256 * 128)
    assert hp["batch_tokens"] == 256 * 128
    assert hp["warmup_steps"] == max(1, int(0.1 * math.ceil(1e7 / (256 * 128))))


def test_a_grid_at_one_budget_warns_and_the_loss_law_is_still_fitted(tmp_path, cli):
    import numpy as np

    from scalelab.scaling.laws import LAWS

    law = LAWS["epoch"]
    rows = [(n, c / (6 * n), float(law.loss(n, c / (6 * n))), c, 1e-3, 1e5)
            for c in (1e18, 1e19, 1e20) for n in law.optimal_n(c) * np.geomspace(1 / 4, 4, 6)]
    C, _, lr, batch, loss = synthetic_grid(budgets=(1e19,))
    n = float(law.optimal_n(1e19))
    rows += [(n, 1e19 / (6 * n), float(law.loss(n, 1e19 / (6 * n))) + l - loss.min(), c, a, b)
             for c, a, b, l in zip(C, lr, batch, loss)]
    path = tmp_path / "runs.csv"
    path.write_text("N,D,loss,flops,lr,batch_tokens\n" + "".join(",".join(map(repr, map(float, r))) + "\n" for r in rows))
    r = cli("fit", path, "--out", tmp_path / "law.json")
    assert r.returncode == 0, r.stderr
    assert "no hyperparameter law fitted" in r.stderr and "at 2 or more budgets" in r.stderr
    assert hparams.hyperparameter_law_from_file(tmp_path / "law.json") is None
