"""Crash-safe files for llama-data: a file or a directory holds its old complete content or its new
complete one.

DESIGN.md: "a failed write leaves the previous good file in place". This is llama-data's one home
for that contract; its twin, `llama_model.atomic`, holds it for the torch side (llama-data must
not depend on torch), the two are the same code, and `tests/test_atomic_writes.py` holds both to one
contract. See `llama_model.atomic` for the reasoning behind each step; in short:

- `atomic_write(path)` yields a temporary path next to `path`; the caller writes it however it
  likes. On a clean exit the file is fsynced, renamed onto `path` with `os.replace` and the
  directory fsynced; on an exception the temporary file is removed and `path` is untouched.
- `publish_directory(staging, target)` fsyncs a completely written directory and renames it into
  place; an existing `target` is moved aside, put back if the rename fails, and removed once the
  new one is durable.
- A directory that the platform cannot open or fsync is skipped; every other error is raised.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_write", "publish_directory"]

log = logging.getLogger(__name__)

# errno values of os.fsync(directory fd) that mean "this platform or file system cannot fsync a
# directory", not "the data did not reach the disk":
_NO_DIRECTORY_FSYNC = frozenset(
    {
        errno.EINVAL,  # fsync(2): "fd is bound to a special file ... which does not support
        # synchronization" (some FUSE and network file systems, e.g. older NFS clients)
        errno.ENOTSUP,  # file systems that implement no fsync for directories
        errno.EOPNOTSUPP,  # the same on platforms where it differs from ENOTSUP (BSDs)
        errno.EBADF,  # a directory opened read-only is not a valid fsync target (Windows, some BSDs)
    }
)
# errno values of os.open(directory, O_RDONLY) that mean "directories cannot be opened here":
_NO_DIRECTORY_OPEN = frozenset(
    {
        errno.EACCES,  # Windows refuses to open a directory as a file (PermissionError)
        errno.EISDIR,  # platforms whose open(2) refuses directories outright
    }
)
_TEMPORARY_ATTEMPTS = 100  # random names tried before giving up (a clash is a 1 in 2**32 event)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Write `path` through a temporary file that replaces it only once complete and on disk.

    Yields the temporary path (an empty file in `path`'s directory, created if missing); write it
    with anything that takes a path (`safetensors.torch.save_file`, `torch.save`,
    `Figure.savefig(..., format=...)`, `Path.write_text`). The name ends in ``.tmp``, so pass the
    format explicitly to writers that infer it from the suffix.

    On a clean exit: fsync the file, `os.replace` it onto `path`, fsync the directory. On an
    exception: remove the temporary file, leave `path` untouched, re-raise. An error while making
    the rename durable (fsync of the directory) is raised although `path` already holds the new
    content.

    Example::

        with atomic_write(out / "config.json") as tmp:
            tmp.write_text(json.dumps(config), encoding="utf-8")
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(
            f"atomic_write({str(target)!r}): that path is a directory; pass a file path "
            "(use publish_directory to replace a directory)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _reserve_name(target, ".tmp", create=True)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def publish_directory(staging: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Make the completely written directory `staging` become `target`, atomically.

    Every file and directory under `staging` (and `staging` itself) is fsynced first, so the
    rename never exposes data that is not on disk. Without an existing `target`, `staging` is
    renamed to it. With one, the old `target` is moved aside, `staging` renamed into place (the
    old one is put back if that fails) and the old one removed afterwards. The parent directory is
    fsynced before the old one is removed. `staging` must be on the same file system as `target`:
    create it next to `target`.
    """
    staging, target = Path(staging), Path(target)
    if not staging.is_dir():
        raise NotADirectoryError(
            f"publish_directory: staging {str(staging)!r} is not a directory; write the new "
            "content into a directory next to the target first"
        )
    if os.path.lexists(target) and not target.is_dir():
        raise NotADirectoryError(
            f"publish_directory: target {str(target)!r} exists and is not a directory; "
            "remove it or choose another target"
        )
    _fsync_tree(staging)
    parents = [target.parent]
    if not _same_directory(staging.parent, target.parent):
        parents.append(staging.parent)  # the rename removes staging's entry there too
    if not os.path.lexists(target):
        _rename(staging, target)
        for parent in parents:
            _fsync_directory(parent)
        return
    aside = _reserve_name(target, ".old", create=False)
    os.replace(target, aside)
    try:
        _rename(staging, target)
    except BaseException:
        os.replace(aside, target)
        raise
    for parent in parents:
        _fsync_directory(parent)
    try:
        shutil.rmtree(aside)
    except OSError as error:  # the new directory is in place: a leftover is not a failed publish
        log.warning(
            "could not remove the replaced directory %s (%s); delete it by hand", aside, error
        )


# --------------------------------------------------------------------------------------------
# helpers


def _fsync_directory(directory: Path) -> None:
    """fsync `directory` so that renames in it are durable; skipped only where the platform or
    file system cannot open or fsync a directory (see `_NO_DIRECTORY_*`), raised otherwise."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as error:
        if error.errno in _NO_DIRECTORY_OPEN:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in _NO_DIRECTORY_FSYNC:
            raise
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every regular file and every directory under `root`, `root` last."""
    for directory, _subdirectories, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(directory, name)
            if not path.is_symlink() and path.is_file():
                _fsync_file(path)
        _fsync_directory(Path(directory))


def _reserve_name(target: Path, suffix: str, *, create: bool) -> Path:
    """A fresh hidden name ``.<target name>.<random><suffix>`` next to `target`.

    `create=True` creates it as an empty file with the permissions the umask gives a new file
    (mode 0o666, masked by the kernel), which reserves the name; `create=False` only picks a name
    that is free now (the destination of a rename)."""
    for _ in range(_TEMPORARY_ATTEMPTS):
        candidate = target.with_name(f".{target.name}.{secrets.token_hex(4)}{suffix}")
        if not create:
            if not os.path.lexists(candidate):
                return candidate
            continue
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(
        f"could not find a free temporary name next to {str(target)!r} in "
        f"{_TEMPORARY_ATTEMPTS} tries; remove the leftover .{target.name}.*{suffix} entries"
    )


def _rename(staging: Path, target: Path) -> None:
    try:
        os.replace(staging, target)
    except OSError as error:
        if error.errno == errno.EXDEV:
            raise OSError(
                error.errno,
                f"publish_directory: {str(staging)!r} is on another file system than "
                f"{str(target)!r}, so it cannot be renamed there atomically; create the "
                "staging directory next to the target",
            ) from error
        raise


def _same_directory(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()
