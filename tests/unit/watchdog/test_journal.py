# SPDX-License-Identifier: Apache-2.0
"""Unit tests of haios.watchdog._journal: durable appends, no planted entries."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from haios.errors import EnvironmentUnavailableError
from haios.watchdog._journal import SCHEMA, Journal


def test_records_are_appended_as_json_lines_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path, "r1")
    journal.append("started", pid=1)
    journal.close()
    journal = Journal(path, "r2")
    journal.append("killed", step_id="s1", complete=True)
    journal.close()
    journal.close()
    assert path.stat().st_mode & 0o777 == 0o600
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["run_id"], r["event"]) for r in records] == [("r1", "started"), ("r2", "killed")]
    assert all(r["schema"] == SCHEMA for r in records)
    assert records[1]["step_id"] == "s1"
    assert records[1]["time"].endswith("+00:00")


def test_symlink_at_the_journal_path_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("harness-owned\n")
    (tmp_path / "journal").symlink_to(target)
    with pytest.raises(EnvironmentUnavailableError):
        Journal(tmp_path / "journal", "r1")
    assert target.read_text() == "harness-owned\n"


def test_fifo_at_the_journal_path_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "journal")
    with pytest.raises(EnvironmentUnavailableError):
        Journal(tmp_path / "journal", "r1")


def test_hard_link_at_the_journal_path_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("")
    os.link(target, tmp_path / "journal")
    with pytest.raises(EnvironmentUnavailableError, match="one link"):
        Journal(tmp_path / "journal", "r1")


def test_directory_at_the_journal_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "journal").mkdir()
    with pytest.raises(EnvironmentUnavailableError):
        Journal(tmp_path / "journal", "r1")
