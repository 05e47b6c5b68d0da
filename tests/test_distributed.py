"""torchrun on CPU (gloo): DDP and FSDP2 over 2 processes reproduce the single-process per-step losses
for the same global batch, and sharded (DCP) checkpoints move between 2 ranks and 1. The model ties
its embeddings, so FSDP's strict load of rank 0's broadcast covers one parameter under two names.

Each test gets its inputs from fixtures (no test reads another's output), and torchrun is launched
as few times as that allows: the FSDP run is one fixture shared by the tests that read it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import cli, env_1thread, losses, make_corpus_dir, read_stderr_until, write_config

pytestmark = pytest.mark.slow

STEPS = 6


def torchrun(*args, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "scalelab", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env_1thread(), timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    data = make_corpus_dir(d / "data")
    cfg = write_config(d / "c.toml", data, steps=STEPS, ckpt_every=3)
    tied = cfg.read_text().replace("block_size = 64\n", "block_size = 64\ntie_embeddings = true\n", 1)
    assert "tie_embeddings" in tied
    cfg.write_text(tied)
    # single process: micro-batch 4 × seq 32 × accumulation 2 = 256 tokens per step
    r = cli("train", cfg, "--run-dir", d / "single")
    assert r.returncode == 0, r.stderr
    return d, cfg, losses(d / "single")


@pytest.fixture(scope="module")
def fsdp_run(setup) -> tuple[Path, subprocess.CompletedProcess]:
    """The setup's config trained by 2 FSDP ranks."""
    d, cfg, _ = setup
    r = torchrun("train", cfg, "--run-dir", d / "fsdp", "--set", "parallel.strategy=fsdp")
    return d / "fsdp", r


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(setup, strategy, request):
    d, cfg, single = setup
    if strategy == "fsdp":
        run, r = request.getfixturevalue("fsdp_run")
    else:
        run = d / strategy
        r = torchrun("train", cfg, "--run-dir", run, "--set", f"parallel.strategy={strategy}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"on 2 × cpu [{strategy}, fp32]" in r.stderr and "accum 1 × world 2" in r.stderr
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(got[step] - single[step]) < 1e-5, (strategy, step, got[step], single[step])
    assert single[STEPS] < single[1] - 0.2  # it trained
    if strategy == "fsdp":  # sharded checkpoint: DCP files from both ranks, no full safetensors
        ckpt = run / "checkpoints" / "step_00000003"
        assert (ckpt / "dcp" / ".metadata").is_file() and not (ckpt / "model.safetensors").exists()
        assert (ckpt / "rng_rank1.pt").is_file()
        assert (run / "final" / "model.safetensors").is_file()  # gathered for export/sampling
        # sampling from the sharded checkpoint (read in one process) equals sampling from the gathered weights
        a = cli("sample", run, "--prompt", "the", "--max-new-tokens", "20", "--seed", "3", "--no-stop")
        b = cli("sample", run / "final", "--prompt", "the", "--max-new-tokens", "20", "--seed", "3", "--no-stop")
        assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.startswith("the"), a.stderr + b.stderr
        assert a.stderr == ""


def _restart_from_step3(src: Path, dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / "step_00000003", dst / "checkpoints" / "step_00000003")
    shutil.copy2(src / "config.toml", dst / "config.toml")  # the run's marker: train writes only into runs


def test_fsdp_checkpoint_from_two_ranks_resumes_on_one(setup, fsdp_run):
    d, cfg, single = setup
    fsdp, r = fsdp_run
    assert r.returncode == 0, r.stderr[-3000:]
    run = d / "fsdp_to_1"
    _restart_from_step3(fsdp, run)
    r = cli("train", cfg, "--run-dir", run)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr and "at step 3" in r.stderr
    got = losses(run)
    for step in range(4, STEPS + 1):
        assert abs(got[step] - single[step]) < 1e-5, (step, got[step], single[step])


def test_single_checkpoint_resumes_on_two_fsdp_ranks(setup):
    d, cfg, single = setup
    run = d / "1_to_fsdp"
    _restart_from_step3(d / "single", run)
    r = torchrun("train", cfg, "--run-dir", run, "--set", "parallel.strategy=fsdp")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 3" in r.stderr, r.stderr[-3000:]
    got = losses(run)
    for step in range(4, STEPS + 1):
        assert abs(got[step] - single[step]) < 1e-5, (step, got, single, r.stderr[-2000:])


def test_ctrl_c_under_torchrun_checkpoints(setup):
    """Ctrl-C reaches torchrun and both workers, and torchrun re-sends it: the workers still agree
    on a step, write one complete checkpoint and exit."""
    import os
    import signal

    import torch

    from scalelab.train.checkpoint import list_checkpoints

    d, cfg, _ = setup
    run = d / "ctrl_c"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scalelab",
           "train", str(cfg), "--run-dir", str(run), "--set", "train.max_steps=100000", "--set", "checkpoint.every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_1thread(),
                            start_new_session=True)
    read_stderr_until(proc, "step 3/100000 ")  # rank 0 logs it after writing step 3 to metrics.jsonl
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does
    _, err = proc.communicate(timeout=120)
    assert "stopped at step" in err, err[-3000:]
    (step, path), = list_checkpoints(run)
    assert 3 <= step < 100000
    assert torch.load(path / "trainer.pt", weights_only=True)["step"] == step
    assert (path / "dcp").is_dir() is False and (path / "model.safetensors").is_file()  # DDP: full weights


def test_a_held_run_directory_stops_every_rank(setup, tmp_path):
    """Rank 0 finds the run directory locked (here by this test, as another run would hold it) and
    decides; every rank raises the same one-line error and torchrun ends at once (no rank is left
    waiting in a collective)."""
    import fcntl
    import os

    _, cfg, _ = setup
    run = tmp_path / "held"
    run.mkdir()
    with open(run / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(f"{os.getpid()} testhost\n")
        lock.flush()
        r = torchrun("train", cfg, "--run-dir", run, "--set", "parallel.strategy=fsdp")
    assert r.returncode != 0
    # each rank's error (split on the prefix, not on lines: two processes share this stderr)
    refused = [part.split("\n")[0] for part in r.stderr.split("scalelab train: error:")[1:]]
    assert len(refused) == 2 and refused[0] == refused[1], r.stderr[-3000:]
    assert f"in use by another scalelab train (pid {os.getpid()} on testhost" in refused[0]
    assert "exitcode  : 2 " in r.stderr  # torchrun's report (it may stop the second worker once the first exits)
    assert "src/scalelab" not in r.stderr  # the only traceback is torchrun's own report of the failure
    assert sorted(p.name for p in run.iterdir()) == [".lock"]
