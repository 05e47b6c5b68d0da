"""The package's declared Python floor is the Python CI runs, and every verb starts on it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def declared_floor() -> tuple[int, int]:
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    m = re.fullmatch(r">=\s*(\d+)\.(\d+)", spec)
    assert m, f"requires-python should be a plain floor, got {spec!r}"
    return int(m.group(1)), int(m.group(2))


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="CI proves the floor; a developer may run a newer Python")
def test_ci_runs_the_oldest_python_the_package_claims():
    assert sys.version_info[:2] == declared_floor()


def test_a_verb_whose_import_fails_leaves_the_others_working():
    """One module-level import that fails (as `import tomllib` once did on Python 3.10) used to
    break every verb. Now only that verb answers, in one line with exit 1."""
    code = """
import sys, importlib.abc
class Broken(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "scalelab.cli.demo":
            raise ImportError("No module named 'tomllib'")
sys.meta_path.insert(0, Broken())
from scalelab.cli import main
rc_count = main(["count", "gpt2", "--json"])
rc_demo = main(["demo"])
print("RC", rc_count, rc_demo)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "RC 0 1"
    assert r.stderr.strip().splitlines() == [
        "scalelab demo: cannot start: ImportError: No module named 'tomllib' (a broken or incomplete "
        "installation; reinstall scalelab's dependencies)"]
