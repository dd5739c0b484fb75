# SPDX-License-Identifier: Apache-2.0
"""The os_root layout (contract section 3), opened without following links.

`OsRoot` holds descriptors for the client-written directories (read-only
use) and the engine-owned ones. Nothing private to the engine lives here:
the client owns this directory and can rename or replace any entry at any
time, so verified copies, scratch, leases and the lock live in the run
area under the operator's state_dir (area.py). Does I/O.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Final

from haios._util.safedir import SafeDir
from haios.errors import PathError

PLAN_FILE: Final = "exec_plan.json"
PLAN_SIG: Final = "exec_plan.json.sig"
STATE_FILE: Final = "state.json"
REGISTRY_FILE: Final = "registry_map.json"
AUDIT_FILE: Final = "audit.jsonl"
METRICS_FILE: Final = "metrics.prom"
ENGINE_DIRS: Final = ("artefacts", "cost", "logs")
_TEMP: Final = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")


class OsRoot:
    """An opened os_root. Close it with `close()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            info = os.lstat(path)
        except OSError as exc:
            raise PathError(f"{path}: os_root cannot be read ({exc.strerror})") from exc
        if stat.S_ISLNK(info.st_mode):
            raise PathError(f"{path}: os_root is a symlink")
        self.root = SafeDir.open(path, label="os_root")
        self._subs: dict[str, SafeDir] = {}

    def close(self) -> None:
        """Close every descriptor."""
        for sub in self._subs.values():
            sub.close()
        self._subs.clear()
        self.root.close()

    def sub(self, name: str, *, create: bool = False, mode: int = 0o755) -> SafeDir:
        """A (cached) subdirectory; created when asked."""
        if name not in self._subs:
            self._subs[name] = self.root.sub(name, create=create, mode=mode)
        return self._subs[name]

    def optional_sub(self, name: str) -> SafeDir | None:
        """A subdirectory if it exists (it must be a real directory)."""
        if self.root.lstat(name) is None:
            return None
        return self.sub(name)

    def sweep_temp_files(self) -> list[str]:
        """Remove temp files an interrupted atomic write left behind (ours only).

        Only regular files named like `SafeDir.write_atomic` temps are removed.
        """
        removed: list[str] = []
        # Only real directories are swept: anything planted in their place is
        # refused later, inside verification, with a `rejected` record.
        directories = [self.root]
        for name in (*ENGINE_DIRS, "links"):
            info = self.root.lstat(name)
            if info is not None and stat.S_ISDIR(info.st_mode):
                directories.append(self.sub(name))
        for directory in directories:
            for name in directory.names():
                info = directory.lstat(name)
                if _TEMP.fullmatch(name) and info is not None and stat.S_ISREG(info.st_mode):
                    directory.unlink(name)
                    removed.append(f"{directory.label}/{name}")
        return removed
