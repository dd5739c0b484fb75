# SPDX-License-Identifier: Apache-2.0
"""haios._util.warm_import: modules imported ahead on a daemon thread."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from haios._util.warm_import import WARM_SWITCH_INTERVAL_SECONDS, warm

PROBE = "import sys\nINTERVAL = sys.getswitchinterval()\n"


@pytest.fixture
def probes(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two importable modules that record the switch interval they were imported under."""
    names = (f"haios_warm_probe_a_{tmp_path.name}", f"haios_warm_probe_b_{tmp_path.name}")
    for name in names:
        (tmp_path / f"{name}.py").write_text(PROBE)
    sys.path.insert(0, str(tmp_path))
    try:
        yield names
    finally:
        sys.path.remove(str(tmp_path))
        for name in names:
            sys.modules.pop(name, None)


def test_imports_on_a_daemon_thread_under_a_short_switch_interval(
        probes: tuple[str, str]) -> None:
    before = sys.getswitchinterval()
    thread = warm(probes)
    assert thread is not None and thread.daemon
    thread.join(30)
    for name in probes:
        assert sys.modules[name].INTERVAL == WARM_SWITCH_INTERVAL_SECONDS
    assert sys.getswitchinterval() == before  # restored


def test_once_per_process(probes: tuple[str, str]) -> None:
    first = warm(probes)
    assert first is not None
    first.join(30)
    assert warm(probes) is None
    assert warm(("sys", "os")) is None  # imported already: nothing to start


def test_a_failing_import_does_not_stop_the_others(probes: tuple[str, str]) -> None:
    thread = warm(("haios_no_such_module_anywhere", probes[0]))
    assert thread is not None
    thread.join(30)
    assert probes[0] in sys.modules
    assert "haios_no_such_module_anywhere" not in sys.modules
