# SPDX-License-Identifier: Apache-2.0
"""No-follow, regular-only, capped reads; atomic writes never through a link (D13-D14, D45)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from haios._util.safedir import SafeDir, sha256_fd
from haios.errors import CopyError, InputError, PathError
from haios.sandbox.stepfs import StepFs


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


def test_publish_across_file_system_types(tmp_path: Path) -> None:
    """The store (disk) and a step's tmpfs or os_root may differ in type,
    where copy_file_range refuses: the copy still happens in the kernel."""
    fs = StepFs.create("test", size_bytes=1 << 20, inodes=16, mode=0o700, uid=0, gid=0)
    try:
        fs.dir.write_atomic("src.bin", b"x" * 70_000)
        fd, size = fs.dir.open_regular("src.bin")
        try:
            with SafeDir.open(tmp_path) as dest:
                dest.write_atomic_from("copy.bin", fd, size)
        finally:
            os.close(fd)
    finally:
        fs.close()
    assert (tmp_path / "copy.bin").read_bytes() == b"x" * 70_000


def test_full_destination_is_an_environment_error_not_a_crash() -> None:
    fs = StepFs.create("test", size_bytes=64 * 1024, inodes=16, mode=0o700, uid=0, gid=0)
    try:
        with pytest.raises(CopyError, match="No space left"):
            fs.dir.write_atomic("big.bin", b"x" * (1 << 20))
        assert fs.dir.names() == []  # the temp file is gone too
    finally:
        fs.close()
