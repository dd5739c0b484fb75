# SPDX-License-Identifier: Apache-2.0
"""No-follow, regular-only, capped reads; atomic writes never through a link (D13-D14, D45)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from haios._util.safedir import SafeDir, sha256_fd
from haios.errors import BusyError, InputError, PathError


@pytest.fixture
def root(tmp_path: Path) -> SafeDir:
    return SafeDir.open(tmp_path)


def test_symlinked_file_is_refused(tmp_path: Path, root: SafeDir) -> None:
    (tmp_path / "target").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(PathError, match="symlink"):
        root.read_bytes("link", max_bytes=10)


def test_fifo_is_refused_without_blocking(tmp_path: Path, root: SafeDir) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(PathError, match="FIFO"):
        root.read_bytes("fifo", max_bytes=10)


def test_directory_and_socket_are_refused(tmp_path: Path, root: SafeDir) -> None:
    (tmp_path / "dir").mkdir()
    with pytest.raises(PathError):
        root.read_bytes("dir", max_bytes=10)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    with pytest.raises(PathError):
        root.read_bytes("sock", max_bytes=10)
    sock.close()


def test_hardlinked_file_is_refused(tmp_path: Path, root: SafeDir) -> None:
    (tmp_path / "a").write_text("x")
    os.link(tmp_path / "a", tmp_path / "b")
    with pytest.raises(PathError, match="hard links"):
        root.read_bytes("a", max_bytes=10)


def test_sparse_oversize_file_is_refused_without_reading(tmp_path: Path, root: SafeDir) -> None:
    with open(tmp_path / "huge", "wb") as handle:
        handle.truncate(10 << 30)
    with pytest.raises(InputError, match="exceeds"):
        root.read_bytes("huge", max_bytes=1 << 20)


def test_symlinked_directory_is_refused(tmp_path: Path, root: SafeDir) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "inbox").symlink_to(tmp_path / "real")
    with pytest.raises(PathError):
        root.sub("inbox")


@pytest.mark.parametrize("kind", ["symlink", "fifo", "dir", "hardlink"])
def test_atomic_write_never_goes_through_a_planted_entry(tmp_path: Path, root: SafeDir,
                                                         kind: str) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "state.json"
    if kind == "symlink":
        target.symlink_to(victim)
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "dir":
        target.mkdir()
    else:
        os.link(victim, target)
    with pytest.raises(PathError):
        root.write_atomic("state.json", b"new")
    assert victim.read_text() == "precious"


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path, root: SafeDir) -> None:
    root.write_atomic("f", b"one")
    root.write_atomic("f", b"two")
    assert (tmp_path / "f").read_bytes() == b"two"
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_lock_is_exclusive(tmp_path: Path, root: SafeDir) -> None:
    other = SafeDir.open(tmp_path)
    with root.exclusive_lock(".lock"), pytest.raises(BusyError), other.exclusive_lock(".lock"):
        pass
    with other.exclusive_lock(".lock"):
        pass


def test_lock_file_is_not_truncated_through_a_symlink(tmp_path: Path, root: SafeDir) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / ".lock").symlink_to(victim)
    with pytest.raises(PathError), root.exclusive_lock(".lock"):
        pass
    assert victim.read_text() == "precious"


def test_sha256_fd_matches_hashlib(tmp_path: Path) -> None:
    import hashlib

    data = os.urandom(3 << 20) + b"tail"
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        assert sha256_fd(fd, len(data)) == hashlib.sha256(data).hexdigest()
        assert sha256_fd(fd, 0) == hashlib.sha256(b"").hexdigest()
    finally:
        os.close(fd)
