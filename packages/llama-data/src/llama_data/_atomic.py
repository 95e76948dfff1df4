"""Crash-safe writes for llama-data: llama-data's one home for the atomic file write and publish.

DESIGN.md: "a failed write leaves the previous good file in place", and the atomic write exists
once per dependency boundary (its twin, `llama_model.atomic`, holds the same contract for the
torch side), and `tests/test_atomic_writes.py` holds both to one contract.

- `atomic_write(path)` yields a temporary path in `path`'s directory. The caller writes it however
  it likes (an open file, `np.savez`, a library that takes a path). On a clean exit the file is
  fsynced, renamed onto `path` with `os.replace` (atomic on POSIX: a reader sees the old file or
  the complete new one, never a mix), and the directory fsynced so that the rename itself survives
  a power loss. On an exception the temporary file is removed and `path` is untouched.
- `publish_directory(staging, target)` does the same for a directory the caller filled: every file
  in it is fsynced, then it becomes `target` by a rename; an existing `target` is moved aside
  first, put back if the rename fails, and removed only once the new one is in place.

The fsync-then-rename-then-fsync-the-directory sequence is the one ext4's and XFS's authors ask
applications for (the `rename(2)` and `fsync(2)` man pages; LWN, "ext4 and data loss", 2009).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_write", "publish_directory"]

# errno values of os.fsync on a directory that mean "directories cannot be fsynced here" (the
# rename is then as durable as this filesystem makes it; nothing more can be done):
_FSYNC_UNSUPPORTED = frozenset(
    {
        errno.EINVAL,  # Linux: the fd "is bound to a special file which does not support
        # synchronization" (fsync(2)); some FUSE and network filesystems answer this for directories
        errno.ENOTSUP,  # the filesystem has no fsync for directories (e.g. some SMB/CIFS mounts)
        errno.EOPNOTSUPP,  # the same on platforms where it differs from ENOTSUP (BSDs)
        errno.EBADF,  # Windows (and some FUSE filesystems): fsync needs a writable fd, and a
        # directory can only be opened read-only
    }
)
# errno values of os.open(directory, O_RDONLY) on platforms that refuse to open directories:
_OPEN_REFUSED = frozenset(
    {
        errno.EACCES,  # Windows: opening a directory with os.open raises PermissionError; on POSIX
        # a write-only (-wx) directory, where the rename already happened and cannot be synced
        errno.EISDIR,  # platforms whose open() refuses directories outright
    }
)
_TEMP_ATTEMPTS = 100  # fresh random names tried before giving up (a clash is ~2**-64 per try)


def _fsync_directory(directory: Path) -> None:
    """Make the renames in `directory` durable: open it read-only and fsync it.

    Only errors that mean "directories cannot be fsynced on this platform or filesystem" are
    ignored (see `_OPEN_REFUSED` and `_FSYNC_UNSUPPORTED`); every other OSError, e.g. EIO from a
    failing disk, is raised: the caller's data may not be on disk.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as err:
        if err.errno in _OPEN_REFUSED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    """Flush a regular file's data and metadata to disk; every error is raised."""
    # Read-only is enough for fsync on POSIX, and works for files the caller made read-only.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_path(directory: Path, name: str, kind: str) -> Path:
    """A fresh hidden name beside `name` in `directory` (not created)."""
    return directory / f".{name}.{kind}-{secrets.token_hex(8)}"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit it replaces `path` durably.

    The temporary file exists (empty) when yielded, created with the permissions a plain `open`
    would give (0o666 less the umask). Write it, or replace it, as you like. On a clean exit it is
    fsynced, `os.replace`d onto `path`, and the directory fsynced; if the body raises, the
    temporary file is removed and `path` keeps its previous content (or stays absent). The parent
    directory is created if missing.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(_TEMP_ATTEMPTS):
        temporary = _temporary_path(target.parent, target.name, "tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        break
    else:
        raise FileExistsError(f"could not create a temporary file beside {target}")
    try:
        yield temporary
        _fsync_file(temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def _fsync_tree(directory: Path) -> None:
    """fsync every file and directory under `directory`, then `directory` itself."""
    for root, dirs, files in os.walk(directory):
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                _fsync_file(path)
        for name in dirs:
            _fsync_directory(Path(root) / name)
    _fsync_directory(directory)


def _remove(path: Path) -> None:
    """Delete a file or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def publish_directory(staging: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Make the finished directory `staging` become `target`, durably and atomically.

    Every file in `staging` (recursively) and `staging` itself are fsynced. If `target` does not
    exist, `staging` is renamed to it (atomic). If it exists, it is renamed aside, `staging` is
    renamed into place, and the old one is put back if that rename fails, or removed once the new
    one is in place. The parent directory is fsynced. `staging` must be on the same filesystem as
    `target` (create it beside `target`).
    """
    staging, target = Path(staging), Path(target)
    if not staging.is_dir():
        raise NotADirectoryError(f"staging directory {staging} does not exist or is not one")
    _fsync_tree(staging)
    if not target.exists() and not target.is_symlink():
        os.rename(staging, target)
        _fsync_directory(target.parent)
        return
    old = _temporary_path(target.parent, target.name, "old")
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)  # put the previous one back
        raise
    _fsync_directory(target.parent)  # the new one is durably in place before the old one goes
    _remove(old)
    _fsync_directory(target.parent)
