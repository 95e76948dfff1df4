"""The one crash-safe-files contract, checked against both of its homes.

DESIGN.md: "a failed write leaves the previous good file in place". The contract exists once per
dependency boundary: `llama_model.atomic` (torch side: llama-train, llama-serve, llama-align use
it) and `llama_data._atomic` (no torch). Each exports `atomic_write(path)` (a context manager
yielding a temporary path next to `path`) and `publish_directory(staging, target)`; every test
here runs against both, through those two public names only. Crash safety is proven by
SIGKILLing a subprocess at a point it has provably reached (it reports the point, then blocks
until killed), not by raising an exception (STYLE.md). The directory-fsync rules follow the Linux
fsync(2) manual: a rename is durable only once its directory is fsynced.
"""

# Merged from packages/llama-data/tests/test_atomic.py (deleted); its cases already covered here
# were dropped: a failed write keeps the old file, new/replaced/nested publish targets, the old
# target restored when the rename fails, permissions of a plain open.

from __future__ import annotations

import errno
import importlib
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
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


def _listing(directory: Path) -> list[str]:
    """Sorted names in `directory`, hidden ones included."""
    return sorted(path.name for path in directory.iterdir())


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
    """SIGKILL halfway through a 32 MiB write leaves the old file and only a hidden temporary."""
    target = tmp_path / "model.safetensors"
    old = os.urandom(4 * MiB)
    target.write_bytes(old)
    tmp = Path(_run_until_killed([impl.__name__, "write", str(target), str(32 * MiB)]))
    assert tmp.parent == tmp_path and tmp != target
    assert tmp.stat().st_size == 16 * MiB  # killed inside the write
    assert target.read_bytes() == old
    # the leftover is hidden and not matched by a glob for the target's kind of file
    assert sorted(tmp_path.glob("*.safetensors")) == [target]
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [target.name]


# --------------------------------------------------------------------------------------------
# (b) atomic_write: the happy path, exceptions, writers, durable order


def test_target_is_untouched_until_the_block_exits(impl: ModuleType, tmp_path: Path) -> None:
    """The yielded path is an existing file beside `path`; `path` changes only on a clean exit."""
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with impl.atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and tmp.is_file()
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # nothing visible before the exit
    assert target.read_bytes() == b"new"
    assert _listing(tmp_path) == [target.name]


def test_clean_exit_replaces_file_with_plain_permissions(impl: ModuleType, tmp_path: Path) -> None:
    """A clean exit creates missing parents and gives the umask's 0o644, not mkstemp's 0o600."""
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


def test_exception_keeps_the_old_file_and_removes_the_temporary(
    impl: ModuleType, tmp_path: Path
) -> None:
    """An exception in the block leaves `path`'s previous content and no temporary file."""
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"), impl.atomic_write(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def test_failure_without_a_previous_file_leaves_nothing(impl: ModuleType, tmp_path: Path) -> None:
    """A first write interrupted by KeyboardInterrupt leaves no `path` and no temporary file."""
    with pytest.raises(KeyboardInterrupt), impl.atomic_write(tmp_path / "never.json") as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert _listing(tmp_path) == []


def _numpy_save_through_a_file_object(tmp: Path) -> None:
    with open(tmp, "wb") as fh:
        np.save(fh, np.arange(5))  # np.save(path) would append ".npy" to the temporary name


def _numpy_savetxt_to_the_path(tmp: Path) -> None:
    np.savetxt(tmp, np.arange(5))


@pytest.mark.parametrize(
    ("writer", "reader", "name"),
    [
        (_numpy_save_through_a_file_object, np.load, "a.npy"),
        (_numpy_savetxt_to_the_path, np.loadtxt, "a.txt"),
    ],
    ids=["file-object", "path"],
)
def test_a_library_writer_publishes_its_data(
    impl: ModuleType,
    tmp_path: Path,
    writer: Callable[[Path], None],
    reader: Callable[[Path], np.ndarray],
    name: str,
) -> None:
    """A library writer given the yielded path (or a file opened on it) publishes its data."""
    with impl.atomic_write(tmp_path / name) as tmp:
        writer(tmp)
    np.testing.assert_array_equal(reader(tmp_path / name), np.arange(5))


def _is_directory(fd: int) -> bool:
    return stat.S_ISDIR(os.fstat(fd).st_mode)


