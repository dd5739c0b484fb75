# SPDX-License-Identifier: Apache-2.0
"""The step's command line and environment, checked before anything forks.

The step receives exactly the environment the engine computed (contract
section 9) and is started with execve(2), never through a PATH search.
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

from haios.errors import SandboxSetupError


def checked_argv(argv: tuple[str, ...]) -> tuple[str, ...]:
    """The argv to execve, after checks.

    Raises:
        SandboxSetupError: empty argv, a relative program path, or a NUL byte.
    """
    if not argv:
        raise SandboxSetupError("the step has an empty command line")
    if not argv[0].startswith("/"):
        raise SandboxSetupError(f"the step's program {argv[0]!r} is not an absolute path")
    if any("\0" in arg for arg in argv):
        raise SandboxSetupError("the step's command line contains a NUL byte")
    return argv


def checked_env(env: Mapping[str, str]) -> tuple[str, ...]:
    """The environment as ``NAME=value`` strings, in a stable order.

    Raises:
        SandboxSetupError: an empty name, a name with ``=``, or a NUL byte.
    """
    entries: list[str] = []
    for name in sorted(env):
        value = env[name]
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise SandboxSetupError(f"environment variable {name!r} cannot be passed to execve")
        entries.append(f"{name}={value}")
    return tuple(entries)
