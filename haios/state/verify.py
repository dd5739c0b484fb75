# SPDX-License-Identifier: Apache-2.0
"""`haios state`: verify state.json, registry_map.json, cost records, audit chain.

Every check raises TamperedError (exit 3) when a file was changed, removed
or reordered; nothing is repaired. Does I/O on os_root (read only).
"""

from __future__ import annotations

import hashlib
from typing import Any

from haios._util.strict_json import parse_strict_json
from haios.audit import AuditHead, verify_audit_against_head
from haios.errors import HaiosError, InputError, TamperedError
from haios.load.keys import TrustedRole
from haios.load.policy import Policy
from haios.models.state import RegistryMap, RunState
from haios.osroot import AUDIT_FILE, REGISTRY_FILE, STATE_FILE, OsRoot
from haios.state.store import STATE_MAX_BYTES, read_signed
from haios.verify.dsse import verify_detached

AUDIT_MAX_BYTES = 64 << 20


def verify_state_files(osr: OsRoot, policy: Policy) -> dict[str, Any]:
    """Verify everything `haios state` reports on; return state.json's object.

    Raises:
        InputError: there is no state.json.
        TamperedError: any engine file fails verification.
    """
    state = read_signed(osr.root, STATE_FILE, RunState, policy.engine_key)
    if state is None:
        raise InputError(f"{osr.path}: no state.json (no run has happened here)")
    registry = read_signed(osr.root, REGISTRY_FILE, RegistryMap, policy.engine_key)
    if registry is not None and registry.plan_id != state.plan_id:
        raise TamperedError("registry_map.json belongs to another plan")
    _verify_audit(osr, state)
    _verify_cost_records(osr, state, policy)
    raw = osr.root.read_bytes(STATE_FILE, max_bytes=STATE_MAX_BYTES)
    document = parse_strict_json(raw)
    if not isinstance(document, dict):
        raise TamperedError("state.json changed while being read")
    return document


def _verify_audit(osr: OsRoot, state: RunState) -> None:
    if state.audit is None:
        return
    try:
        data = osr.root.read_bytes(AUDIT_FILE, max_bytes=AUDIT_MAX_BYTES)
    except HaiosError as exc:
        raise TamperedError(f"{AUDIT_FILE}: {exc}") from exc
    head = AuditHead(state.audit.sha256, state.audit.records)
    verify_audit_against_head(data, head.sha256, head.count)


def _verify_cost_records(osr: OsRoot, state: RunState, policy: Policy) -> None:
    engine = TrustedRole("engine", (policy.engine_key,), 1)
    limits = policy.file.limits
    cost = osr.optional_sub("cost")
    for step_id, step in state.steps.items():
        if step.attempts == 0 or step.status in ("pending", "running", "skipped"):
            continue
        name = f"{step_id}.json"
        if cost is None or cost.lstat(name) is None:
            if step.status == "killed":
                continue  # a tree killed before it produced a record
            raise TamperedError(f"cost/{name}: missing")
        try:
            data = cost.read_bytes(name, max_bytes=64 << 10)
            sig = cost.read_bytes(f"{name}.sig", max_bytes=limits.sig_max_bytes)
            verify_detached(sig, engine, name=name, sha256=hashlib.sha256(data).hexdigest(),
                            max_depth=limits.json_max_depth)
        except HaiosError as exc:
            raise TamperedError(f"cost/{name}: {exc}") from exc