def test_atomic_write_fsyncs_the_file_then_replaces_then_fsyncs_the_directory(
    impl: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The durable steps run in the order fsync(file), replace, fsync(directory)."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if _is_directory(fd) else "fsync file")
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with impl.atomic_write(tmp_path / "f") as tmp:
        tmp.write_text("x")
    assert events == ["fsync file", "replace", "fsync dir"]


# --------------------------------------------------------------------------------------------
# (c) publish_directory


def test_publish_directory_creates_and_replaces(impl: ModuleType, tmp_path: Path) -> None:
    """Publishing creates `target`, then replaces it with exactly the new tree, nothing beside."""
    target = tmp_path / "ckpt"
    first = tmp_path / ".ckpt.staging-1"
    _make_tree(first, OLD_TREE)
    impl.publish_directory(first, target)
    assert _tree(target) == OLD_TREE
    second = tmp_path / ".ckpt.staging-2"
    _make_tree(second, NEW_TREE)
    impl.publish_directory(second, target)
    assert _tree(target) == NEW_TREE  # no old file survives
    assert list(tmp_path.iterdir()) == [target]


def test_publish_directory_puts_the_old_one_back_when_the_rename_fails(
    impl: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed rename into place raises, with the old `target` back and staging untouched."""
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
    """SIGKILL before, between or after publish's two renames leaves only complete trees."""
    target, staging = tmp_path / "ckpt", tmp_path / ".ckpt.staging"
    _make_tree(target, OLD_TREE)
    _make_tree(staging, NEW_TREE)
    _run_until_killed([impl.__name__, "publish", str(target), stop, str(staging)])

    trees = {p.name: _tree(p) for p in tmp_path.iterdir()}
    assert all(tree in (OLD_TREE, NEW_TREE) for tree in trees.values()), "a mixed directory"
    if stop == "aside":  # the old one is still the target
        assert trees[target.name] == OLD_TREE
    elif stop == "into-place":  # no target, but the complete old one beside it, the new in staging
        assert target.name not in trees
        assert [name for name, tree in trees.items() if tree == OLD_TREE] != []
        assert trees[staging.name] == NEW_TREE
    else:  # the new one is the target
        assert trees[target.name] == NEW_TREE
        assert OLD_TREE in trees.values()  # killed before the old one was removed


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fds through Linux /proc")
def test_publish_directory_fsyncs_the_staged_tree_before_the_rename(
    impl: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every staged file and directory is fsynced before the rename; the parent after it."""
    staging = tmp_path / ".staging"
    _make_tree(staging, {"a": b"1", "b": b"2", "sub/c": b"3"})
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def record(real: Callable[..., None]) -> Callable[..., None]:
        def rename(src: object, dst: object, *args: object, **kwargs: object) -> None:
            synced.append("rename")
            real(src, dst, *args, **kwargs)

        return rename

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", record(os.rename))
    monkeypatch.setattr(os, "replace", record(os.replace))
    impl.publish_directory(staging, tmp_path / "ds")
    assert synced.count("rename") == 1
    before = synced[: synced.index("rename")]
    expected = {str(staging / name) for name in ("a", "b", "sub/c", "sub", "")}
    assert {p.rstrip("/") for p in before} == {p.rstrip("/") for p in expected}
    assert synced[synced.index("rename") + 1 :] == [str(tmp_path)]


def test_publish_directory_refuses_a_missing_staging_directory(
    impl: ModuleType, tmp_path: Path
) -> None:
    """A staging path that is not a directory is refused with its name, and nothing is created."""
    with pytest.raises(NotADirectoryError, match="nothing"):
        impl.publish_directory(tmp_path / "nothing", tmp_path / "ds")
    assert _listing(tmp_path) == []


# --------------------------------------------------------------------------------------------
# (d) the fsync contract: skip only "directories cannot be synced here", raise everything else


def test_publish_directory_refuses_a_file_where_the_target_should_be(
    impl: ModuleType, tmp_path: Path
) -> None:
    """A regular file at the target is not a directory to replace: refused, and kept as it was."""
    target = tmp_path / "model"
    target.write_bytes(b"someone's notes")
    staging = tmp_path / ".model.staging"
    _make_tree(staging, {"a": b"1"})
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        impl.publish_directory(staging, target)
    assert target.read_bytes() == b"someone's notes"
    assert _tree(staging) == {"a": b"1"}


def test_atomic_write_refuses_a_directory_before_the_block_runs(
    impl: ModuleType, tmp_path: Path
) -> None:
    """A directory at the path is refused before any work is done in the block."""
    (tmp_path / "out").mkdir()
    ran = []
    with (
        pytest.raises(IsADirectoryError, match="use publish_directory"),
        impl.atomic_write(tmp_path / "out"),
    ):
        ran.append(True)
    assert ran == [] and _listing(tmp_path) == ["out"]


def test_a_leftover_old_directory_is_a_warning_not_a_failed_publish(
    impl: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When the replaced directory cannot be removed, the new one is in place: publish returns and
    says which leftover to delete."""
    target, staging = tmp_path / "model", tmp_path / ".model.staging"
    _make_tree(target, {"a": b"old"})
    _make_tree(staging, {"a": b"new"})

    def refuse(path: object, *args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "read-only", str(path))

    monkeypatch.setattr(shutil, "rmtree", refuse)
    with caplog.at_level("WARNING"):
        impl.publish_directory(staging, target)
    assert _tree(target) == {"a": b"new"}
    assert "could not remove the replaced directory" in caplog.text


def _fsync_failing_on(kind: int, code: int) -> Callable[[int], None]:
    """os.fsync that raises OSError(`code`) for descriptors of file type `kind` (S_IFDIR or
    S_IFREG) and syncs everything else."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_IFMT(os.fstat(fd).st_mode) == kind:
            raise OSError(code, os.strerror(code))
        real(fd)

    return fsync


def _open_failing_on_directories(code: int, refused: list[str]) -> Callable[..., int]:
    """os.open that raises OSError(`code`) for directories (appending their path to `refused`)
    and opens everything else."""
    real = os.open

    def open_(
        path: str | os.PathLike[str], flags: int, mode: int = 0o777, *, dir_fd: int | None = None
    ) -> int:
        if dir_fd is None and os.path.isdir(path):
            refused.append(os.fspath(path))
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real(path, flags, mode, dir_fd=dir_fd)

    return open_


# EOPNOTSUPP equals ENOTSUP on Linux; the set keeps one test per distinct value.
@pytest.mark.parametrize(
    "code",
    sorted({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}),
    ids=errno.errorcode.get,
)
def test_directories_that_cannot_be_fsynced_are_skipped(
    impl: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """A directory fsync answering "not possible here" lets both write and publish complete."""
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
    """An EIO or ENOSPC from a directory fsync is raised by both write and publish."""
    # the caller must not believe the data is safely on disk
    monkeypatch.setattr(os, "fsync", _fsync_failing_on(stat.S_IFDIR, code))
    with pytest.raises(OSError) as raised, impl.atomic_write(tmp_path / "file") as tmp:
        tmp.write_bytes(b"new")
    assert raised.value.errno == code
    staging = tmp_path / ".dir.staging"
    _make_tree(staging, NEW_TREE)
    with pytest.raises(OSError) as raised:
        impl.publish_directory(staging, tmp_path / "dir")
    assert raised.value.errno == code


@pytest.mark.parametrize("previous", [b"old", None], ids=["over-a-file", "first-write"])
def test_file_fsync_error_keeps_the_previous_state(
    impl: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, previous: bytes | None
) -> None:
    """A file whose data cannot be fsynced (EIO) is never renamed in, and its temporary goes."""
    target = tmp_path / "file"
    if previous is not None:
        target.write_bytes(previous)
    monkeypatch.setattr(os, "fsync", _fsync_failing_on(stat.S_IFREG, errno.EIO))
    with pytest.raises(OSError, match="Input/output") as raised, impl.atomic_write(target) as tmp:
        tmp.write_bytes(b"new")
    assert raised.value.errno == errno.EIO
    if previous is None:
        assert _listing(tmp_path) == []
    else:
        assert target.read_bytes() == previous
        assert _listing(tmp_path) == [target.name]


@pytest.mark.parametrize("code", [errno.EACCES, errno.EISDIR], ids=errno.errorcode.get)
def test_directories_that_cannot_be_opened_are_skipped(
    impl: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """Where opening a directory is refused (EACCES, EISDIR), write and publish still complete."""
    staging = tmp_path / ".dir.staging"
    _make_tree(staging, NEW_TREE)
    refused: list[str] = []
    monkeypatch.setattr(os, "open", _open_failing_on_directories(code, refused))
    with impl.atomic_write(tmp_path / "file") as tmp:
        tmp.write_bytes(b"new")
    impl.publish_directory(staging, tmp_path / "dir")
    monkeypatch.undo()
    assert (tmp_path / "file").read_bytes() == b"new"
    assert _tree(tmp_path / "dir") == NEW_TREE
    assert str(tmp_path) in refused  # the refusal was really met, and skipped


@pytest.mark.parametrize("code", [errno.ENOENT, errno.EIO], ids=errno.errorcode.get)
def test_other_directory_open_errors_are_raised(
    impl: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """Any other error opening a directory for fsync (ENOENT, EIO) is raised by write and publish."""
    staging = tmp_path / ".dir.staging"
    _make_tree(staging, NEW_TREE)
    monkeypatch.setattr(os, "open", _open_failing_on_directories(code, []))
    with pytest.raises(OSError) as raised, impl.atomic_write(tmp_path / "file") as tmp:
        tmp.write_bytes(b"new")
    assert raised.value.errno == code
    with pytest.raises(OSError) as raised:
        impl.publish_directory(staging, tmp_path / "dir")
    assert raised.value.errno == code
    if code == errno.ENOENT:  # a missing directory is a FileNotFoundError, not silently skipped
        assert isinstance(raised.value, FileNotFoundError)
