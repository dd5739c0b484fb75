# SPDX-License-Identifier: Apache-2.0
"""What the tests share: real worlds, keys, servers and fakes, one module each.

- `world`: keys, a policy folder, signed plans and os_roots; runs the CLI;
- `keys`: real signing keys (planner, functionary, engine);
- `openbao`: a real OpenBao dev server on 127.0.0.1, stopped by PID;
- `sandbox`: step specs and runners for sandbox tests;
- `egress`: probes and listeners for egress tests;
- `engine_fakes`: a scripted step runner, guard and clock for in-process
  engine tests;
- `events`: typed events for tests of their consumers.
"""
