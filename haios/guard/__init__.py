# SPDX-License-Identifier: Apache-2.0
"""What surrounds a step: kill watch, Vault grants, egress routes, preflight.

- `api`: the `StepGuard` protocol the executor calls, `StepGrant`,
  `GuardRequest`, `NoGuard`;
- `kill_watch`: the step's kill cgroup registered with the watchdog, and
  which flag killed what;
- `vault_grants`: the run's Vault session, each step's scoped token,
  revocation and its retries;
- `run_guard`: the production guard composing both with the egress routes;
- `preflight`: environment checks before anything runs (exit 6).
"""
