import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One compute thread per process (set before any test module imports torch, numpy or scipy): the suite
# runs two xdist workers, and the torchrun and CLI processes they start, on 2 cores; more threads than
# cores make torch's OpenMP workers spin against each other (a sweep run measured 20-40x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_cli(*args: str, cwd=None, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m scalelab ARGS` in a subprocess and capture its output."""
    return subprocess.run([sys.executable, "-m", "scalelab", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


def heavy_modules_loaded(argv: list[str], modules=("torch", "matplotlib")) -> list[str]:
    """Run `scalelab ARGV` in a fresh interpreter; return which of `modules` it imported.
    (count, plan and fit must start instantly: no torch, and no matplotlib unless plotting.)"""
    code = ("import sys, io, json, contextlib\nfrom scalelab.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()):\n    rc = main({list(argv)!r})\n"
            f"assert rc == 0, rc\nprint(json.dumps([m for m in {list(modules)!r} if m in sys.modules]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import json

    return json.loads(r.stdout)


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str):
    """A real tmpfs mounted at `path` for the block (skips the test where mounting needs root)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def tiny_fs(tmp_path):
    """A directory on a real 256 KiB tmpfs: writing past its size fails with ENOSPC, as a full disk does."""
    with mounted_tmpfs(tmp_path / "tiny_fs", "size=256k") as path:
        yield path


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory on a read-only tmpfs (EROFS on any write). As root, chmod cannot make one."""
    with mounted_tmpfs(tmp_path / "readonly", "ro,size=64k") as path:
        yield path
