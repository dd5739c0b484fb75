# SPDX-License-Identifier: Apache-2.0
"""`haios state`: verify state.json, registry_map.json, cost records, audit chain.

Every check raises TamperedError (exit 3) when a file was changed, removed
or reordered; nothing is repaired. Does I/O on os_root (read only).
"""

from __future__ import annotations

import hashlib
from typing import Any

from haios._util.safedir import SafeDir
from haios.audit import AuditHead, verify_audit_against_head
from haios.errors import HaiosError, InputError, TamperedError
from haios.load.policy import Policy
from haios.models.state import RegistryMap, RunState
from haios.osroot import AUDIT_FILE, REGISTRY_FILE, STATE_FILE, OsRoot
from haios.state.store import read_signed, read_signed_document
from haios.verify.dsse import verify_detached

AUDIT_MAX_BYTES = 64 << 20
COST_RECORD_MAX_BYTES = 64 << 10


def verify_state_files(osr: OsRoot, policy: Policy) -> dict[str, Any]:
    """Verify everything `haios state` reports on; return state.json's object.

    Raises:
        InputError: there is no state.json.
        TamperedError: any engine file fails verification.
    """
    found = read_signed_document(osr.root, STATE_FILE, RunState, policy.engine_key)
    if found is None:
        raise InputError(f"{osr.path}: no state.json (no run has happened here)")
    state, document = found
    registry = read_signed(osr.root, REGISTRY_FILE, RegistryMap, policy.engine_key)
    if registry is not None and registry.plan_id != state.plan_id:
        raise TamperedError("registry_map.json belongs to another plan")
    _verify_audit(osr, state)
    _verify_cost_records(osr, state, policy)
    return document  # the object whose signature verified, not a second read


def _verify_audit(osr: OsRoot, state: RunState) -> None:
    if state.audit is None:
        return
    try:
        data = osr.root.read_bytes(AUDIT_FILE, max_bytes=AUDIT_MAX_BYTES)
    except HaiosError as exc:
        raise TamperedError(f"{AUDIT_FILE}: {exc}") from exc
    head = AuditHead(state.audit.sha256, state.audit.records)
    verify_audit_against_head(data, head.sha256, head.count)


def verify_cost_record(cost: SafeDir, step_id: str, policy: Policy) -> None:
    """`cost/<step_id>.json` must carry a valid engine `.sig` over its bytes.

    Raises:
        TamperedError: missing, unreadable, or not signed by the engine.
    """
    name = f"{step_id}.json"
    limits = policy.file.limits
    try:
        data = cost.read_bytes(name, max_bytes=COST_RECORD_MAX_BYTES)
        sig = cost.read_bytes(f"{name}.sig", max_bytes=limits.sig_max_bytes)
        verify_detached(sig, policy.engine_role, name=name,
                        sha256=hashlib.sha256(data).hexdigest(), max_depth=limits.json_max_depth)
    except HaiosError as exc:
        raise TamperedError(f"cost/{name}: {exc}") from exc


def _verify_cost_records(osr: OsRoot, state: RunState, policy: Policy) -> None:
    cost = osr.optional_sub("cost")
    for step_id, step in state.steps.items():
        if step.attempts == 0 or step.status in ("pending", "running", "skipped"):
            continue
        name = f"{step_id}.json"
        if cost is None or cost.lstat(name) is None:
            if step.status == "killed":
                continue  # a tree killed before it produced a record
            raise TamperedError(f"cost/{name}: missing")
        verify_cost_record(cost, step_id, policy)
