# SPDX-License-Identifier: Apache-2.0
"""The engine's run area under state_dir (threats T-MT01, T-MT04).

Attacker: the client that owns os_root (can rename, relink and unlink
anything in it) or a local user who plants something on the way to
state_dir. Expected: the area is reached through root-owned, non-writable
directories only, is named by the os_root's inode, and its lock cannot be
bypassed from os_root.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from haios.area import RunArea, area_name, open_state_dir
from haios.errors import BusyError, EnvironmentUnavailableError


def _root_fd(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def test_state_dir_is_created_private(tmp_path: Path) -> None:
    state = tmp_path / "state" / "haios"
    with open_state_dir(state):
        pass
    assert (state.stat().st_mode & 0o777) == 0o700


def test_symlinked_component_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(EnvironmentUnavailableError, match="not a directory"):
        open_state_dir(tmp_path / "link" / "haios")
    assert not (tmp_path / "real" / "haios").exists()


def test_group_writable_component_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(0o775)
    with pytest.raises(EnvironmentUnavailableError, match="writable by group or others"):
        open_state_dir(parent / "haios")


def test_component_owned_by_another_uid_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "theirs"
    parent.mkdir(mode=0o755)
    os.chown(parent, 4242, 4242)
    with pytest.raises(EnvironmentUnavailableError, match="owned by uid 4242"):
        open_state_dir(parent / "haios")


def test_world_writable_state_dir_itself_is_refused_even_if_sticky(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o1777)
    with pytest.raises(EnvironmentUnavailableError, match="writable by group or others"):
        open_state_dir(state)


def test_second_run_on_the_same_os_root_is_busy(tmp_path: Path) -> None:
    fd = _root_fd(tmp_path / "os_root")
    try:
        first = RunArea.acquire(tmp_path / "state", fd)
        try:
            with pytest.raises(BusyError):
                RunArea.acquire(tmp_path / "state", fd)
        finally:
            first.close()
        RunArea.acquire(tmp_path / "state", fd).close()  # free again
    finally:
        os.close(fd)


def test_lock_survives_whatever_the_client_does_in_os_root(tmp_path: Path) -> None:
    """T-MT04: no lock file exists in os_root to unlink; renaming os_root
    keeps its inode, so a run on the renamed directory is still busy."""
    root = tmp_path / "os_root"
    fd = _root_fd(root)
    try:
        area = RunArea.acquire(tmp_path / "state", fd)
        try:
            assert os.listdir(root) == []
            root.rename(tmp_path / "renamed")
            other = _root_fd(tmp_path / "renamed")
            try:
                with pytest.raises(BusyError):
                    RunArea.acquire(tmp_path / "state", other)
            finally:
                os.close(other)
        finally:
            area.close()
    finally:
        os.close(fd)


def test_two_os_roots_get_two_areas(tmp_path: Path) -> None:
    first, second = _root_fd(tmp_path / "a"), _root_fd(tmp_path / "b")
    try:
        one = RunArea.acquire(tmp_path / "state", first)
        two = RunArea.acquire(tmp_path / "state", second)
        try:
            assert one.path != two.path
            assert one.path.parent == two.path.parent == tmp_path / "state" / "roots"
        finally:
            one.close()
            two.close()
    finally:
        os.close(first)
        os.close(second)


def test_fresh_store_drops_what_an_earlier_run_left(tmp_path: Path) -> None:
    fd = _root_fd(tmp_path / "os_root")
    try:
        area = RunArea.acquire(tmp_path / "state", fd)
        try:
            store = area.fresh_store()
            store.write_atomic("old.txt", b"stale")
            store.close()
            store = area.fresh_store()
            assert store.names() == []
            store.close()
            area.drop_store()
            assert not (area.path / "store").exists()
        finally:
            area.close()
    finally:
        os.close(fd)


def test_an_area_is_named_by_device_inode_and_birth_time(tmp_path: Path) -> None:
    """A directory made later on a reused inode gets another area (birth time)."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    names = []
    for path in (first, second):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            names.append(area_name(fd))
        finally:
            os.close(fd)
        info = os.stat(path)
        assert names[-1].startswith(f"{info.st_dev:x}-{info.st_ino:x}-")  # ext4 keeps btime
    birth = [int(name.rsplit("-", 1)[1], 16) for name in names]
    assert 0 < birth[0] <= birth[1]
    assert names[0] != names[1]
