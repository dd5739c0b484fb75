# SPDX-License-Identifier: Apache-2.0
"""The step's token file in its secret filesystem (threats T-V04, T-V13, T-MT02; catalog 81).

Attacker: another step or local user who wants the token, or whoever would
plant something where the engine writes it. Expected: the token goes into a
fresh detached tmpfs no host path names (nothing to plant), as a 0o400 file
owned by the step uid in a root-owned 0o550 directory of the step's group;
the step reads it, every other uid is refused; nothing is reused.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from haios.errors import InternalError, SandboxSetupError
from haios.sandbox.stepfs import StepFs, StepMounts
from haios.secrets import TOKEN_FILE_NAME, IssuedToken, write_token_into

TOKEN = "s.Zk3JvQq0pH1xW8nYtB7cLmRa"
STEP_UID = STEP_GID = 190_555


@pytest.fixture
def secret() -> Iterator[StepFs]:
    mounts = StepMounts.create(STEP_UID, STEP_GID, workspace_bytes=1 << 20,
                               workspace_inodes=64, with_secret=True)
    assert mounts.secret is not None
    yield mounts.secret
    mounts.close()


def _issued() -> IssuedToken:
    return IssuedToken("acc-1", TOKEN, 60)


def _view(fs: StepFs) -> Path:
    return Path(f"/proc/self/fd/{fs.dir.fd}")


def test_token_file_holds_the_token_alone_readable_only_by_the_step(secret: StepFs) -> None:
    write_token_into(secret.dir.fd, _issued(), STEP_UID, STEP_GID)

    token_file = _view(secret) / TOKEN_FILE_NAME
    file_info = token_file.lstat()
    dir_info = os.fstat(secret.dir.fd)
    assert stat.S_ISREG(file_info.st_mode)
    assert stat.S_IMODE(file_info.st_mode) == 0o400
    assert (file_info.st_uid, file_info.st_gid) == (STEP_UID, STEP_GID)
    assert stat.S_IMODE(dir_info.st_mode) == 0o550
    assert (dir_info.st_uid, dir_info.st_gid) == (0, STEP_GID)
    assert os.listdir(secret.dir.fd) == [TOKEN_FILE_NAME]
    assert token_file.read_bytes() == TOKEN.encode()


def _read_as(fs: StepFs, uid: int, gid: int) -> subprocess.CompletedProcess[bytes]:
    """`cat` the token through the inherited descriptor, as uid:gid."""
    fd = fs.dir.fd
    return subprocess.run(["/bin/cat", f"/proc/self/fd/{fd}/{TOKEN_FILE_NAME}"], user=uid,
                          group=gid, extra_groups=[], cwd="/", pass_fds=[fd],
                          capture_output=True, check=False)


def test_step_uid_reads_the_token_and_another_uid_cannot(secret: StepFs) -> None:
    write_token_into(secret.dir.fd, _issued(), STEP_UID, STEP_GID)

    own = _read_as(secret, STEP_UID, STEP_GID)
    other_uid_same_group = _read_as(secret, 65533, STEP_GID)
    other = _read_as(secret, 65533, 65533)

    assert own.returncode == 0, own.stderr
    assert own.stdout == TOKEN.encode()
    for denied in (other_uid_same_group, other):
        assert denied.returncode != 0
        assert b"Permission denied" in denied.stderr
        assert TOKEN.encode() not in denied.stdout + denied.stderr


def test_a_used_filesystem_is_refused_not_reused(secret: StepFs) -> None:
    write_token_into(secret.dir.fd, _issued(), STEP_UID, STEP_GID)
    with pytest.raises(SandboxSetupError, match="not fresh"):
        write_token_into(secret.dir.fd, IssuedToken("acc-2", "s.other", 60), STEP_UID, STEP_GID)
    assert (_view(secret) / TOKEN_FILE_NAME).read_text() == TOKEN


def test_a_directory_open_to_others_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    fd = os.open(shared, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(SandboxSetupError, match="not fresh and private") as caught:
            write_token_into(fd, _issued(), STEP_UID, STEP_GID)
        assert TOKEN not in str(caught.value)
        assert os.listdir(shared) == []
    finally:
        os.close(fd)


def test_a_directory_of_another_owner_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o750)
    os.chown(theirs, 4242, STEP_GID)
    fd = os.open(theirs, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(SandboxSetupError):
            write_token_into(fd, _issued(), STEP_UID, STEP_GID)
    finally:
        os.close(fd)


@pytest.mark.parametrize(("uid", "gid"), [(0, 1000), (1000, 0), (-1, 1000)])
def test_token_file_is_never_given_to_root(secret: StepFs, uid: int, gid: int) -> None:
    with pytest.raises(InternalError):
        write_token_into(secret.dir.fd, _issued(), uid, gid)
    assert os.listdir(secret.dir.fd) == []


def test_the_token_is_gone_with_the_filesystem() -> None:
    mounts = StepMounts.create(STEP_UID, STEP_GID, workspace_bytes=1 << 20,
                               workspace_inodes=64, with_secret=True)
    assert mounts.secret is not None
    write_token_into(mounts.secret.dir.fd, _issued(), STEP_UID, STEP_GID)
    mounts.close()
    # Nothing of it was ever under a host path; its mount table entry never existed.
    assert " haios " not in Path("/proc/self/mountinfo").read_text()
