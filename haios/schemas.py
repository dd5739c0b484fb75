# SPDX-License-Identifier: Apache-2.0
"""Generate `schemas/*.schema.json` from the pydantic models.

`python -m haios.schemas` rewrites the checked-in files; a test fails when
they drift from the models. No I/O except in `main`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from haios.models.cost import CostRecord, CostReport
from haios.models.envelope import DsseEnvelope, Statement
from haios.models.plan import ExecPlan
from haios.models.policy import PolicyFile
from haios.models.result import CommandResult
from haios.models.state import RegistryMap, RunState
from haios.report.model import Report

MODELS: dict[str, type[BaseModel]] = {
    "exec_plan": ExecPlan,
    "state": RunState,
    "registry_map": RegistryMap,
    "cost_record": CostRecord,
    "cost_report": CostReport,
    "policy": PolicyFile,
    "dsse_envelope": DsseEnvelope,
    "signature_statement": Statement,
    "report": Report,
    "command_result": CommandResult,
}


def render_schemas() -> dict[str, str]:
    """File name -> JSON Schema text for every contract model."""
    rendered = {}
    for name, model in MODELS.items():
        schema = model.model_json_schema(by_alias=True, mode="validation")
        schema["$id"] = f"https://haios.dev/schemas/{name}.schema.json"
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        rendered[f"{name}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return rendered


def main() -> int:
    """Write the schemas into ./schemas (or the directory given)."""
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "schemas")
    target.mkdir(exist_ok=True)
    for name, text in render_schemas().items():
        (target / name).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
