# SPDX-License-Identifier: Apache-2.0
"""The step's detached filesystems (threats T-MT01, T-MT02, T-MT05).

Attacker: a client who wants a host path to aim at (there must be none), or
a step that fills its workspace. Expected: the mounts never appear in the
host's mount table, are capped in bytes and inodes, and belong to the step.
The token file is tested in test_secrets_tokenfile.py.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from haios.sandbox.stepfs import StepFs, StepMounts, open_capture, read_capture

UID = 190_777


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


def test_capture_holds_what_was_written() -> None:
    fd = open_capture("out")
    try:
        os.write(fd, b"hello")
        assert read_capture(fd, 3) == b"hel"
        assert read_capture(fd, 100) == b"hello"
    finally:
        os.close(fd)
