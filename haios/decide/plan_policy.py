# SPDX-License-Identifier: Apache-2.0
"""Policy checks on a verified plan: the plan may name, never widen. Pure.

Raises PolicyDeniedError (exit 3) for a profile or Vault scope the policy
does not define, a Vault scope under a profile whose egress does not
include ``vault`` (contract section 12, read in docs/adr/0004-egress.md:
"a profile whose network reaches VAULT_ADDR" is one whose egress allowlist
names it), a denied environment name, or a timeout above the policy's
ceiling.

The policy is taken as `PolicyView`, the few fields a decision reads, so
this package never imports the loader (`haios.load.policy` loads profiles
through `haios.sandbox`); `haios.load.policy.Policy` satisfies it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from haios.egress.endpoints import VAULT
from haios.errors import PolicyDeniedError
from haios.models.plan import ExecPlan
from haios.models.policy import PolicyFile, env_name_denied


class ProfileView(Protocol):
    """What a decision reads of a sandbox profile."""

    @property
    def egress(self) -> tuple[str, ...]:
        """The profile's egress allowlist (endpoint names)."""
        ...


class PolicyView(Protocol):
    """What a decision reads of a loaded policy."""

    @property
    def file(self) -> PolicyFile:
        """The validated `policy.toml`."""
        ...

    @property
    def profiles(self) -> Mapping[str, ProfileView]:
        """The policy's profiles by name."""
        ...


def decide_plan(plan: ExecPlan, policy: PolicyView) -> None:
    """Raise PolicyDeniedError for the first thing the policy does not allow."""
    denied_env = frozenset(policy.file.env.deny)
    limits = policy.file.limits
    for step in plan.steps:
        where = f"step {step.id!r}"
        profile = policy.profiles.get(step.profile)
        if profile is None:
            raise PolicyDeniedError(f"{where}: profile {step.profile!r} is not in the policy")
        if step.vault_scope is not None:
            if step.vault_scope not in policy.file.vault_scopes:
                raise PolicyDeniedError(f"{where}: Vault scope {step.vault_scope!r} is not in "
                                        "the policy")
            if VAULT not in profile.egress:
                raise PolicyDeniedError(f"{where}: a Vault scope needs a profile whose network "
                                        f"egress includes 'vault'; {step.profile!r} does not")
        for name in step.env:
            if env_name_denied(name, denied_env):
                raise PolicyDeniedError(f"{where}: environment variable {name} is denied")
        if step.timeout_seconds > limits.timeout_max_seconds:
            raise PolicyDeniedError(f"{where}: timeout_seconds exceeds the policy's "
                                    f"{limits.timeout_max_seconds}")
