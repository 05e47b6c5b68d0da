"""Durable, atomic outputs: the one place scalelab writes files and directories that users keep.

Every output is built under a temporary name beside its final one, flushed to disk (file data,
then the directory entries: `fsync`), given the permissions the user's umask asks for, and only
then renamed into place; the parent directory is fsynced after the rename. So

- a reader, a crash, `kill -9` or a power loss never sees half an output under the final name,
  and an existing output is replaced only once its successor is complete;
- a failure (disk full, permission denied) removes the temporary and leaves the old output as
  it was;
- teammates on a shared cluster can read what scalelab writes (mkstemp/mkdtemp create 0600 /
  0700 entries; the final rename applies the umask as `open`/`mkdir` would have).

`StagedDirectory` is the one staged-directory mechanism (checkpoints, prepared data, exports,
run-directory copies all use it); `atomic_path` / `atomic_write_*` are its single-file cousins.
OS errors raised while writing name the *final* path, so the CLI's one-line error message
(`errors.describe_os_error`) says which output failed, not a temporary name.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

from scalelab.errors import UserError


def current_umask() -> int:
    """The process umask (read without leaving it changed)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give `path` (and, for a directory, everything under it that mkstemp/mkdtemp made private)
    the mode a plain open()/mkdir() would have given it under the current umask."""
    mask = current_umask()
    path = Path(path)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for name in files:
                p = os.path.join(root, name)
                if not os.path.islink(p):
                    os.chmod(p, 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file, or a directory entry list. Filesystems that cannot fsync a directory
    (some network filesystems answer EINVAL) are skipped silently: the rename is still atomic."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if os.path.isfile(path):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under `root` (bottom-up), then `root` itself."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                fsync_path(p)
        fsync_path(dirpath)


def _renamed_error(e: OSError, final: Path) -> OSError:
    """The same error, naming the final output rather than the temporary beside it."""
    err = OSError(e.errno, e.strerror or str(e), str(final))
    return err


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, fsync it, apply the umask and
    rename it over `path`.

    On an exception the temporary file is removed and `path` is left untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise _renamed_error(e, path) from e
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        fsync_path(tmp_path)
        apply_umask(tmp_path)
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory", str(path))
        os.replace(tmp_path, path)
        fsync_path(path.parent)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise _renamed_error(e, path) from e
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


class StagedDirectory:
    """A directory built under a temporary sibling name and moved into place when complete.

        staged = StagedDirectory(out)            # creates .OUT.<random>.partial beside OUT
        ... write into staged.path ...
        staged.commit()                           # fsync, umask, rename over OUT, fsync parent
        # or staged.abort() on failure            # removes the temporary; OUT untouched

    `name` fixes the temporary's name (several processes writing one checkpoint must agree on
    it; an existing directory of that name is a stale leftover and is removed). `lock=True`
    holds an flock on `.lock` inside it for the writer's lifetime, so `remove_stale(out)` can
    tell a crashed writer's leftovers from a live one's. `atomic_directory` is the context
    manager form for one process.
    """

    def __init__(self, final: str | os.PathLike, *, name: str | None = None, lock: bool = False,
                 create: bool = True):
        self.final = Path(final)
        self._lock: IO | None = None
        if name is not None:
            self.path = self.final.parent / name
        if not create:
            if name is None:
                raise ValueError("StagedDirectory(create=False) needs the agreed name")
            return
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            if name is None:
                self.path = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", suffix=".partial",
                                                  dir=self.final.parent))
            else:
                shutil.rmtree(self.path, ignore_errors=True)
                self.path.mkdir()
            if lock:
                self._lock = open(self.path / ".lock", "w")
                fcntl.flock(self._lock, fcntl.LOCK_EX)
        except OSError as e:
            self.abort()
            raise _renamed_error(e, self.final) from e

    def commit(self) -> Path:
        """Make the staged directory the final one (replacing an existing one only now)."""
        try:
            if self._lock is not None:
                (self.path / ".lock").unlink(missing_ok=True)
                self._lock.close()
                self._lock = None
            fsync_tree(self.path)
            apply_umask(self.path)
            if self.final.exists() and not self.final.is_dir():
                raise NotADirectoryError(20, "exists and is not a directory", str(self.final))
            if self.final.is_dir():
                old = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.old.", dir=self.final.parent))
                os.replace(self.final, old / self.final.name)
                os.replace(self.path, self.final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.path, self.final)
            fsync_path(self.final.parent)
        except OSError as e:
            self.abort()
            raise _renamed_error(e, self.final) from e
        return self.final

    def abort(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if hasattr(self, "path"):
            shutil.rmtree(self.path, ignore_errors=True)

    @staticmethod
    def remove_stale(final: str | os.PathLike, pattern: str | None = None) -> None:
        """Delete leftover staged directories of `final` whose writer no longer holds its lock
        (or that have no lock at all)."""
        final = Path(final)
        for stale in final.parent.glob(pattern or f".{final.name}.*.partial"):
            try:
                with open(stale / ".lock", "a") as f:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer
            except OSError:
                pass
            shutil.rmtree(stale, ignore_errors=True)


def remove_tree(path: str | os.PathLike, *, ignore_errors: bool = False) -> None:
    """Delete a directory: its name first (one rename into a hidden `.NAME.deleting.*` sibling, so
    a crash mid-delete never leaves a half-deleted directory under its name), then its contents."""
    path = Path(path)
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.deleting.", dir=path.parent))
    os.replace(path, aside / path.name)
    shutil.rmtree(aside, ignore_errors=ignore_errors)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success move it into place as `path`.

    An existing `path` is replaced only after its successor is complete; on an exception the
    temporary directory is removed and `path` is left untouched. An OSError raised inside the
    block (disk full while writing a file into it) names `path`, not the temporary."""
    staged = StagedDirectory(path)
    try:
        yield staged.path
    except OSError as e:
        staged.abort()
        raise _renamed_error(e, Path(path)) from e
    except BaseException:
        staged.abort()
        raise
    staged.commit()


# ---- checks on user-named outputs, before any work -------------------------------------------

def check_output_file(path: str | os.PathLike, *, flag: str, suffixes: tuple[str, ...] = ()) -> Path:
    """Refuse, before any work is done, an output file path that cannot be written as asked:
    an existing directory, a parent that is a file, a suffix the writer would not honour."""
    p = Path(path)
    if suffixes and p.suffix.lower() not in suffixes:
        raise UserError(f"{flag} {p}: expected a {' or '.join(suffixes)} file name (e.g. {p.with_suffix(suffixes[0])})")
    if p.is_dir():
        raise UserError(f"{flag} {p} is an existing directory; give a file path such as {p / ('out' + (suffixes[0] if suffixes else ''))}")
    _check_parent(p, flag)
    return p


def check_output_dir(path: str | os.PathLike, *, flag: str) -> Path:
    """Refuse an output directory path that names an existing file or sits under one."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p} is an existing file; give a directory path")
    _check_parent(p, flag)
    return p


def _check_parent(p: Path, flag: str) -> None:
    for parent in [p.parent, *p.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {p}: {parent} is a file, not a directory; choose another path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"{flag} {p}: {parent} is not writable; choose a directory you can write to")
            return
