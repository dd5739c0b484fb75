# SPDX-License-Identifier: Apache-2.0
"""Unit tests of haios.watchdog.flags: presence by lstat, names, fail closed."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from haios.errors import InputError, PolicyLoadError
from haios.watchdog import flags


@pytest.fixture
def control(tmp_path: Path) -> Path:
    path = tmp_path / "control"
    path.mkdir()
    return path


def test_no_flag(control: Path) -> None:
    assert flags.global_flag_present(control, []) is None
    assert not flags.step_flag_present(control, "s1")


def test_missing_control_dir_means_no_flag(tmp_path: Path) -> None:
    assert flags.global_flag_present(tmp_path / "absent", []) is None


def test_control_that_is_a_file_means_no_flag(tmp_path: Path) -> None:
    (tmp_path / "control").write_text("x")
    assert flags.global_flag_present(tmp_path / "control", []) is None


def _socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()


MAKERS = {
    "file": lambda p: p.write_text("resume"),
    "empty_file": lambda p: p.touch(),
    "directory": lambda p: p.mkdir(),
    "dangling_symlink": lambda p: p.symlink_to("/nonexistent"),
    "symlink_to_file": lambda p: p.symlink_to("/etc/hostname"),
    "fifo": os.mkfifo,
    "socket": _socket,
}


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_any_entry_type_is_a_global_flag(control: Path, kind: str) -> None:
    MAKERS[kind](control / "KILL")
    assert flags.global_flag_present(control, []) == str(control / "KILL")


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_any_entry_type_is_a_step_flag(control: Path, kind: str) -> None:
    MAKERS[kind](control / "KILL.s1")
    assert flags.step_flag_present(control, "s1")
    assert not flags.step_flag_present(control, "s2")
    assert flags.global_flag_present(control, []) is None


def test_fifo_flag_is_never_opened(control: Path) -> None:
    """Opening a FIFO without a writer blocks; lstat does not."""
    os.mkfifo(control / "KILL")
    result: list[str | None] = []
    worker = threading.Thread(target=lambda: result.append(flags.global_flag_present(control, [])))
    worker.start()
    worker.join(5.0)
    assert not worker.is_alive()
    assert result == [str(control / "KILL")]


def test_extra_paths_are_global_flags(tmp_path: Path, control: Path) -> None:
    first, second = tmp_path / "a" / "KILL", tmp_path / "b" / "STOP"
    second.parent.mkdir()
    second.mkdir()
    assert flags.global_flag_present(control, [first, second]) == str(second)
    (control / "KILL").touch()
    assert flags.global_flag_present(control, [first, second]) == str(control / "KILL")


@pytest.mark.parametrize("path", ["relative/KILL", "KILL", "/", "/tmp/a\0b"])
def test_extra_paths_must_be_absolute_files(control: Path, path: str) -> None:
    with pytest.raises(PolicyLoadError):
        flags.global_flag_present(control, [Path(path)])


def test_unexaminable_flag_fails_closed(tmp_path: Path) -> None:
    """A symlink loop on the path (ELOOP) counts as a set flag."""
    control = tmp_path / "control"
    control.symlink_to(control)
    state = flags.global_flag_present(control, [])
    assert state is not None
    assert "cannot be examined" in state
    assert flags.step_flag_present(control, "s1")


@pytest.mark.parametrize("step_id", ["../s1", "s1/../../x", "S1", "", "é", "a" * 65, "s.1"])
def test_unsafe_step_ids_are_refused(control: Path, step_id: str) -> None:
    with pytest.raises(InputError):
        flags.step_flag_present(control, step_id)


@pytest.mark.parametrize(
    ("name", "step_id"),
    [
        ("KILL.s1", "s1"),
        ("KILL.a_b-c", "a_b-c"),
        ("KILL", None),
        ("KILL.", None),
        ("KILL.S1", None),
        ("KILL..", None),
        ("KILL.s1.x", None),
        ("kill.s1", None),
        ("XKILL.s1", None),
    ],
)
def test_step_id_of_flag_name(name: str, step_id: str | None) -> None:
    assert flags.step_id_of_flag_name(name) == step_id
