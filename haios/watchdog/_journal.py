# SPDX-License-Identifier: Apache-2.0
"""The watchdog's durable journal: one JSON object per line, fsync'd.

The watchdog records here everything it did (started, each kill, the engine
lost, stopped) so that what happened survives the engine's death: a later
`haios run` (or an operator) reads it. The file is opened once at start with
O_APPEND | O_NOFOLLOW | O_CREAT | O_NONBLOCK, mode 0600, and must be a
regular file with one link: a symlink, FIFO, device or hard link planted at
the path is refused (contract section 12). Each record is written with one
write(2) and fsync'd before the watchdog goes on.

Record fields: `schema` ("haios/watchdog_journal/v1"), `time` (UTC, RFC 3339),
`run_id`, `event` ("started", "killed", "engine_lost", "stopped"), and the
event's own fields (see docs/watchdog.md).

What it does not do: it never reads the journal back (parsing belongs to the
engine's load layer) and never truncates it. I/O: open, write, fsync.
"""

from __future__ import annotations

import datetime
import json
import os
import stat
from pathlib import Path
from typing import Any, Final

from haios.errors import EnvironmentUnavailableError

SCHEMA: Final = "haios/watchdog_journal/v1"
_FLAGS: Final = (
    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
) | os.O_NOCTTY


def _sync_directory(directory: Path) -> None:
    """Flush a directory (fsync) so a new entry in it is durable."""
    # A newly created journal's directory entry is durable only once the
    # directory itself is fsync'd.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise EnvironmentUnavailableError(
            f"cannot open the journal directory {directory}: {e.strerror}"
        ) from e
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """An open journal. Not thread-safe (the watchdog is single-threaded)."""

    def __init__(self, path: Path, run_id: str) -> None:
        """Open (creating if needed) the journal for appending.

        Raises:
            EnvironmentUnavailableError: the path cannot be opened, or it is
                not a regular file with exactly one link.

        Side Effects:
            Opens (maybe creates) the file, mode 0600.
        """
        self._run_id = run_id
        try:
            # O_NONBLOCK: opening a planted FIFO fails (ENXIO) or returns at
            # once instead of blocking; the type check below then refuses it.
            fd = os.open(path, _FLAGS, 0o600)
        except OSError as e:
            raise EnvironmentUnavailableError(
                f"cannot open watchdog journal {path}: {e.strerror}"
            ) from e
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            os.close(fd)
            raise EnvironmentUnavailableError(
                f"watchdog journal {path} is not a regular file with one link"
            )
        try:
            _sync_directory(path.parent)
        except EnvironmentUnavailableError:
            os.close(fd)
            raise
        self._fd = fd

    def append(self, event: str, **fields: Any) -> None:
        """Append one record and make it durable.

        Raises:
            OSError: the write or fsync failed (disk full, I/O error).

        Side Effects:
            One write(2) and one fsync(2).
        """
        record = {
            "schema": SCHEMA,
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds"),
            "run_id": self._run_id,
            "event": event,
            **fields,
        }
        line = json.dumps(record, allow_nan=False, sort_keys=True, separators=(",", ":"))
        data = line.encode("utf-8") + b"\n"
        # One write: with O_APPEND a record is never interleaved, and a crash
        # leaves at worst one torn final line, which a reader can detect.
        written = os.write(self._fd, data)
        if written != len(data):
            raise OSError(f"short write to the watchdog journal ({written} of {len(data)})")
        os.fsync(self._fd)

    def close(self) -> None:
        """Close the journal; idempotent.

        Side Effects:
            Closes a file descriptor.
        """
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
