"""scalelab.files: atomic, durable, umask-respecting outputs, and OS errors that name the user's path.

Independent truth: the kernel. A real full tmpfs answers ENOSPC, a read-only mount EROFS, and
os.stat reports the modes the umask produced."""

from __future__ import annotations

import errno
import os

import pytest

from scalelab.errors import UserError, describe_os_error
from scalelab.files import (StagedDirectory, atomic_directory, atomic_write_bytes, atomic_write_text,
                            check_output_dir, check_output_file)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_outputs_get_the_mode_the_umask_asks_for(tmp_path, umask_022):
    atomic_write_text(tmp_path / "plan.toml", "x = 1\n")
    with atomic_directory(tmp_path / "export") as d:
        atomic_write_text(d / "meta.json", "{}")
        (d / "sub").mkdir()
    assert oct(os.stat(tmp_path / "plan.toml").st_mode & 0o777) == oct(0o644)  # mkstemp alone gives 0600
    assert oct(os.stat(tmp_path / "export").st_mode & 0o777) == oct(0o755)  # mkdtemp alone gives 0700
    assert oct(os.stat(tmp_path / "export" / "meta.json").st_mode & 0o777) == oct(0o644)


def test_disk_full_names_the_output_keeps_the_old_file_and_leaves_no_temporary(tiny_fs):
    target = tiny_fs / "law.json"
    atomic_write_text(target, "old\n")
    with pytest.raises(OSError) as e:
        atomic_write_bytes(target, b"x" * (1 << 20))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert target.read_text() == "old\n" and os.listdir(tiny_fs) == ["law.json"]
    assert describe_os_error(e.value) == f"{target}: the disk is full; free space or choose another location"


def test_disk_full_in_a_staged_directory_leaves_the_old_directory_whole(tiny_fs):
    out = tiny_fs / "export"
    with atomic_directory(out) as d:
        (d / "a.bin").write_bytes(b"1")
    with pytest.raises(OSError) as e:
        with atomic_directory(out) as d:
            (d / "a.bin").write_bytes(b"2" * (1 << 20))
    assert e.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tiny_fs)) == ["export"] and (out / "a.bin").read_bytes() == b"1"


def test_read_only_location_names_the_output(readonly_dir):
    with pytest.raises(OSError) as e:
        atomic_write_text(readonly_dir / "plan.toml", "x")
    assert e.value.errno == errno.EROFS and e.value.filename == str(readonly_dir / "plan.toml")
    with pytest.raises(OSError) as e:
        with atomic_directory(readonly_dir / "out"):
            pass
    assert e.value.errno == errno.EROFS and e.value.filename == str(readonly_dir / "out")


def test_a_file_cannot_replace_a_directory(tmp_path):
    (tmp_path / "x.png").mkdir()
    with pytest.raises(OSError) as e:
        atomic_write_text(tmp_path / "x.png", "png")
    assert e.value.errno == errno.EISDIR and (tmp_path / "x.png").is_dir()
    assert os.listdir(tmp_path) == ["x.png"]


def test_staged_directory_replaces_only_on_commit(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old").write_text("old")
    staged = StagedDirectory(out, name=".ckpt.partial")
    (staged.path / "new").write_text("new")
    assert os.listdir(out) == ["old"]  # nothing visible before commit
    staged.commit()
    assert os.listdir(out) == ["new"] and sorted(os.listdir(tmp_path)) == ["ckpt"]
    aborted = StagedDirectory(out)
    (aborted.path / "half").write_text("x")
    aborted.abort()
    assert os.listdir(out) == ["new"] and sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_remove_stale_spares_a_live_writer(tmp_path):
    out = tmp_path / "data"
    live = StagedDirectory(out, lock=True)
    dead = tmp_path / ".data.123.partial"
    dead.mkdir()
    (dead / ".lock").write_text("")
    StagedDirectory.remove_stale(out)
    assert live.path.is_dir() and not dead.exists()
    live.commit()
    assert out.is_dir() and not (out / ".lock").exists()


def test_output_checks_refuse_before_any_work(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="existing directory"):
        check_output_file(tmp_path / "d", flag="--out")
    with pytest.raises(UserError, match=r"\.png"):
        check_output_file(tmp_path / "x.txt", flag="--plot", suffixes=(".png",))
    with pytest.raises(UserError, match="is a file, not a directory"):
        check_output_file(tmp_path / "f" / "x.png", flag="--plot", suffixes=(".png",))
    with pytest.raises(UserError, match="existing file"):
        check_output_dir(tmp_path / "f", flag="--out")
    assert check_output_file(tmp_path / "new" / "x.png", flag="--plot", suffixes=(".png",)).name == "x.png"


def test_check_output_names_a_read_only_parent(readonly_dir):
    if os.access(readonly_dir, os.W_OK):
        pytest.skip("os.access does not see the read-only mount here")
    with pytest.raises(UserError, match="not writable"):
        check_output_file(readonly_dir / "x.png", flag="--plot")
