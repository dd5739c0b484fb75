# SPDX-License-Identifier: Apache-2.0
"""registry_map.json: every artefact known to the run, engine-signed. Does I/O."""

from __future__ import annotations

from collections.abc import Mapping

from haios.intake import StoredArtefact
from haios.models.plan import ExecPlan
from haios.models.state import REGISTRY_SCHEMA, RegistryMap
from haios.osroot import REGISTRY_FILE, OsRoot
from haios.signing import EngineSigner
from haios.state.store import write_signed


def build_registry(plan: ExecPlan, known: Mapping[str, StoredArtefact]) -> RegistryMap:
    """The registry model for the inputs and products known so far."""
    return RegistryMap.model_validate({
        "schema": REGISTRY_SCHEMA,
        "plan_id": plan.plan_id,
        "artefacts": {
            name: {"sha256": item.sha256, "size": item.size, "origin": item.origin,
                   "signers": list(item.signers)}
            for name, item in sorted(known.items())
        },
    })


def write_registry(osr: OsRoot, plan: ExecPlan, known: Mapping[str, StoredArtefact],
                   signer: EngineSigner) -> None:
    """Publish registry_map.json atomically with an embedded engine signature."""
    write_signed(osr.root, REGISTRY_FILE, build_registry(plan, known), signer)
