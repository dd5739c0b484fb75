# SPDX-License-Identifier: Apache-2.0
"""The checked-in JSON Schemas are exactly what the models generate."""

from __future__ import annotations

from pathlib import Path

from haios.schemas import render_schemas

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def test_schemas_do_not_drift_from_models() -> None:
    rendered = render_schemas()
    on_disk = {p.name: p.read_text() for p in SCHEMAS.glob("*.schema.json")}
    assert set(on_disk) == set(rendered), "run `python -m haios.schemas` and commit"
    for name, text in rendered.items():
        assert on_disk[name] == text, f"{name} drifted: run `python -m haios.schemas`"
