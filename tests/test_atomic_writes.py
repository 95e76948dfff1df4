"""The one crash-safe-files contract, checked against both of its homes.

DESIGN.md: "a failed write leaves the previous good file in place". The contract exists once per
dependency boundary: `llama_model` (torch side: llama-train, llama-serve, llama-align use it) and
`llama_data` (no torch). Each exports `atomic_write(path)` (a context manager yielding a temporary
path next to `path`) and `publish_directory(staging, target)`; every test here runs against both.
Crash safety is proven by SIGKILLing a subprocess at a point it has provably reached (it reports
the point, then blocks until killed), not by raising an exception (STYLE.md).
"""

from __future__ import annotations

import errno
import importlib
import os
import select
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

IMPLEMENTATIONS = ["llama_model", "llama_data"]
MiB = 2**20


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """The package whose `atomic_write` and `publish_directory` are under test."""
    return importlib.import_module(request.param)


def _tree(directory: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `directory`."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _make_tree(directory: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)


OLD_TREE = {"config.json": b'{"version": "old"}', "weights/a.bin": b"A" * 4096}
NEW_TREE = {"config.json": b'{"version": "new"}', "weights/b.bin": b"B" * 8192, "extra.txt": b"x"}


# --------------------------------------------------------------------------------------------
# A child process that stops at a chosen point and waits to be SIGKILLed.

_CHILD = r"""
import importlib, os, shutil, sys
from pathlib import Path

impl = importlib.import_module(sys.argv[1])
mode, target = sys.argv[2], Path(sys.argv[3])


def stop_here(point):
    print(point, flush=True)
    sys.stdin.read()  # the parent SIGKILLs us now
    raise SystemExit("not killed")


if mode == "write":
    size = int(sys.argv[4])
    chunk = b"\x5a" * (1 << 20)
    with impl.atomic_write(target) as tmp:
        with open(tmp, "wb") as f:
            for i in range(size // len(chunk)):
                f.write(chunk)
                if (i + 1) * len(chunk) == size // 2:
                    f.flush()
                    stop_here(str(tmp))
else:  # publish, stopping at sys.argv[4]: "aside", "into-place" or "remove-old"
    staging, stop = Path(sys.argv[5]), sys.argv[4]

    def watch(real):
        def patched(src, dst, *args, **kwargs):
            if stop == "aside" and Path(src) == target:
                stop_here("before moving the old directory aside")
            if stop == "into-place" and Path(src) == staging:
                stop_here("old directory aside, new one not yet in place")
            return real(src, dst, *args, **kwargs)
        return patched

    os.rename, os.replace = watch(os.rename), watch(os.replace)
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if stop == "remove-old" and Path(path) != staging:
            stop_here("new directory in place, old one not yet removed")
        return real_rmtree(path, *args, **kwargs)

    shutil.rmtree = rmtree
    impl.publish_directory(staging, target)
    raise SystemExit("publish_directory never reached the stop point " + stop)
"""


def _run_until_killed(args: list[str]) -> str:
    """Start the child with `args`, read the line it prints at its stop point, SIGKILL it there
    and return the line."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stderr is not None
    try:
        ready, _, _ = select.select([child.stdout], [], [], 120)
        line = child.stdout.readline().strip() if ready else ""
        if not line:
            child.kill()
            _, stderr = child.communicate(timeout=30)
            pytest.fail(f"the child never reached its stop point; its stderr:\n{stderr}")
        os.kill(child.pid, signal.SIGKILL)
        child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    return line


# --------------------------------------------------------------------------------------------
# (a) atomic_write killed mid-write


def test_sigkill_mid_write_leaves_the_old_file(impl: ModuleType, tmp_path: Path) -> None:
    """A process SIGKILLed while half of a 32 MiB file is written (the temporary file provably
    holds 16 MiB) leaves the old file byte-identical, and its leftover temporary file is hidden
    and not matched by a glob for the target's kind of file."""
    target = tmp_path / "model.safetensors"
    old = os.urandom(4 * MiB)
    target.write_bytes(old)
    tmp = Path(_run_until_killed([impl.__name__, "write", str(target), str(32 * MiB)]))
    assert tmp.parent == tmp_path and tmp != target
    assert tmp.stat().st_size == 16 * MiB  # killed inside the write
    assert target.read_bytes() == old
    assert sorted(tmp_path.glob("*.safetensors")) == [target]
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [target.name]


# --------------------------------------------------------------------------------------------
# (b) atomic_write and exceptions


def test_exception_leaves_old_file_and_no_temporary(impl: ModuleType, tmp_path: Path) -> None:
    """An exception inside the block removes the temporary file and leaves `path` as it was,
    whether it existed or not."""
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"), impl.atomic_write(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]

    absent = tmp_path / "never.json"
    with pytest.raises(KeyboardInterrupt), impl.atomic_write(absent) as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == [target]


def test_clean_exit_replaces_file_with_plain_permissions(impl: ModuleType, tmp_path: Path) -> None:
    """A clean exit puts the new content at `path` (parents created), leaves nothing else behind,
    and gives the file the permissions the umask gives a new file (0o644 under umask 022), not a
    temporary file's private 0o600."""
    target = tmp_path / "sub" / "loss.png"
    umask = os.umask(0o022)
    try:
        with impl.atomic_write(target) as tmp:
            assert tmp.parent == target.parent and tmp != target
            tmp.write_bytes(b"new")
    finally:
        os.umask(umask)
    assert target.read_bytes() == b"new"
    assert list(target.parent.iterdir()) == [target]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


# --------------------------------------------------------------------------------------------
# (c) publish_directory


def test_publish_directory_creates_and_replaces(impl: ModuleType, tmp_path: Path) -> None:
    """Publishing to a new target renames the staging directory there; publishing over an
    existing one leaves exactly the new tree (no old file survives) and nothing else beside it."""
    target = tmp_path / "ckpt"
    first = tmp_path / ".ckpt.staging-1"
    _make_tree(first, OLD_TREE)
    impl.publish_directory(first, target)
    assert _tree(target) == OLD_TREE
    second = tmp_path / ".ckpt.staging-2"
    _make_tree(second, NEW_TREE)
    impl.publish_directory(second, target)
    assert _tree(target) == NEW_TREE
    assert list(tmp_path.iterdir()) == [target]


def test_publish_directory_puts_the_old_one_back_when_the_rename_fails(
    impl: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If renaming the new directory into place fails, the old one is back at `target`, the
    staging directory is untouched and the error is raised."""
    target, staging = tmp_path / "ckpt", tmp_path / ".ckpt.staging"
    _make_tree(target, OLD_TREE)
    _make_tree(staging, NEW_TREE)

    def refuse(real: Callable[..., None]) -> Callable[..., None]:
        def rename(src: object, dst: object, *args: object, **kwargs: object) -> None:
            if Path(str(src)) == staging:
                raise OSError(errno.EIO, "simulated I/O error", str(src))
            real(src, dst, *args, **kwargs)

        return rename

    monkeypatch.setattr(os, "rename", refuse(os.rename))
    monkeypatch.setattr(os, "replace", refuse(os.replace))
    with pytest.raises(OSError, match="simulated I/O error"):
        impl.publish_directory(staging, target)
    monkeypatch.undo()
    assert _tree(target) == OLD_TREE
    assert _tree(staging) == NEW_TREE
    assert sorted(p.name for p in tmp_path.iterdir()) == [staging.name, target.name]


@pytest.mark.parametrize("stop", ["aside", "into-place", "remove-old"])
def test_sigkill_during_publish_keeps_a_complete_directory(
    impl: ModuleType, tmp_path: Path, stop: str
) -> None:
    """A process SIGKILLed before, between or after publish_directory's two renames leaves every
    directory beside the target either the complete old tree or the complete new one: before,
    the old one is the target; between, the target is absent but the complete old one is kept
    beside it (and the new one in staging); after, the new one is the target."""
    target, staging = tmp_path / "ckpt", tmp_path / ".ckpt.staging"
    _make_tree(target, OLD_TREE)
    _make_tree(staging, NEW_TREE)
    _run_until_killed([impl.__name__, "publish", str(target), stop, str(staging)])

    trees = {p.name: _tree(p) for p in tmp_path.iterdir()}
    assert all(tree in (OLD_TREE, NEW_TREE) for tree in trees.values()), "a mixed directory"
    if stop == "aside":
        assert trees[target.name] == OLD_TREE
    elif stop == "into-place":
        assert target.name not in trees
        assert [name for name, tree in trees.items() if tree == OLD_TREE] != []
        assert trees[staging.name] == NEW_TREE
    else:
        assert trees[target.name] == NEW_TREE
        assert OLD_TREE in trees.values()  # killed before the old one was removed


# --------------------------------------------------------------------------------------------
# (d) the directory-fsync contract


def _fsync_failing_on(kind: int, code: int) -> Callable[[int], None]:
    """os.fsync that raises OSError(`code`) for descriptors of file type `kind` (S_IFDIR or
    S_IFREG) and syncs everything else."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_IFMT(os.fstat(fd).st_mode) == kind:
            raise OSError(code, os.strerror(code))
        real(fd)

    return fsync


@pytest.mark.parametrize(
    "code", [errno.EINVAL, errno.ENOTSUP, errno.EBADF], ids=errno.errorcode.get
)
def test_directories_that_cannot_be_fsynced_are_skipped(
    impl: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """Where fsync of a directory answers EINVAL, ENOTSUP or EBADF ("not possible here"), both
    the file write and the directory publish complete."""
    monkeypatch.setattr(os, "fsync", _fsync_failing_on(stat.S_IFDIR, code))
    with impl.atomic_write(tmp_path / "file") as tmp:
        tmp.write_bytes(b"new")
    staging = tmp_path / ".dir.staging"
    _make_tree(staging, NEW_TREE)
    impl.publish_directory(staging, tmp_path / "dir")
    assert (tmp_path / "file").read_bytes() == b"new"
    assert _tree(tmp_path / "dir") == NEW_TREE


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC], ids=errno.errorcode.get)
def test_directory_fsync_errors_are_raised(
    impl: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """An EIO or ENOSPC from fsync of a directory is raised by atomic_write and by
    publish_directory: the caller must not believe the data is safely on disk."""
    monkeypatch.setattr(os, "fsync", _fsync_failing_on(stat.S_IFDIR, code))
    with pytest.raises(OSError) as raised, impl.atomic_write(tmp_path / "file") as tmp:
        tmp.write_bytes(b"new")
    assert raised.value.errno == code
    staging = tmp_path / ".dir.staging"
    _make_tree(staging, NEW_TREE)
    with pytest.raises(OSError) as raised:
        impl.publish_directory(staging, tmp_path / "dir")
    assert raised.value.errno == code


def test_file_fsync_error_keeps_the_old_file(
    impl: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the new file's data cannot be fsynced (EIO), it is never renamed in: the old file stays
    and the temporary file is removed."""
    target = tmp_path / "file"
    target.write_bytes(b"old")
    monkeypatch.setattr(os, "fsync", _fsync_failing_on(stat.S_IFREG, errno.EIO))
    with pytest.raises(OSError) as raised, impl.atomic_write(target) as tmp:
        tmp.write_bytes(b"new")
    assert raised.value.errno == errno.EIO
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]
