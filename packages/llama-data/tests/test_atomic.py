"""llama_data's crash-safe writes: `atomic_write`, `publish_directory` and the directory fsync.

The SIGKILL contract test for both implementations (this one and llama-model's) lives at the
repository root, `tests/test_atomic_writes.py`; these tests pin the behaviour of this module alone.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from llama_data import _atomic
from llama_data._atomic import atomic_write, publish_directory


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_atomic_write_yields_a_path_beside_the_target_and_replaces_it(tmp_path: Path) -> None:
    """The yielded path is a temporary file in the target's directory; a clean exit replaces the
    target with what was written there and leaves no temporary file."""
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_write(target) as temporary:
        assert temporary.parent == tmp_path and temporary != target and temporary.is_file()
        temporary.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # nothing visible before the exit
    assert target.read_bytes() == b"new"
    assert _listing(tmp_path) == ["out.bin"]


def test_atomic_write_accepts_writers_that_take_a_path(tmp_path: Path) -> None:
    """A writer given a file object opened on the yielded path (numpy.save) publishes its data."""
    target = tmp_path / "a.npy"
    with atomic_write(target) as temporary, open(temporary, "wb") as fh:
        np.save(fh, np.arange(5))
    np.testing.assert_array_equal(np.load(target), np.arange(5))


def test_atomic_write_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    """An exception in the body leaves the target's previous content and no temporary file."""
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_write(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert _listing(tmp_path) == ["out.txt"]


def test_atomic_write_failure_without_a_previous_file_leaves_nothing(tmp_path: Path) -> None:
    """A failed first write leaves no target and no temporary file."""
    with pytest.raises(KeyboardInterrupt), atomic_write(tmp_path / "new.txt") as temporary:
        temporary.write_text("half")
        raise KeyboardInterrupt
    assert _listing(tmp_path) == []


def test_atomic_write_gives_the_permissions_of_a_plain_open(tmp_path: Path) -> None:
    """The published file has 0o666 less the umask, like open(path, "w"), not mkstemp's 0o600."""
    umask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "f") as temporary:
            temporary.write_text("x")
    finally:
        os.umask(umask)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order of durable steps is: fsync(file), replace, fsync(directory)."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with atomic_write(tmp_path / "f") as temporary:
        temporary.write_text("x")
    assert events == ["fsync file", "replace", "fsync dir"]


@pytest.mark.parametrize(
    "code", [errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF], ids=errno.errorcode.get
)
def test_directory_fsync_ignores_only_unsupported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """fsync errors meaning "directories cannot be fsynced here" are ignored."""

    def refuse(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", refuse)
    _atomic._fsync_directory(tmp_path)  # no error


def test_directory_fsync_raises_io_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO from fsync (a failing disk) is raised, and an atomic write then fails loudly."""

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError) as info:
        _atomic._fsync_directory(tmp_path)
    assert info.value.errno == errno.EIO
    with pytest.raises(OSError, match="Input/output"), atomic_write(tmp_path / "f") as temporary:
        temporary.write_text("x")
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("code", [errno.EACCES, errno.EISDIR], ids=errno.errorcode.get)
def test_directory_open_refusals_are_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """A platform that refuses to open a directory (EACCES, EISDIR) is not an error."""
    real_open = os.open

    def open_(path: str | os.PathLike[str], flags: int, *args: int) -> int:
        if os.path.isdir(path):
            raise OSError(code, os.strerror(code))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_)
    _atomic._fsync_directory(tmp_path)


def test_directory_open_other_errors_are_raised(tmp_path: Path) -> None:
    """A directory that does not exist is an error, not silently skipped."""
    with pytest.raises(FileNotFoundError):
        _atomic._fsync_directory(tmp_path / "missing")


def _staging(parent: Path, files: dict[str, str]) -> Path:
    staging = parent / ".staging"
    for name, text in files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text(text)
    return staging


def test_publish_directory_to_a_new_target(tmp_path: Path) -> None:
    """Staging becomes the target, nested files included; nothing else is left."""
    staging = _staging(tmp_path, {"a": "1", "sub/b": "2"})
    publish_directory(staging, tmp_path / "ds")
    assert (tmp_path / "ds" / "a").read_text() == "1"
    assert (tmp_path / "ds" / "sub" / "b").read_text() == "2"
    assert _listing(tmp_path) == ["ds"]


def test_publish_directory_replaces_an_existing_target(tmp_path: Path) -> None:
    """An existing target is replaced whole (old files gone) and the old copy removed."""
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "old").write_text("x")
    publish_directory(_staging(tmp_path, {"new": "y"}), tmp_path / "ds")
    assert _listing(tmp_path / "ds") == ["new"]
    assert _listing(tmp_path) == ["ds"]


def test_publish_directory_restores_the_old_target_when_the_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If renaming staging into place fails, the old target is put back unchanged."""
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "old").write_text("x")
    staging = _staging(tmp_path, {"new": "y"})
    real_rename = os.rename

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(src) == staging:
            raise OSError(errno.EIO, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="Input/output"):
        publish_directory(staging, tmp_path / "ds")
    assert (tmp_path / "ds" / "old").read_text() == "x"
    assert _listing(tmp_path) == [".staging", "ds"]


def test_publish_directory_fsyncs_every_file_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each staged file, each staged directory and the parent are fsynced; files come first."""
    staging = _staging(tmp_path, {"a": "1", "b": "2", "sub/c": "3"})
    synced: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        synced.append("rename")
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    publish_directory(staging, tmp_path / "ds")
    before = synced[: synced.index("rename")]
    expected = {str(staging / name) for name in ("a", "b", "sub/c", "sub", "")}
    assert {p.rstrip("/") for p in before} == {p.rstrip("/") for p in expected}
    assert synced[synced.index("rename") + 1 :] == [str(tmp_path)]


def test_publish_directory_refuses_a_missing_staging_directory(tmp_path: Path) -> None:
    """A staging path that is not a directory is named in the error."""
    with pytest.raises(NotADirectoryError, match="nothing"):
        publish_directory(tmp_path / "nothing", tmp_path / "ds")
