"""`scalelab sweep`: design (D exact from C, centred on the planner's optimum, WSD cheaper for the same
points, fingerprints, A/B variants), run through submitit (kill midway and rerun: nothing finished is
retrained; failures retried then reported; Slurm by its generated sbatch scripts), status, verify.
Tiny models on the byte-level word corpus of test_train; each run is a few dozen steps."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train import data_dir  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
# A CPU-sized space for the byte corpus (vocabulary 258): widths 32..128, 1..4 layers, heads of 16.
SPACE = ["--style", "llama3", "--hidden", "32:128:16", "--layers", "1:4", "--head-dims", "16", "--kv-heads", "1",
         "--seq-len", "32", "--aspect", "none", "--batch-tokens", "256", "--hparams", "width:3e-3@64",
         "--law", "shakespeare-cpu", "--spread", "0.3", "--gpus", "1", "--gpu-type", "H100"]


def main(*argv: str) -> tuple[int, str, str]:
    from scalelab.cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli_main([str(a) for a in argv])
        except SystemExit as e:
            rc = int(e.code or 0)
    return rc, out.getvalue(), err.getvalue()


def design(out: Path, data: Path, *extra: str, budgets: str = "4e8,8e8,1.6e9") -> dict:
    rc, stdout, stderr = main("sweep", "design", out, "--budgets", budgets, "--data", data, *SPACE, *extra, "--json")
    assert rc == 0, stderr
    return json.loads(stdout)


def cli(*args, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "scalelab", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, **kw)


# ---- design ----------------------------------------------------------------------------------------

def test_design_spends_each_budget_exactly_and_centres_on_the_planner(tmp_path, data_dir):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from scalelab.model import Transformer
    from scalelab.presets import resolve_model_section

    result = design(tmp_path / "s", data_dir, "--points", "3")
    runs = result["runs"]
    budgets = result["design"]["budgets"]
    assert {r["budget"] for r in runs} == set(budgets)
    for r in runs:
        assert r["tokens_exact"] * r["flops_per_token"] == pytest.approx(r["budget"], rel=1e-12)
        t = r["config"]["train"]
        assert r["steps"] == t["max_steps"] == math.ceil(r["tokens_exact"] / t["global_batch_tokens"])
    # the FLOPs per token the design divides by are what torch counts in a training step
    r = runs[0]
    cfg = resolve_model_section(r["config"]["model"])
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    with FlopCounterMode(display=False) as counted:
        Transformer(cfg, attention="math")(x, x)[1].backward()
    assert counted.get_total_flops() == r["flops_per_token"] * 2 * 32
    # each budget's ladder holds the planner's optimum in the same space (or its nearest grid shape)
    for C in budgets:
        rc, stdout, _ = main("plan", f"{C:g}", *SPACE[:14], "--vocab", "258", "--max-tokens", "74671",
                             "--law", "shakespeare-cpu", "--json")
        assert rc == 0
        best = json.loads(stdout)["best"]
        sampled = [x["N"] for x in runs if x["budget"] == C]
        step = 2 * 0.3 / (3 - 1)
        assert min(abs(math.log10(n / best["N"])) for n in sampled) <= step / 2 + 1e-9


def test_wsd_design_trains_the_isoflop_points_as_branches_for_fewer_flops(tmp_path, data_dir):
    from scalelab.train.checkpoint import CHECKPOINTS, checkpoint_name

    iso = design(tmp_path / "iso", data_dir)
    wsd = design(tmp_path / "wsd", data_dir, "--method", "wsd")

    def key(r):
        return r["budget"], r["shape"], r["steps"], r["config"]["train"]["global_batch_tokens"]

    branches = [r for r in wsd["runs"] if r["kind"] == "branch"]
    assert sorted(map(key, branches)) == sorted(map(key, iso["runs"]))  # the same points
    assert wsd["cost"]["isoflop_flops"] == pytest.approx(iso["cost"]["flops"])
    assert wsd["cost"]["flops"] < 0.9 * iso["cost"]["flops"]
    stables = {r["name"]: r for r in wsd["runs"] if r["kind"] == "stable"}
    for b in branches:
        stable = stables[b["branch_of"]]
        k, every = b["branch_step"], stable["config"]["checkpoint"]["every"]
        assert k % every == 0 and k <= stable["steps"] and b["steps"] - k == b["decay_steps"] >= 1
        assert b["config"]["train"]["branch_from"] == f"{stable['run_dir']}/{CHECKPOINTS}/{checkpoint_name(k)}"
        assert b["config"]["train"]["decay"] == b["decay_steps"]
        assert stable["config"]["train"]["schedule"] == "constant" and b["config"]["train"]["schedule"] == "wsd"
        for key_ in ("lr", "warmup", "global_batch_tokens", "seed"):
            assert stable["config"]["train"].get(key_) == b["config"]["train"].get(key_)


def test_compare_designs_the_same_ladder_per_variant(tmp_path, data_dir):
    from scalelab import counting
    from scalelab.presets import resolve_model_section

    result = design(tmp_path / "ab", data_dir, "--compare", "ffn_type=swiglu,gelu")
    by_variant: dict[str, list] = {}
    for r in result["runs"]:
        by_variant.setdefault(r["variant"], []).append(r)
    assert sorted(by_variant) == ["ffn_type=gelu", "ffn_type=swiglu"]
    a, b = by_variant["ffn_type=swiglu"], by_variant["ffn_type=gelu"]
    assert [(r["budget"], r["shape"]) for r in a] == [(r["budget"], r["shape"]) for r in b]
    for r in a + b:
        cfg = resolve_model_section(r["config"]["model"])
        assert cfg.ffn_type == r["variant"].split("=")[1]
        assert r["tokens_exact"] == pytest.approx(r["budget"] / counting.training_flops_per_token(cfg, 32), rel=1e-12)
        assert r["run_dir"].startswith(f"runs/{r['variant']}/")


def test_a_sweep_directory_belongs_to_one_design(tmp_path, data_dir):
    out = tmp_path / "s"
    design(out, data_dir)
    before = (out / "sweep.toml").read_bytes()
    rc, _, stderr = main("sweep", "design", out, "--budgets", "4e8,8e8,1.6e9", "--data", data_dir, *SPACE)
    assert rc == 0 and "unchanged" in stderr
    rc, _, stderr = main("sweep", "design", out, "--budgets", "4e8,8e8,3.2e9", "--data", data_dir, *SPACE)
    assert rc == 2 and "holds a sweep of another design" in stderr and len(stderr.strip().splitlines()) == 1
    assert (out / "sweep.toml").read_bytes() == before
    # a hand-edited sweep file is refused by every step that reads it
    (out / "sweep.toml").write_text(before.decode().replace("max_steps = ", "max_steps = 1", 1))
    rc, _, stderr = main("sweep", "status", out)
    assert rc == 2 and "no longer match its fingerprint" in stderr


# ---- run -------------------------------------------------------------------------------------------

def test_killing_sweep_run_midway_and_rerunning_retrains_nothing_finished(tmp_path, data_dir):
    out = tmp_path / "s"
    result = design(out, data_dir, "--points", "2")
    names = [r["name"] for r in result["runs"]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "scalelab", "sweep", "run", str(out), "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    from scalelab.sweep.execute import status_rows

    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline:
            states = {r["name"]: r["state"] for r in status_rows(out)}
            if list(states.values()).count("done") >= 1 and "running" in states.values():
                break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        else:
            raise AssertionError(f"no run finished in time: {states}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its job processes, at once
        proc.wait()
    finished = [n for n, s in states.items() if s == "done"]
    snapshot = {n: (out / "runs" / n / "metrics.jsonl").read_bytes() for n in finished}
    time.sleep(0.5)
    r = cli("sweep", "run", out, "--threads", "1")
    assert r.returncode == 0, r.stderr
    rows = {x["name"]: x for x in status_rows(out)}
    assert all(rows[n]["state"] == "done" for n in names), rows
    for n in finished:  # not retrained: their logs are byte-identical
        assert (out / "runs" / n / "metrics.jsonl").read_bytes() == snapshot[n]
    r = cli("sweep", "status", out)
    assert r.returncode == 0 and f"{len(names)} done" in r.stdout


def test_a_failing_run_is_retried_then_reported(tmp_path, data_dir):
    out = tmp_path / "s"
    result = design(out, data_dir, "--points", "2", budgets="4e8,8e8")
    bad = result["runs"][0]
    (out / bad["run_dir"]).parent.mkdir(parents=True, exist_ok=True)
    (out / bad["run_dir"]).write_text("a file where the run directory goes\n")  # the trainer refuses it
    r = cli("sweep", "run", out, "--threads", "1", "--retries", "1")
    assert r.returncode == 1
    assert f"not done: {bad['name']}" in r.stdout
    state = json.loads((out / "state.json").read_text())[bad["name"]]
    assert state["attempts"] == 2 and state["failed"] and "is a file" in state["error"]
    status = cli("sweep", "status", out).stdout
    assert f"{bad['name']} failed:" in status and f"{len(result['runs']) - 1} done" in status


def test_slurm_dry_run_writes_the_sbatch_scripts_submitit_would_submit(tmp_path, data_dir):
    out = tmp_path / "s"
    result = design(out, data_dir, "--points", "2", "--method", "wsd")
    rc, stdout, stderr = main("sweep", "run", out, "--executor", "slurm", "--dry-run", "--gpus-per-run", "8",
                              "--slurm", "partition=gpu", "--timeout-min", "90")
    assert rc == 0, stderr
    scripts = sorted((out / "slurm").glob("*.sbatch"))
    assert len(scripts) == len(result["runs"])
    text = scripts[0].read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=8", "#SBATCH --time=90", "#SBATCH --nodes=1",
                 "#SBATCH --ntasks-per-node=1", "-m submitit.core._submit"):
        assert line in text, text
    assert not (out / "runs").exists()  # nothing ran


# ---- verify -----------------------------------------------------------------------------------------

def test_verify_trains_the_recommendation_and_compares_the_loss(tmp_path, data_dir):
    from scalelab import counting
    from scalelab.presets import resolve_model_section

    out = tmp_path / "s"
    result = design(out, data_dir, "--points", "2", budgets="4e8,8e8")
    model = dict(result["runs"][0]["config"]["model"], n_layer=2)
    cfg = resolve_model_section(model)
    fpt = counting.training_flops_per_token(cfg, 32)
    fit = {"format": 1, "fingerprint": result["fingerprint"], "budget": 8e9, "largest_budget": 8e8,
           "recommendation": {"C": 8e9, "config": model, "name": cfg.name(), "N": 1.0, "D": 4096.0, "seq_len": 32,
                              "steps": 16, "flops_per_token": fpt, "loss": 3.0, "loss_interval_95": [2.0, 9.0],
                              "hyperparameters": {"peak_lr": 3e-3, "min_lr": 3e-4, "batch_tokens": 256,
                                                  "warmup": 2.0, "schedule": "cosine"}}}
    (out / "fit.json").write_text(json.dumps(fit))
    rc, _, stderr = main("sweep", "verify", out, "--budget", "1e10")
    assert rc == 2 and "not --budget 1e+10" in stderr
    r = cli("sweep", "verify", out, "--budget", "8e9", "--json")
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)
    run_dir = out / "verify" / "C8e+09"
    from scalelab.scaling.fit import read_run_dir

    n, d, measured, _, _ = read_run_dir(run_dir)
    assert v["measured"] == measured and d == 16 * 256 and v["predicted"] == 3.0
    assert v["N"] == counting.count_params(cfg).total and v["inside"] == (2.0 <= measured <= 9.0)
    assert v["extrapolation"] == pytest.approx(10.0)
    assert "n_layer = 2" in (run_dir / "config.toml").read_text()
    assert json.loads((out / "verify.json").read_text())["measured"] == measured


def test_design_with_hardware_and_status_import_no_torch(tmp_path, data_dir):
    from conftest import heavy_modules_loaded

    out = tmp_path / "s"
    argv = ["sweep", "design", str(out), "--budgets", "4e8,8e8", "--data", str(data_dir), *SPACE]
    assert heavy_modules_loaded(argv) == []
    assert (out / "sweep.toml").is_file()
    assert heavy_modules_loaded(["sweep", "status", str(out)]) == []


def test_tune_lr_adds_the_grids_sweep_fit_fits_hyperparameter_laws_to(tmp_path, data_dir):
    from scalelab.scaling.hparams import grid_groups

    result = design(tmp_path / "t", data_dir, "--points", "3", "--tune-lr", budgets="2e9,4e9,8e9")
    runs = result["runs"]
    tune = [r for r in runs if r["kind"] == "tune"]
    assert sorted({r["budget"] for r in tune}) == [2e9, 4e9]  # the two smallest budgets
    grids = grid_groups([r["flops"] for r in runs], [r["N"] for r in runs],
                        [r["config"]["train"]["lr"] for r in runs],
                        [r["config"]["train"]["global_batch_tokens"] for r in runs])
    assert len(grids) == 2 and all(len(g) == 9 for g in grids)  # 3 x 3 each: the point's own run and 8 more
    for g in grids:
        base = next(runs[i] for i in g if runs[i]["kind"] == "isoflop")
        lrs = sorted({runs[i]["config"]["train"]["lr"] / base["config"]["train"]["lr"] for i in g})
        batch = base["config"]["train"]["global_batch_tokens"]
        batches = sorted({runs[i]["config"]["train"]["global_batch_tokens"] / batch for i in g})
        assert lrs == pytest.approx([0.5, 1, 2]) and batches == pytest.approx([0.5, 1, 2])
        for i in g:
            r = runs[i]
            assert r["tokens_exact"] * r["flops_per_token"] == pytest.approx(r["budget"], rel=1e-12)


def test_a_run_of_several_processes_trains_under_torchrun_inside_its_job(tmp_path, data_dir):
    """--gpus-per-run G: the job launches `torchrun --nproc-per-node G` (on a CPU: G gloo ranks)."""
    from scalelab.train.checkpoint import latest_checkpoint, load_trainer_state

    out = tmp_path / "s"
    result = design(out, data_dir, "--points", "2", budgets="8e8")
    r = cli("sweep", "run", out, "--gpus-per-run", "2", "--threads", "1")
    assert r.returncode == 0, r.stderr
    for run in result["runs"]:
        state = load_trainer_state(latest_checkpoint(out / run["run_dir"]))
        assert state["world_size"] == 2 and state["step"] == run["steps"]
        assert (out / "jobs" / f"{run['name']}.toml").is_file()  # the config torchrun's ranks read


def test_the_cpu_time_estimate_measures_one_thread_as_each_parallel_run_trains(tmp_path, data_dir, monkeypatch):
    """torch's default thread count (every core) measured 0.8 GFLOP/s on 2 shared cores against 30 on one
    thread, and the design printed 117 min for runs `sweep run --parallel 2` (one thread each) did in 2.
    Now the measuring steps run on one thread (and the caller's thread count is restored)."""
    import torch

    from scalelab.cli.sweep import measure_cpu_flops
    from scalelab.model import Transformer

    result = design(tmp_path / "s", data_dir)
    seen = []
    forward = Transformer.forward
    monkeypatch.setattr(Transformer, "forward", lambda self, *a, **k: (seen.append(torch.get_num_threads()),
                                                                      forward(self, *a, **k))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert measure_cpu_flops(result) > 0
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_ladder_cut_off_by_max_tokens_says_so_not_widen_the_space(tmp_path, data_dir):
    """The Shakespeare study's 6e11 ladder started at 32K because its 15.5K shape would need more tokens than the
    data has; the note said to widen --hidden (already at its smallest width). Now it names --max-tokens. At
    the smaller budgets, where the space itself ends, the note still says to widen it."""
    prior = tmp_path / "prior.json"
    prior.write_text(json.dumps({"E": 1.69, "A": 20.0, "B": 410.7, "alpha": 0.34, "beta": 0.28}))  # optimum small
    space = [str(prior) if a == "shakespeare-cpu" else "--law-file" if a == "--law" else a for a in SPACE]
    rc, _, err = main("sweep", "design", tmp_path / "t", "--budgets", "4e8,8e8,1.6e9", "--data", data_dir, *space,
                      "--max-tokens", "8000")
    assert rc == 0, err
    notes = {line.split(":")[2].strip().split()[1]: line for line in err.splitlines() if "at the edge of" in line}
    assert "more tokens than --max-tokens" in notes["1.6e+09"] and "widen --hidden" not in notes["1.6e+09"]
    assert "widen --hidden" in notes["4e+08"]


def test_sigterm_interrupts_sweep_run_as_ctrl_c_does():
    """`sweep run` turns SIGTERM (kill, a scheduler's stop) into the KeyboardInterrupt whose handler
    cancels its jobs, and puts the old handler back afterwards."""
    from scalelab.sweep.execute import _interrupt_on_sigterm

    before = signal.getsignal(signal.SIGTERM)
    previous = _interrupt_on_sigterm()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode; never reached
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert previous is before and signal.getsignal(signal.SIGTERM) is before
