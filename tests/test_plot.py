"""`scalelab plot`: output paths refused before any work, and metrics.jsonl files that are torn,
hand-edited or from older runs plotted or refused in one line (issue 13).

Run directories here are hand-written metrics.jsonl files in the trainer's record format
(scalelab/train/metrics.py); no training is needed. Runs in-process through `cli.main`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scalelab.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def plot(capsys, *args):
    capsys.readouterr()
    rc = main(["plot", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def run_dir(path: Path, lines: list) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


GOOD = [{"kind": "train", "step": s, "tokens": 1000 * s, "flops": 1e9 * s, "loss": 5.0 - 0.1 * s} for s in (1, 2, 3)]
GOOD.append({"kind": "eval", "step": 3, "tokens": 3000, "flops": 3e9, "val_loss": 4.8})


@pytest.mark.parametrize("target, fragment", [
    ("dir.png", "is an existing directory"),
    ("curves.txt", "expected a .png file name"),
    ("afile/curves.png", "afile is a file, not a directory"),
])
def test_bad_out_is_refused_before_reading_runs(tmp_path, capsys, monkeypatch, target, fragment):
    """The run directory does not exist: a refusal about --out proves --out is checked first."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "afile").write_text("keep\n")
    rc, out, err = plot(capsys, tmp_path / "no-such-run", "--out", target)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "dir.png"]
    assert (tmp_path / "afile").read_text() == "keep\n"


def test_read_only_out_is_refused(tmp_path, capsys, readonly_dir):
    rc, _, err = plot(capsys, run_dir(tmp_path / "r", GOOD), "--out", readonly_dir / "curves.png")
    assert rc == 2 and "is not writable" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("lines", [
    [{"kind": "train", "step": 1, "loss": 5.0}, *GOOD],            # a record without tokens/flops: KeyError before
    ["[1, 2]", '"text"', *GOOD],                                    # JSON that is not an object: AttributeError before
    [{"kind": "train", "step": 1, "tokens": "many", "flops": 1e9, "loss": 5.0}, *GOOD],
    [{k: v for k, v in r.items() if k != "flops"} for r in GOOD],   # an older run without flops: tokens panel only
    [*GOOD, '{"kind": "train", "st'],                               # torn last line
])
def test_untidy_metrics_are_plotted_from_their_usable_records(tmp_path, capsys, lines):
    out = tmp_path / "curves.png"
    rc, stdout, err = plot(capsys, run_dir(tmp_path / "r", lines), "--out", out)
    assert rc == 0, err
    assert out.read_bytes()[:8] == PNG and stdout.strip() == f"wrote {out}"


@pytest.mark.parametrize("lines, fragment", [
    (None, "no metrics.jsonl"),
    ([], "no train or eval record"),
    (["not json", "{]"], "no train or eval record"),
    ([{"kind": "train", "step": 1, "loss": 5.0}], "no train or eval record"),
])
def test_runs_with_nothing_to_plot_are_refused_and_leave_no_file(tmp_path, capsys, lines, fragment):
    run = tmp_path / "r"
    run.mkdir()
    if lines is not None:
        run_dir(run, lines)
    out = tmp_path / "curves.png"
    out.write_bytes(b"old")
    rc, _, err = plot(capsys, run, "--out", out)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert out.read_bytes() == b"old"
