# SPDX-License-Identifier: Apache-2.0
"""The kill-switch watchdog: an independent process that kills step trees.

Public modules (import them directly):

- `haios.watchdog.client`: the engine's side (`Watchdog`, `KillReport`,
  `Engagement`) and the pre-start flag checks re-exported from `flags`.
- `haios.watchdog.flags`: `global_flag_present`, `step_flag_present`.
- `haios.watchdog.cgroups`: create, kill and remove step cgroups.
- `haios.watchdog.protocol`: the JSON-lines protocol between the two.

This package file imports nothing on purpose: the watchdog process imports it
on its way to `__main__`, and must not pay for the client's imports
(subprocess, threading) at start-up. No I/O.
"""
