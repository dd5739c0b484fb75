# SPDX-License-Identifier: Apache-2.0
"""The step's token file on the host (threat T-V04, attack catalog case 81).

Attacker: another step or local user who wants the token, or whoever can
plant a symlink or a stale directory where the engine writes it. Expected:
0o400 file owned by the step uid, a directory others cannot enter, no link
followed, nothing reused, and everything gone after `shred_token_dir`.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from haios.errors import InternalError, SandboxSetupError
from haios.secrets import TOKEN_FILE_NAME, IssuedToken, shred_token_dir, write_token_file

TOKEN = "s.Zk3JvQq0pH1xW8nYtB7cLmRa"
IS_ROOT = os.geteuid() == 0
# As root the file goes to an unprivileged uid, as the engine does; otherwise
# to our own ids (a rootless engine can only give files to itself).
STEP_UID, STEP_GID = (65534, 65534) if IS_ROOT else (os.getuid(), os.getgid())
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root to act as another uid")


@pytest.fixture
def secret_dir(tmp_path: Path) -> Path:
    return tmp_path / "secret"


@pytest.fixture
def traversable_secret_dir() -> Iterator[Path]:
    """A secret dir whose parents other uids may traverse (pytest's are 0o700).

    The engine's real parent is private; the step reaches the file through
    its view. Here other uids must get as far as the directory itself, so
    that the directory's and the file's own modes are what is tested.
    """
    parent = Path(tempfile.mkdtemp(prefix="haios-tokenfile-"))
    parent.chmod(0o711)
    yield parent / "secret"
    shutil.rmtree(parent)


def _issued() -> IssuedToken:
    return IssuedToken("acc-1", TOKEN, 60)


def test_token_file_holds_the_token_alone_readable_only_by_the_step(secret_dir: Path) -> None:
    write_token_file(secret_dir, _issued(), STEP_UID, STEP_GID)

    token_file = secret_dir / TOKEN_FILE_NAME
    file_info = token_file.lstat()
    dir_info = secret_dir.lstat()
    assert stat.S_ISREG(file_info.st_mode)
    assert stat.S_IMODE(file_info.st_mode) == 0o400
    assert (file_info.st_uid, file_info.st_gid) == (STEP_UID, STEP_GID)
    assert stat.S_IMODE(dir_info.st_mode) == 0o550
    assert (dir_info.st_uid, dir_info.st_gid) == (os.geteuid(), STEP_GID)
    assert os.listdir(secret_dir) == [TOKEN_FILE_NAME]
    assert token_file.read_bytes() == TOKEN.encode()


@needs_root
def test_step_uid_reads_the_token_and_another_uid_cannot(traversable_secret_dir: Path) -> None:
    write_token_file(traversable_secret_dir, _issued(), STEP_UID, STEP_GID)
    read = ["/bin/cat", str(traversable_secret_dir / TOKEN_FILE_NAME)]

    own = _run_as(read, STEP_UID, STEP_GID)
    other_uid_same_group = _run_as(read, 65533, STEP_GID)
    other = _run_as(read, 65533, 65533)

    assert own.returncode == 0
    assert own.stdout == TOKEN.encode()
    for denied in (other_uid_same_group, other):
        assert denied.returncode != 0
        assert b"Permission denied" in denied.stderr
        assert TOKEN.encode() not in denied.stdout + denied.stderr


def _run_as(argv: list[str], uid: int, gid: int) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        argv, user=uid, group=gid, extra_groups=[], cwd="/", capture_output=True, check=False
    )


def test_existing_directory_is_refused_not_reused(secret_dir: Path) -> None:
    secret_dir.mkdir()
    (secret_dir / "token").write_text("old")

    with pytest.raises(SandboxSetupError, match="already exists"):
        write_token_file(secret_dir, _issued(), STEP_UID, STEP_GID)
    assert (secret_dir / "token").read_text() == "old"


def test_planted_symlink_is_not_followed(secret_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "attacker"
    target.mkdir()
    secret_dir.symlink_to(target)

    with pytest.raises(SandboxSetupError):
        write_token_file(secret_dir, _issued(), STEP_UID, STEP_GID)
    assert list(target.iterdir()) == []


def test_missing_parent_fails_cleanly_without_the_token_in_the_message(tmp_path: Path) -> None:
    with pytest.raises(SandboxSetupError) as caught:
        write_token_file(tmp_path / "absent" / "secret", _issued(), STEP_UID, STEP_GID)
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize(("uid", "gid"), [(0, 1000), (1000, 0), (-1, 1000)])
def test_token_file_is_never_given_to_root(secret_dir: Path, uid: int, gid: int) -> None:
    with pytest.raises(InternalError):
        write_token_file(secret_dir, _issued(), uid, gid)
    assert not secret_dir.exists()


def test_shred_removes_the_directory_and_is_idempotent(secret_dir: Path) -> None:
    write_token_file(secret_dir, _issued(), STEP_UID, STEP_GID)

    shred_token_dir(secret_dir)
    assert not secret_dir.exists()
    shred_token_dir(secret_dir)  # a second call (resume after a crash) is fine


def test_shred_removes_unexpected_entries_without_following_links(
    secret_dir: Path, tmp_path: Path
) -> None:
    write_token_file(secret_dir, _issued(), STEP_UID, STEP_GID)
    outside = tmp_path / "keep"
    outside.mkdir()
    (outside / "file").write_text("keep")
    secret_dir.chmod(0o700)
    (secret_dir / "link").symlink_to(outside)
    (secret_dir / "sub").mkdir()
    (secret_dir / "sub" / "x").write_text("x")

    shred_token_dir(secret_dir)

    assert not secret_dir.exists()
    assert (outside / "file").read_text() == "keep"


def test_shred_refuses_a_symlink_in_place_of_the_directory(
    secret_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "victim"
    target.mkdir()
    (target / "token").write_text("victim")
    secret_dir.symlink_to(target)

    with pytest.raises(SandboxSetupError):
        shred_token_dir(secret_dir)
    assert (target / "token").read_text() == "victim"
