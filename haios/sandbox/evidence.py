# SPDX-License-Identifier: Apache-2.0
"""Evidence of confinement: what the sandbox applies to a step, as JSON values.

`confinement_record` derives its answer from the same `LaunchPlan` the child
executes (`_plan.build_plan`), not from a second description of the policy,
so the record cannot drift from what actually ran. The engine puts it in the
in-toto link's ``environment`` field, letting a verifier prove *how* a
product was made (profile digest, namespaces, identity, limits, filter
hashes, the egress allowlist applied), not only from what.

No I/O beyond the profile's first compilation (cached; lstat of its paths).
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

from haios.sandbox import _libc, _plan, mounts, rlimits
from haios.sandbox.spec import VIEW_COST_DIR, VIEW_SECRET_DIR, VIEW_WORKSPACE, StepSpec

RECORD_TYPE: Final = "https://haios.dev/confinement/v1"

_NAMESPACE_NAMES: Final = (
    (_libc.CLONE_NEWNS, "mount"),
    (_libc.CLONE_NEWIPC, "ipc"),
    (_libc.CLONE_NEWUTS, "uts"),
    (_libc.CLONE_NEWCGROUP, "cgroup"),
    (_libc.CLONE_NEWNET, "network"),
)


def _namespaces(flags: int) -> list[str]:
    # The PID namespace is created by the parent for every step.
    return ["pid", *(name for bit, name in _NAMESPACE_NAMES if flags & bit)]


def _egress(spec: StepSpec) -> dict[str, Any] | None:
    """The egress allowlist applied: endpoints, where they lead, the bounds."""
    if spec.egress is None:
        return None
    limits = spec.profile.egress_limits
    return {
        "endpoints": [
            {"endpoint": route.endpoint, "dial": route.host or route.listen,
             "listen": route.listen, "port": route.port,
             "destinations": list(route.destinations)}
            for route in spec.egress.routes
        ],
        "transport": "tcp, forwarded by the engine; nothing else leaves the namespace",
        "limits": {
            "connections_max": limits.connections_max,
            "connections_total_max": limits.connections_total_max,
            "bytes_max": limits.bytes_max,
            "connect_timeout_seconds": limits.connect_timeout_seconds,
        },
    }


def confinement_record(spec: StepSpec) -> dict[str, Any]:
    """Describe the confinement `NamespaceRunner` applies to `spec`.

    Args:
        spec: the step, as it will be (or was) run.

    Returns:
        A JSON-compatible dict: record type, profile name and digest,
        namespaces, network mode (``none``, ``egress`` or ``host``), the
        egress allowlist and its limits, uid/gid/groups, capability sets,
        no_new_privs, rlimits, seccomp (default action, architecture, rule
        counts, SHA-256 of both BPF programs), filesystem view, cgroup use,
        timeout and output cap.

    Raises:
        SandboxSetupError: the spec cannot be run (uid 0, bad argv...).
        PolicyLoadError: the profile does not compile.

    Side Effects:
        Compiles the profile on first use (cached).
    """
    plan = _plan.build_plan(spec)
    compiled = _plan.compiled_profile(spec.profile)
    policy = spec.profile.seccomp
    floor_hash, profile_hash = (hashlib.sha256(program).hexdigest() for program in plan.seccomp)
    return {
        "type": RECORD_TYPE,
        "runner": "haios.sandbox.runner.NamespaceRunner",
        "profile": {"name": spec.profile.name, "digest": {"sha256": spec.profile.digest}},
        "namespaces": _namespaces(plan.namespaces),
        "network": plan.network.mode,
        "egress": _egress(spec),
        "identity": {"uid": plan.uid, "gid": plan.gid, "supplementary_groups": []},
        "capabilities": {
            "effective": [],
            "permitted": [],
            "inheritable": [],
            "bounding": [],
            "ambient": [],
        },
        "no_new_privs": True,
        "rlimits": rlimits.describe_rlimits(spec.profile.rlimits, spec.cpu_seconds_limit),
        "seccomp": {
            "architectures": ["x86_64"],
            "bad_architecture_action": "kill_process",
            "default_action": policy.default_action
            if policy.default_errno is None
            else f"{policy.default_action}:{policy.default_errno}",
            "filters": [
                {"name": "floor", "rules": compiled.floor.rules, "sha256": floor_hash},
                {"name": "profile", "rules": compiled.program.rules, "sha256": profile_hash},
            ],
        },
        "filesystem": {
            "root": "tmpfs, read-only",
            "read_only": [{"path": entry.path, "kind": entry.kind} for entry in plan.view.entries],
            "workspace": {"path": VIEW_WORKSPACE, "access": "read-write",
                          "filesystem": "private tmpfs, discarded after the step",
                          "size_bytes": spec.profile.filesystem.workspace_size_bytes,
                          "inodes": spec.profile.filesystem.workspace_inodes},
            "cost_dir": {"path": VIEW_COST_DIR, "access": "read-write"},
            "secret_dir": {"path": VIEW_SECRET_DIR, "access": "read-only"}
            if plan.view.has_secret
            else None,
            "tmp": {"path": "/tmp", "size_bytes": plan.view.tmp_size_bytes,
                    "inodes": plan.view.tmp_inodes},
            "proc": {"path": "/proc", "options": mounts.PROC_OPTIONS},
            "dev": sorted(name for name, _major, _minor in mounts.DEVICES),
            "hosts": [f"{address} {name}" for address, name in plan.view.hosts],
        },
        "session": "new, no controlling terminal",
        "cgroup": spec.cgroup is not None,
        "timeout_seconds": spec.timeout_seconds,
        "output_limit_bytes": spec.output_limit_bytes,
    }
