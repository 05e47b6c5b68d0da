"""The WSD (warmup-stable-decay) schedule and branching a decay from a stable run's checkpoint:
the schedule's values against their closed forms, and a branch taken at step k of a stable run
against the uninterrupted WSD run of the same length (the same losses, step for step)."""

from __future__ import annotations

import math
import re

import pytest

from scalelab.errors import UserError
from scalelab.train.schedule import learning_rate
from test_train import data_dir, losses, train_inprocess, write_config  # noqa: F401 (data_dir: a fixture)

LR, MIN = 1.0, 0.1


def wsd(step: int, shape: str, total: int = 20, decay: int = 5, warmup: int = 4) -> float:
    return learning_rate(step, lr=LR, min_lr=MIN, warmup=warmup, total=total, schedule="wsd", decay=decay,
                         decay_shape=shape)


@pytest.mark.parametrize("shape, truth", [
    # the decay's 5 steps are at p = 1/5 .. 5/5
    ("linear", lambda p: 1.0 - 0.9 * p),
    ("cosine", lambda p: 0.1 + 0.45 * (1 + math.cos(math.pi * p))),
    ("1-sqrt", lambda p: 0.1 + 0.9 * (1 - math.sqrt(p))),
])
def test_wsd_schedule_is_warmup_then_flat_then_the_decay_shape(shape, truth):
    assert [wsd(s, shape) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert [wsd(s, shape) for s in range(4, 15)] == [1.0] * 11  # stable: exactly the peak
    assert [wsd(s, shape) for s in range(15, 20)] == pytest.approx([truth(k / 5) for k in range(1, 6)])
    assert wsd(19, shape) == pytest.approx(MIN)  # the last step is at min_lr
    # hand values at the decay's midpoint region (p = 3/5)
    assert wsd(17, "linear") == pytest.approx(0.46)
    assert wsd(17, "1-sqrt") == pytest.approx(0.1 + 0.9 * (1 - 0.7745966692414834))


def test_wsd_stable_phase_does_not_depend_on_the_run_length():
    """What makes branching possible: runs of any length agree with each other (and with a
    constant schedule) on every step before their decay."""
    constant = [learning_rate(s, lr=LR, min_lr=MIN, warmup=4, total=10**6, schedule="constant") for s in range(50)]
    for total, decay in ((30, 6), (40, 10), (50, 3)):
        lrs = [wsd(s, "1-sqrt", total=total, decay=decay) for s in range(total - decay)]
        assert lrs == constant[:total - decay]


def test_wsd_config_keys_resolve_fractions_and_refuse_impossible_lengths():
    from scalelab.train.config import schedule_problem, schedule_settings

    s = schedule_settings({"lr": 1.0, "min_lr": 0.0, "warmup": 10, "schedule": "wsd", "decay": 0.25}, 200)
    assert (s["warmup"], s["decay"], s["decay_shape"]) == (10, 50, "1-sqrt")
    assert schedule_problem(s) is None
    assert "exceed the run's 12 steps" in schedule_problem(dict(s, total=12, decay=3))
    assert "at least one step" in schedule_problem(dict(s, decay=0))


def stable_and_wsd_configs(tmp_path, data_dir, total: int, decay: int):
    """A stable run (constant after warmup, checkpoints every 4 steps, all kept) and the WSD config
    of `total` steps decaying over the last `decay`."""
    base = write_config(tmp_path / "base.toml", data_dir, steps=total, ckpt_every=4, schedule="wsd")
    base.write_text(base.read_text().replace("keep = 2", "keep = 100").replace(
        'schedule = "wsd"', f'schedule = "wsd"\ndecay = {decay}\ndecay_shape = "cosine"'))
    stable = tmp_path / "stable.toml"
    stable.write_text(base.read_text().replace(f"max_steps = {total}", "max_steps = 16").replace(
        'schedule = "wsd"', 'schedule = "constant"'))
    return stable, base


def test_a_branch_from_step_k_equals_the_uninterrupted_wsd_run(tmp_path, data_dir):
    stable, wsd_cfg = stable_and_wsd_configs(tmp_path, data_dir, total=12, decay=4)
    train_inprocess(stable, tmp_path / "stable")
    train_inprocess(wsd_cfg, tmp_path / "whole")
    k8 = tmp_path / "stable" / "checkpoints" / "step_00000008"
    assert k8.is_dir()
    summary = train_inprocess(wsd_cfg, tmp_path / "branch", [f"train.branch_from={k8}"])
    whole, branch, base = losses(tmp_path / "whole"), losses(tmp_path / "branch"), losses(tmp_path / "stable")
    assert sorted(branch) == list(range(9, 13))  # it trained only the decay
    assert [branch[s] for s in range(9, 13)] == [whole[s] for s in range(9, 13)]  # bit for bit (fp32, deterministic)
    assert [base[s] for s in range(1, 9)] == [whole[s] for s in range(1, 9)]
    assert summary["tokens"] == 12 * 256 and summary["step"] == 12
    # resuming the finished branch reports it complete; its checkpoint records where it came from
    from scalelab.train.checkpoint import latest_checkpoint, load_trainer_state

    state = load_trainer_state(latest_checkpoint(tmp_path / "branch"))
    assert state["branch_from"] == str(k8.resolve()) and state["flops"] == summary["flops"]


def test_a_branch_whose_schedule_differs_from_the_source_is_refused(tmp_path, data_dir):
    stable, wsd_cfg = stable_and_wsd_configs(tmp_path, data_dir, total=12, decay=4)
    train_inprocess(stable, tmp_path / "stable")
    k8 = tmp_path / "stable" / "checkpoints" / "step_00000008"
    for overrides, shown in [(["train.lr=1e-3"], "the learning rate at step 1"),
                             (["train.seed=8"], "train.seed 7 -> 8"),
                             (["train.decay=6"], "step 8 is past this run's decay start, step 6")]:
        with pytest.raises(UserError, match=re.escape(shown)):
            train_inprocess(wsd_cfg, tmp_path / f"b{len(shown)}", [f"train.branch_from={k8}", *overrides])
        assert not (tmp_path / f"b{len(shown)}" / "checkpoints").exists()
