"""Training checkpoints: durable staging, integrity (manifest + structure) with fallback to the
previous intact checkpoint, disk full during a save, helpful errors for directories that hold a
run below them, and the housekeeping around them (latest, pruning, leftovers, re-saves).

Truth for the resume tests is an uninterrupted run of the same config: a resume that falls back
past a damaged checkpoint must reproduce its per-step losses exactly (fp32, deterministic)."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scalelab.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over lazy dog while seven small cats watch from a tall green tree".split()

CONFIG = """
[model]
style = "llama3"
n_layer = 2
n_embd = 32
n_head = 4
vocab_size = 258
block_size = 32

[data]
dir = "{data}"

[train]
seq_len = 16
micro_batch_size = 4
global_batch_tokens = 64
max_steps = {steps}
lr = 3e-3
min_lr = 3e-4
warmup = 2
dtype = "fp32"
deterministic = true
seed = 3

[eval]
every = 0
at_end = false

[checkpoint]
every = 4
keep = 2

[logging]
every = 1
"""


# ---- helpers -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from scalelab.data.prepare import prepare

    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 30))) + ".\n" for _ in range(120)]
    out = tmp_path_factory.mktemp("data") / "words"
    prepare([(t, True) for t in texts], "byte", out, val_fraction=0.1, progress=False)
    return out


def write_config(path: Path, data: Path, steps: int = 12) -> Path:
    path.write_text(CONFIG.format(data=data, steps=steps))
    return path


def train_logged(config: Path, run_dir: Path, overrides=()) -> tuple[dict, list[str]]:
    """Train in this process (one thread, as every run here: same summation order); return the
    summary and the lines the trainer logged."""
    import torch

    from scalelab.train.config import load_config
    from scalelab.train.trainer import train

    lines: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(load_config(config, list(overrides)), run_dir, log=lines.append), lines
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)


def losses(run_dir: Path) -> dict[int, float]:
    from scalelab.train.metrics import read_metrics

    records = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert len(records) == len({r["step"] for r in records}), "a step was logged twice"
    return {r["step"]: r["loss"] for r in records}


def cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "scalelab", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=240)


def truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_dir) -> tuple[Path, Path]:
    """(config, run) of 12 uninterrupted steps; checkpoints at 8 and 12 (keep = 2)."""
    d = tmp_path_factory.mktemp("straight")
    cfg = write_config(d / "c.toml", data_dir)
    train_logged(cfg, d / "run")
    assert [p.name for _, p in __import__("scalelab.train.checkpoint", fromlist=["x"]).list_checkpoints(d / "run")] \
        == ["step_00000008", "step_00000012"]
    return cfg, d / "run"


@pytest.fixture
def sized_fs(tmp_path):
    """Mount a tmpfs of the given size (a real filesystem that fills up: ENOSPC); skip where mount
    is not permitted."""
    from conftest import mounted_tmpfs

    names = itertools.count()
    with contextlib.ExitStack() as mounts:
        yield lambda size: mounts.enter_context(mounted_tmpfs(tmp_path / f"fs{next(names)}", f"size={size}"))


def fill(fs: Path, leave: int) -> None:
    """Use up all but about `leave` bytes of filesystem `fs` with a filler file."""
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    with open(fs / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def tiny_model_and_optimizer():
    import torch

    from scalelab.model import Transformer
    from scalelab.presets import style_config

    torch.manual_seed(0)
    cfg = style_config("llama3", 2, 32, 4, vocab_size=258, block_size=32)
    model = Transformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 258, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    optimizer.step()
    return model, optimizer


def save(run: Path, step: int, model, optimizer, keep: int = 3) -> Path:
    from scalelab.train.checkpoint import save_checkpoint
    from scalelab.train.parallel import Dist

    return save_checkpoint(run, step, model, optimizer, {"step": step}, strategy="none", d=Dist(), keep=keep)


def hidden_entries(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("."))


# ---- staging: fsync'd, umask-respecting, with a manifest --------------------------------------------

def test_checkpoint_is_staged_durably_with_umask_and_manifest(tmp_path, monkeypatch):
    from scalelab import files
    from scalelab.train.checkpoint import MANIFEST, verify_checkpoint

    synced = []
    real_fsync = files.fsync_path
    monkeypatch.setattr(files, "fsync_path", lambda p: (synced.append(Path(p)), real_fsync(p)))
    old_mask = os.umask(0o002)
    try:
        model, optimizer = tiny_model_and_optimizer()
        final = save(tmp_path / "run", 5, model, optimizer)
    finally:
        os.umask(old_mask)
    root = tmp_path / "run" / "checkpoints"
    assert final == root / "step_00000005" and verify_checkpoint(final) is None
    assert (root / "latest").read_text() == "step_00000005\n"
    # group-readable as the umask asks (mkdtemp/mkstemp alone would give 0700 / 0600)
    assert final.stat().st_mode & 0o777 == 0o775
    assert all(p.stat().st_mode & 0o777 == 0o664 for p in final.iterdir())
    # the checkpoints directory was fsynced after the rename, and the files before it
    assert root in synced and any(p.parent.name == ".step_00000005.partial" for p in synced)
    manifest = json.loads((final / MANIFEST).read_text())["files"]
    on_disk = {p.relative_to(final).as_posix(): p.stat().st_size for p in final.rglob("*") if p.is_file()}
    assert {rel: e["size"] for rel, e in manifest.items()} == {k: v for k, v in on_disk.items() if k != MANIFEST}
    assert "trainer.pt" in manifest and "sha256" in manifest["trainer.pt"]
    assert hidden_entries(tmp_path / "run") == []


# ---- integrity: fall back past a damaged newest checkpoint ------------------------------------------

@pytest.mark.parametrize("damaged", ["optimizer.pt", "trainer.pt", "rng_rank0.pt", "model.safetensors"])
def test_resume_falls_back_past_truncated_file(straight_run, tmp_path, damaged):
    cfg, straight = straight_run
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    truncate(run / "checkpoints" / "step_00000012" / damaged)
    summary, log = train_logged(cfg, run)
    warnings = [line for line in log if "damaged" in line]
    assert len(warnings) == 1, log
    assert "step_00000012" in warnings[0] and damaged in warnings[0], warnings[0]
    assert any(f"resumed from {run}/checkpoints/step_00000008 at step 8" in line for line in log), log
    assert summary["step"] == 12
    assert losses(run) == losses(straight)  # steps 9..12 recomputed exactly as the uninterrupted run did


def test_checkpoint_without_manifest_is_still_verified(straight_run, tmp_path):
    """Checkpoints written before manifests existed: what can be verified (required files, each
    file's structure) still is."""
    from scalelab.train.checkpoint import latest_checkpoint, verify_checkpoint

    run = tmp_path / "run"
    shutil.copytree(straight_run[1], run)
    for step in (8, 12):
        (run / "checkpoints" / f"step_{step:08d}" / "manifest.json").unlink()
    assert verify_checkpoint(run / "checkpoints" / "step_00000012") is None
    truncate(run / "checkpoints" / "step_00000012" / "optimizer.pt", keep=0.9)
    warned = []
    assert latest_checkpoint(run, warn=warned.append) == run / "checkpoints" / "step_00000008"
    assert len(warned) == 1 and "optimizer.pt" in warned[0]
    (run / "checkpoints" / "step_00000008" / "rng_rank0.pt").unlink()
    with pytest.raises(UserError, match=r"no intact checkpoint.*rng_rank0.pt is missing.*new --run-dir"):
        latest_checkpoint(run)


def test_same_size_corruption_of_small_file_is_caught_by_hash(straight_run, tmp_path):
    from scalelab.train.checkpoint import verify_checkpoint

    ckpt = tmp_path / "step"
    shutil.copytree(straight_run[1] / "checkpoints" / "step_00000012", ckpt)
    data = bytearray((ckpt / "rng_rank0.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ckpt / "rng_rank0.pt").write_bytes(bytes(data))
    assert "rng_rank0.pt does not match its SHA-256" in verify_checkpoint(ckpt)


def test_no_intact_checkpoint_is_one_line_exit_2(straight_run, tmp_path):
    cfg, straight = straight_run
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    for step in (8, 12):
        truncate(run / "checkpoints" / f"step_{step:08d}" / "trainer.pt")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = cli("train", cfg, "--run-dir", run)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{run}/checkpoints: no intact checkpoint" in lines[0] and "trainer.pt" in lines[0]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_damaged_file_that_passes_verification_is_one_line_not_a_traceback(tmp_path):
    from scalelab.train.checkpoint import load_checkpoint
    from scalelab.train.parallel import Dist

    model, optimizer = tiny_model_and_optimizer()
    final = save(tmp_path / "run", 1, model, optimizer)
    (final / "manifest.json").unlink()
    (final / "optimizer.pt").write_bytes(_zip_holding_garbage())
    with pytest.raises(UserError, match=r"optimizer.pt: damaged checkpoint file"):
        load_checkpoint(final, model, optimizer, Dist())


def _zip_holding_garbage() -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", b"not a pickle")
    return buf.getvalue()


# ---- disk full during a checkpoint ------------------------------------------------------------------

@pytest.mark.parametrize("fails_in", ["model.safetensors", "optimizer.pt"])
def test_disk_full_during_save_is_enospc_naming_the_checkpoint(sized_fs, fails_in):
    from scalelab.train.checkpoint import latest_checkpoint, list_checkpoints, verify_checkpoint

    fs = sized_fs("4m")
    run = fs / "run"
    model, optimizer = tiny_model_and_optimizer()
    first = save(run, 1, model, optimizer)
    sizes = {p.name: p.stat().st_size for p in first.iterdir()}
    # room for the weights but not the optimizer state, or not even the weights
    leave = sizes["model.safetensors"] + 32 * 1024 if fails_in == "optimizer.pt" else 16 * 1024
    assert leave < sizes[fails_in]
    fill(fs, leave)
    with pytest.raises(OSError) as e:
        save(run, 2, model, optimizer)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(run / "checkpoints" / "step_00000002")
    assert hidden_entries(run) == []  # no .partial left behind
    assert [s for s, _ in list_checkpoints(run)] == [1]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000001\n"
    assert verify_checkpoint(first) is None and latest_checkpoint(run) == first


def test_disk_full_re_saving_the_same_step_keeps_the_old_one(sized_fs):
    from scalelab.train.checkpoint import verify_checkpoint

    fs = sized_fs("4m")
    model, optimizer = tiny_model_and_optimizer()
    first = save(fs / "run", 3, model, optimizer)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    fill(fs, 16 * 1024)
    with pytest.raises(OSError) as e:
        save(fs / "run", 3, model, optimizer)
    assert e.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before and verify_checkpoint(first) is None
    assert hidden_entries(fs / "run") == []


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_disk_full_in_a_sharded_save_is_enospc_naming_the_checkpoint(sized_fs):
    """FSDP's layout (torch.distributed.checkpoint, which wraps each rank's error in its own
    exception type), written here by one process."""
    from scalelab.train.checkpoint import latest_checkpoint, save_checkpoint, verify_checkpoint
    from scalelab.train.parallel import Dist

    fs = sized_fs("4m")
    model, optimizer = tiny_model_and_optimizer()
    first = save_checkpoint(fs / "run", 1, model, optimizer, {"step": 1}, strategy="fsdp", d=Dist(), keep=3)
    assert (first / "dcp" / ".metadata").is_file() and verify_checkpoint(first) is None
    fill(fs, 16 * 1024)
    with pytest.raises(OSError) as e:
        save_checkpoint(fs / "run", 2, model, optimizer, {"step": 2}, strategy="fsdp", d=Dist(), keep=3)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(fs / "run" / "checkpoints" / "step_00000002")
    assert hidden_entries(fs / "run") == [] and latest_checkpoint(fs / "run") == first


def test_unrelated_runtime_error_is_not_called_disk_full(tmp_path, monkeypatch):
    from scalelab.train import checkpoint

    model, optimizer = tiny_model_and_optimizer()
    save(tmp_path / "run", 1, model, optimizer)

    def broken(obj, file):
        raise RuntimeError("something else")

    monkeypatch.setattr(checkpoint, "_save_pt", broken)
    with pytest.raises(RuntimeError, match="something else"):
        save(tmp_path / "run", 2, model, optimizer)
    assert hidden_entries(tmp_path / "run") == []


def test_train_cli_disk_full_at_checkpoint_is_one_line(sized_fs, data_dir, tmp_path):
    from scalelab.train.checkpoint import list_checkpoints, verify_checkpoint

    fs = sized_fs("8m")
    cfg = write_config(tmp_path / "c.toml", data_dir, steps=4)
    r = cli("train", cfg, "--run-dir", fs / "run")
    assert r.returncode == 0, r.stderr
    fill(fs, 48 * 1024)
    r = cli("train", cfg, "--run-dir", fs / "run", "--set", "train.max_steps=8")
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr and last.startswith("scalelab train: error:"), r.stderr
    assert f"{fs}/run/checkpoints/step_00000008: the disk is full" in last, last
    assert [s for s, _ in list_checkpoints(fs / "run")] == [4]
    assert verify_checkpoint(fs / "run" / "checkpoints" / "step_00000004") is None
    assert hidden_entries(fs / "run") == []


# ---- pointing at a directory that holds a run below it ---------------------------------------------

def test_demo_style_directory_names_its_run(straight_run, tmp_path):
    from scalelab.train.checkpoint import load_model_for_inference, resolve_checkpoint

    demo = tmp_path / "demo"
    (demo / "tokenizer").mkdir(parents=True)
    shutil.copytree(straight_run[1], demo / "run")
    with pytest.raises(UserError, match=rf"{demo} is not a run directory with checkpoints; its run is {demo}/run; "
                                        "pass that"):
        resolve_checkpoint(demo)
    with pytest.raises(UserError, match=rf"its run is {demo}/run"):
        load_model_for_inference(demo)
    with pytest.raises(UserError, match=r"no such checkpoint or run directory"):
        resolve_checkpoint(tmp_path / "missing")
    dcp_like = demo / "run" / "checkpoints" / "step_00000012"
    (dcp_like / "model.safetensors").unlink()  # as an FSDP checkpoint, which sample reads via resolve_checkpoint
    with pytest.raises(UserError, match=rf"{dcp_like}: damaged checkpoint \(model.safetensors is missing\); pass "
                                        rf"the run directory {demo}/run"):
        resolve_checkpoint(dcp_like)
    r = cli("sample", demo, "--prompt", "the", "--max-new-tokens", "2")
    assert r.returncode == 2 and f"its run is {demo}/run; pass that" in r.stderr, r.stderr


# ---- housekeeping: latest, leftovers, pruning -------------------------------------------------------

def test_unreadable_latest_file_falls_back_to_newest(tmp_path):
    from scalelab.train.checkpoint import latest_checkpoint

    model, optimizer = tiny_model_and_optimizer()
    save(tmp_path / "run", 1, model, optimizer)
    second = save(tmp_path / "run", 2, model, optimizer)
    (tmp_path / "run" / "checkpoints" / "latest").write_bytes(b"\xff\xfe garbage")
    assert latest_checkpoint(tmp_path / "run") == second


def test_save_removes_leftovers_of_crashed_saves_and_prunes(tmp_path):
    from scalelab.train.checkpoint import list_checkpoints

    model, optimizer = tiny_model_and_optimizer()
    save(tmp_path / "run", 4, model, optimizer)
    root = tmp_path / "run" / "checkpoints"
    for leftover in (".step_00000006.partial", ".step_00000004.old.x1y2", ".step_00000002.deleted"):
        (root / leftover).mkdir()
        (root / leftover / "model.safetensors").write_bytes(b"x" * 100)
    save(tmp_path / "run", 8, model, optimizer)
    assert hidden_entries(tmp_path / "run") == []
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [4, 8]


def test_prune_never_leaves_a_half_deleted_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    from scalelab.train.checkpoint import latest_checkpoint, list_checkpoints

    model, optimizer = tiny_model_and_optimizer()
    for step in (1, 2):
        save(tmp_path / "run", step, model, optimizer, keep=2)

    real_rmtree = shutil.rmtree

    def killed_mid_delete(path, ignore_errors=False):  # pruning step 1: one file gone, then the process dies
        if "step_00000001" not in Path(path).name or not Path(path).exists():
            return real_rmtree(path, ignore_errors=ignore_errors)
        next(Path(path).rglob("model.safetensors")).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path / "run", 3, model, optimizer, keep=2)
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2, 3]
    assert latest_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "step_00000003"


def test_prune_drops_abandoned_checkpoints_above_the_saved_step(tmp_path):
    """After falling back past a damaged step_12 to step_8, saving step 10 keeps the intact
    step_8 and step_10 (keep = 2), not the damaged step_12 in place of step_8."""
    from scalelab.train.checkpoint import list_checkpoints

    model, optimizer = tiny_model_and_optimizer()
    for step in (8, 12):
        save(tmp_path / "run", step, model, optimizer, keep=2)
    save(tmp_path / "run", 10, model, optimizer, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [8, 10]
