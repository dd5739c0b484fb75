# SPDX-License-Identifier: Apache-2.0
"""Environment checks before anything runs, and the egress answers a run pins.

`preflight` refuses (exit 6) when the sandbox, the uid range, cgroup limits,
a needed Vault, or an egress endpoint is unusable. `resolve_egress`
resolves every endpoint of the plan's profiles from the host; the run
guard calls it again at run start and pins that answer for the run.
Does I/O (namespace probes, Vault, the host's resolver).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from haios.egress.resolve import EgressResolution, raise_refusals, resolve_egress_result
from haios.guard.vault_grants import scope_grant
from haios.load.policy import Policy
from haios.models.plan import ExecPlan


def preflight(policy: Policy, plan: ExecPlan, environ: Mapping[str, str] | None = None) -> None:
    """Refuse (exit 6) when the sandbox or a needed Vault is unusable.

    Side Effects:
        Probes namespaces; contacts Vault when a step names a scope.
    """
    from haios.sandbox.cglimits import check_enforceable
    from haios.sandbox.preflight import check_sandbox_prerequisites
    from haios.sandbox.uidpool import check_pool_range

    env = environ if environ is not None else os.environ
    names = sorted({step.profile for step in plan.steps})
    check_sandbox_prerequisites([policy.profiles[name] for name in names])
    # Step uids come from a host-wide pool; its range must be reserved for it.
    check_pool_range(policy.file.sandbox.uid_base, policy.file.sandbox.uid_count)
    # Every profile bounds memory and processes per step tree; a host that
    # cannot enforce that refuses the run rather than running unbounded.
    check_enforceable(memory=True, pids=True)
    scopes = sorted({s.vault_scope for s in plan.steps if s.vault_scope})
    if scopes:
        from haios.secrets import provider_from_environment

        provider_from_environment(env).preflight([scope_grant(policy, s) for s in scopes])
    # Every endpoint must resolve to an allowed destination before anything
    # runs; the run guard resolves again and pins that answer for the run.
    for resolution in resolve_egress(policy, plan, env):
        raise_refusals(resolution)


def resolve_egress(policy: Policy, plan: ExecPlan,
                   environ: Mapping[str, str]) -> list[EgressResolution]:
    """Resolve the egress of every profile the plan uses (in name order).

    Side Effects:
        Queries the host's resolver for each name.
    """
    names = sorted({step.profile for step in plan.steps if policy.profiles[step.profile].egress})
    return [resolve_egress_result(name, policy.profiles[name].egress,
                                  vault_addr=environ.get("VAULT_ADDR")) for name in names]
