"""The one exception type that means "the user gave us bad input", and the one-line wording of
operating-system errors on the paths a user names.

Library code raises `UserError("what is wrong; how to fix it")`; the CLI prints that single
line to stderr and exits with status 2 (no traceback). An `OSError` that names a path (disk full,
read-only or permission-denied directory, a directory where a file belongs...) is also the
user's to fix: the CLI words it with `describe_os_error` and exits 2. Anything else is a bug:
exit 1.
"""

from __future__ import annotations

import errno


class UserError(ValueError):
    """Bad input: the message is one line naming the problem and the fix."""


_FIXES = {
    errno.ENOSPC: "the disk is full; free space or choose another location",
    errno.EDQUOT: "the disk quota is exceeded; free space or choose another location",
    errno.EROFS: "the file system is read-only; choose a writable location",
    errno.EACCES: "permission denied; choose a location you can write to (or fix its permissions)",
    errno.EPERM: "operation not permitted; choose a location you can write to",
    errno.EISDIR: "it is a directory; give a file path",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another path",
    errno.ENOENT: "no such file or directory; check the path",
    errno.EEXIST: "it already exists; remove it or choose another path",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
    errno.EFBIG: "the file is too large for this file system (or the process's file-size limit)",
    errno.ENOTEMPTY: "the directory is not empty; choose an empty or new directory",
}


def describe_os_error(e: OSError) -> str:
    """One line: the path, what went wrong and what to do."""
    what = _FIXES.get(e.errno or -1) or (e.strerror or str(e))
    where = e.filename if e.filename is not None else None
    if e.filename2 is not None:
        where = f"{e.filename} -> {e.filename2}"
    return f"{where}: {what}" if where else what
