# SPDX-License-Identifier: Apache-2.0
"""Per-step bounds of the forwarder: concurrent connections, total connections, bytes.

`ForwardLimits` holds the profile's ``[egress_limits]`` as plain values;
`StepBudget` enforces them for one step, shared by the forwarder's threads:

- at most `connections_max` connections are forwarded at once (the accept
  loop pauses while the step is at the limit; the kernel queues the rest);
- at most `connections_total_max` over the step's life (then the
  listeners are closed);
- at most `bytes_max` bytes in both directions together: every chunk
  read from one side takes its share (`take`) before it is written to the
  other, so no byte past the limit is ever forwarded.

Thread-safe; in-memory only, no I/O.
"""

from __future__ import annotations

import dataclasses
import threading


@dataclasses.dataclass(frozen=True)
class ForwardLimits:
    """The bounds of one step's forwarding (see `haios.sandbox.profile.EgressLimits`).

    Attributes:
        connections_max: connections forwarded at once (>= 1).
        connections_total_max: connections over the step's life (>= 1).
        bytes_max: bytes in both directions together (>= 1).
        connect_timeout_seconds: time to reach a destination, all its
            addresses together (> 0).
    """

    connections_max: int
    connections_total_max: int
    bytes_max: int
    connect_timeout_seconds: float

    def __post_init__(self) -> None:
        """Refuse bounds that would not bound anything.

        Raises:
            ValueError: a limit below 1 or a timeout not above 0.
        """
        if min(self.connections_max, self.connections_total_max, self.bytes_max) < 1:
            raise ValueError("egress limits must be at least 1")
        if not self.connect_timeout_seconds > 0:
            raise ValueError("the connect timeout must be positive")


class StepBudget:
    """The running counts of one step against its `ForwardLimits`. Thread-safe."""

    def __init__(self, limits: ForwardLimits) -> None:
        """Start at zero."""
        self.limits = limits
        self._lock = threading.Lock()
        self._active = 0
        self._total = 0
        self._bytes_used = 0

    def admit(self) -> bool:
        """Count one more connection, if the total allows it.

        Returns:
            False when `connections_total_max` connections were admitted
            already (the connection must not be forwarded).
        """
        with self._lock:
            if self._total >= self.limits.connections_total_max:
                return False
            self._total += 1
            self._active += 1
            return True

    def release(self) -> None:
        """One admitted connection ended."""
        with self._lock:
            self._active -= 1

    @property
    def at_capacity(self) -> bool:
        """True while `connections_max` connections are being forwarded."""
        with self._lock:
            return self._active >= self.limits.connections_max

    @property
    def total_reached(self) -> bool:
        """True once `connections_total_max` connections were admitted."""
        with self._lock:
            return self._total >= self.limits.connections_total_max

    @property
    def connections(self) -> int:
        """Connections admitted so far."""
        with self._lock:
            return self._total

    def take(self, wanted: int) -> int:
        """Take up to `wanted` bytes of the byte limit for one chunk.

        Returns:
            How many of them may be forwarded; fewer than `wanted` (maybe
            0) once the limit is reached.
        """
        with self._lock:
            granted = max(0, min(wanted, self.limits.bytes_max - self._bytes_used))
            self._bytes_used += granted
            return granted

    @property
    def bytes_exhausted(self) -> bool:
        """True once every byte of the limit was used."""
        with self._lock:
            return self._bytes_used >= self.limits.bytes_max
