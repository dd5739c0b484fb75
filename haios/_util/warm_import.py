# SPDX-License-Identifier: Apache-2.0
"""Importing modules ahead, on a daemon thread, while the process waits.

in-toto's modules take about 17 ms to import, and the engine first needs
them for the first step's link, right after that step. The step's launch
is the longest wait of the first step (its worker thread sleeps in poll
while the sandbox is built), so `warm` imports them meanwhile.

While it imports, the interpreter's switch interval is 0.5 ms instead of
the default 5 ms: a thread that wakes up (the step's pipes became
readable) gets the interpreter back from the importing thread that soon.
The previous interval is restored when it ends. An import that fails here
is ignored: the real import, where the module is used, raises it there.
No I/O beyond the imports.
"""

from __future__ import annotations

import importlib
import sys
import threading
from typing import Final

#: the switch interval while a warm-up thread imports
WARM_SWITCH_INTERVAL_SECONDS: Final = 0.0005

_lock = threading.Lock()
_started: set[tuple[str, ...]] = set()


def warm(modules: tuple[str, ...]) -> threading.Thread | None:
    """Import `modules`, in order, on a daemon thread; at most once per process.

    Returns:
        The started thread, or None when these modules are imported already
        or a warm-up of them was started before.
    """
    with _lock:
        if modules in _started or all(name in sys.modules for name in modules):
            return None
        _started.add(modules)
    thread = threading.Thread(target=_import_all, args=(modules,), name="haios-warm-import",
                              daemon=True)
    thread.start()
    return thread


def _import_all(modules: tuple[str, ...]) -> None:
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, WARM_SWITCH_INTERVAL_SECONDS))
    try:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: S112  # raised again by the import where it is used
                continue
    finally:
        sys.setswitchinterval(previous)
