# SPDX-License-Identifier: Apache-2.0
"""The step's detached filesystems (threats T-MT01, T-MT02, T-MT05, T-V04).

Attacker: a client who wants a host path to aim at (there must be none), a
step that fills its workspace, another uid that wants the token. Expected:
the mounts never appear in the host's mount table, are capped in bytes and
inodes, belong to the step (the secret one to root, group the step), and the
token file written into the secret filesystem is the step's alone.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from haios.errors import InternalError, SandboxSetupError
from haios.sandbox.stepfs import StepFs, StepMounts, open_capture, read_capture
from haios.secrets import TOKEN_FILE_NAME, IssuedToken, write_token_into

UID = 190_777
TOKEN = "s.Zk3JvQq0pH1xW8nYtB7cLmRa"


def _view(fs: StepFs) -> Path:
    return Path(f"/proc/self/fd/{fs.dir.fd}")


def test_filesystems_exist_under_no_host_path() -> None:
    mounts = StepMounts.create(UID, UID, workspace_bytes=1 << 20, workspace_inodes=64,
                               with_secret=True)
    try:
        before = Path("/proc/self/mountinfo").read_text()
        (_view(mounts.workspace) / "marker").write_text("x")
        assert Path("/proc/self/mountinfo").read_text() == before
        assert " haios " not in before
    finally:
        mounts.close()


def test_workspace_belongs_to_the_step_and_is_capped() -> None:
    mounts = StepMounts.create(UID, UID, workspace_bytes=1 << 20, workspace_inodes=64,
                               with_secret=False)
    try:
        info = os.fstat(mounts.workspace.dir.fd)
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (UID, UID, 0o700)
        assert mounts.secret is None
        with pytest.raises(OSError) as full:
            (_view(mounts.workspace) / "big").write_bytes(b"\0" * (2 << 20))
        assert full.value.errno == errno.ENOSPC
        (_view(mounts.workspace) / "big").unlink()
        with pytest.raises(OSError) as inodes:
            for index in range(1000):
                (_view(mounts.workspace) / f"f{index}").touch()
        assert inodes.value.errno == errno.ENOSPC
    finally:
        mounts.close()


def test_clones_share_the_files_and_close_cleanly() -> None:
    mounts = StepMounts.create(UID, UID, workspace_bytes=1 << 20, workspace_inodes=64,
                               with_secret=False)
    try:
        work, cost, secret = mounts.clone_fds()
        try:
            assert secret == -1
            Path(f"/proc/self/fd/{work}/from-clone").write_text("seen")
            assert (_view(mounts.workspace) / "from-clone").read_text() == "seen"
        finally:
            os.close(work)
            os.close(cost)
    finally:
        mounts.close()
    mounts.close()  # idempotent


def test_token_is_the_steps_alone() -> None:
    mounts = StepMounts.create(UID, UID, workspace_bytes=1 << 20, workspace_inodes=64,
                               with_secret=True)
    try:
        assert mounts.secret is not None
        root = os.fstat(mounts.secret.dir.fd)
        assert (root.st_uid, root.st_gid, stat.S_IMODE(root.st_mode)) == (0, UID, 0o550)
        write_token_into(mounts.secret.dir.fd, IssuedToken("acc-1", TOKEN, 60), UID, UID)
        token = _view(mounts.secret) / TOKEN_FILE_NAME
        info = token.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (UID, UID, 0o400)
        assert token.read_text() == TOKEN
        # A second write into the same filesystem is refused, never merged.
        with pytest.raises(SandboxSetupError, match="not fresh"):
            write_token_into(mounts.secret.dir.fd, IssuedToken("acc-2", TOKEN, 60), UID, UID)
    finally:
        mounts.close()


@pytest.mark.parametrize(("uid", "gid"), [(0, UID), (UID, 0)])
def test_token_is_never_given_to_root(uid: int, gid: int) -> None:
    mounts = StepMounts.create(UID, UID, workspace_bytes=1 << 20, workspace_inodes=64,
                               with_secret=True)
    try:
        assert mounts.secret is not None
        with pytest.raises(InternalError):
            write_token_into(mounts.secret.dir.fd, IssuedToken("acc-1", TOKEN, 60), uid, gid)
        assert os.listdir(mounts.secret.dir.fd) == []
    finally:
        mounts.close()


def test_token_refused_in_a_filesystem_open_to_others(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    fd = os.open(shared, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(SandboxSetupError, match="not fresh and private"):
            write_token_into(fd, IssuedToken("acc-1", TOKEN, 60), UID, UID)
        assert os.listdir(shared) == []
    finally:
        os.close(fd)


def test_capture_holds_what_was_written() -> None:
    fd = open_capture("out")
    try:
        os.write(fd, b"hello")
        assert read_capture(fd, 3) == b"hel"
        assert read_capture(fd, 100) == b"hello"
    finally:
        os.close(fd)
