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
