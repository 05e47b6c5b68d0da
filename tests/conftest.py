import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_cli(*args: str, cwd=None, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m scalelab ARGS` in a subprocess and capture its output."""
    return subprocess.run([sys.executable, "-m", "scalelab", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli
