# SPDX-License-Identifier: Apache-2.0
"""The step sandbox: namespaces, unprivileged identity, rlimits and seccomp.

Public entry points (import them from their modules; this package imports
nothing heavy so that the launcher process stays small):

- `haios.sandbox.runner.NamespaceRunner`: the `StepRunner` the engine uses.
- `haios.sandbox.launcher.Launcher`: optional pre-started forking process.
- `haios.sandbox.profile.load_profile` / `lint_profile`: policy profiles.
- `haios.sandbox.preflight.check_sandbox_prerequisites`: refuse to run
  when the host cannot build the sandbox.
- `haios.sandbox.evidence.confinement_record`: what was applied, for links.
- `haios.sandbox.netns`: the step's network namespace (loopback, the
  listeners of its allowed endpoints); the engine side of egress is
  `haios.egress`.

No I/O at import.
"""
