# SPDX-License-Identifier: Apache-2.0
"""The policy's limits are enforced: a plan past one is refused, nothing runs.

Threats T-I01..T-I10 (threat_model/README.md); catalog sections A and D.
Each policy here lowers one `[limits]` field so the refusal is reached with
a small plan; the uid range test shows `sandbox.uid_count` bounds steps
running at once, not the plan's length.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from haios import intake
from haios._util.safedir import SafeDir
from haios.errors import EXIT_REJECTED, InputError
from tests.adversarial.conftest import DATA, baseline_plan
from tests.adversarial.helpers import assert_refused
from tests.support.world import World, expires, plan, sh, step

#: a uid range of its own, so parallel runs on this host do not share the pool
UID_BASE = 3_900_000 + (os.getpid() % 1000) * 10


def _limits(world: World, **fields: int) -> None:
    lines = "".join(f"{name} = {value}\n" for name, value in fields.items())
    world.write_policy(world.policy, extra=f"\n[limits]\n{lines}")


def test_step_timeout_above_the_policy_ceiling(world: World) -> None:
    _limits(world, timeout_max_seconds=60)
    document = baseline_plan()
    document["steps"][0]["timeout_seconds"] = 61  # type: ignore[index]
    root = world.os_root(document, {"data.csv": DATA})
    assert_refused(world.run(root), EXIT_REJECTED, root,
                   reason="timeout_seconds exceeds the policy's 60", world=world)


def test_step_timeout_at_the_policy_ceiling_runs(world: World) -> None:
    _limits(world, timeout_max_seconds=60)
    document = baseline_plan()
    document["steps"][0]["timeout_seconds"] = 60  # type: ignore[index]
    root = world.os_root(document, {"data.csv": DATA})
    result = world.run(root)
    assert result.code == 0, result.stderr


def test_expiry_beyond_the_policy_window(world: World) -> None:
    _limits(world, expires_max_days=1)
    root = world.os_root(baseline_plan(expires=expires(hours=49)), {"data.csv": DATA})
    assert_refused(world.run(root), EXIT_REJECTED, root,
                   reason="expires more than 1 days ahead", world=world)


def test_more_link_files_than_the_policy_allows(world: World) -> None:
    _limits(world, links_max_files=2)
    root = world.os_root(baseline_plan(), {"data.csv": DATA})
    assert len(list((root / "links").glob("*.link"))) == 1
    for name in ("extra-1.link", "extra-2.link"):  # counted before any is read
        (root / "links" / name).write_bytes(b"{}")
    assert_refused(world.run(root), EXIT_REJECTED, root,
                   reason="more than 2 link files", world=world)


def test_plan_longer_than_the_uid_range_runs_when_steps_are_sequential(world: World) -> None:
    """Uids are leased per running step: a 3-step chain needs one uid at a time."""
    world.write_policy(world.policy,
                       extra=f"\n[sandbox]\nuid_base = {UID_BASE}\nuid_count = 2\n")
    document = plan("chain", [
        step("a", sh("id -u > a.txt"), products=["a.txt"]),
        step("b", sh("id -u > b.txt"), needs=["a"], materials=["a.txt"], products=["b.txt"]),
        step("c", sh("id -u > c.txt"), needs=["b"], materials=["b.txt"], products=["c.txt"]),
    ])
    root = world.os_root(document)
    result = world.run(root)
    assert result.code == 0, result.stderr
    for name in ("a.txt", "b.txt", "c.txt"):
        uid = int((root / "artefacts" / name).read_text())
        assert UID_BASE <= uid < UID_BASE + 2, (name, uid)


class _Growing:
    """Wraps `copy_chunk`: after the first chunk, another writer appends to the source."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.real = intake.copy_chunk
        self.appended = False

    def __call__(self, src: int, dst: int, count: int, *, offset_src: int | None = None) -> int:
        n = self.real(src, dst, count, offset_src=offset_src)
        if not self.appended:
            self.appended = True
            writer = threading.Thread(target=self._append)
            writer.start()
            writer.join()
        return n

    def _append(self) -> None:
        with open(self.source, "ab") as handle:
            handle.write(b"3,4\n")


def test_input_growing_while_copied_is_refused(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "inbox").mkdir()
    (tmp_path / "store").mkdir()
    (tmp_path / "inbox" / "data.csv").write_bytes(DATA)
    growing = _Growing(tmp_path / "inbox" / "data.csv")
    monkeypatch.setattr(intake, "copy_chunk", growing)
    with (SafeDir.open(tmp_path / "inbox") as inbox, SafeDir.open(tmp_path / "store") as store,
          pytest.raises(InputError, match="grew while being copied") as caught):
        intake.copy_into(inbox, "data.csv", store, max_bytes=1 << 20)
    assert growing.appended
    assert caught.value.exit_code == EXIT_REJECTED


def test_input_copied_whole_when_it_does_not_change(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    (tmp_path / "store").mkdir()
    (tmp_path / "inbox" / "data.csv").write_bytes(DATA)
    with SafeDir.open(tmp_path / "inbox") as inbox, SafeDir.open(tmp_path / "store") as store:
        digest, size = intake.copy_into(inbox, "data.csv", store, max_bytes=1 << 20)
    assert size == len(DATA)
    assert (tmp_path / "store" / "data.csv").read_bytes() == DATA
    assert len(digest) == 64
