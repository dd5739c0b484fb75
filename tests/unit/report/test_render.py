# SPDX-License-Identifier: Apache-2.0
"""The HTML report escapes os_root text and loads nothing; JSON matches the schema."""

from __future__ import annotations

import base64
import hashlib
import json
from collections import Counter
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

from haios.report.model import REPORT_SCHEMA, Report
from haios.report.render import render_html, render_json, status_class

HOSTILE = '<script>alert(1)</script>"\'><img src=x onerror=alert(2)>{{7*7}}'
SCHEMA = Path(__file__).resolve().parents[3] / "schemas" / "report.schema.json"


def hostile_report() -> Report:
    step = {"id": "s1", "status": "failed", "attempts": 1, "started": "2026-01-01T00:00:00Z",
            "finished": "2026-01-01T00:00:01Z", "exit_code": 1, "reason": HOSTILE,
            "needs": [], "profile": "default", "uid": 600001, "level": 0,
            "history": [{"attempt": 1, "started": "2026-01-01T00:00:00.000000Z",
                         "finished": "2026-01-01T00:00:01.000000Z", "status": "failed",
                         "exit_code": 1, "uid": 600001, "reason": HOSTILE}],
            "cost": None, "output": {"stdout": HOSTILE, "stderr": HOSTILE,
                                     "stdout_bytes": 1, "stderr_bytes": 1}}
    return Report.model_validate({
        "schema": REPORT_SCHEMA, "generated": "2026-01-01T00:00:02.000000Z",
        "os_root": HOSTILE, "verdict": "failed",
        "summary": {"checks": 1, "ok": 0, "fail": 1, "warn": 0, "skipped": 0},
        "policy": {"directory": HOSTILE, "engine_keyid": "e" * 64,
                   "planner": {"keyids": ["p" * 64], "threshold": 1},
                   "functionary": {"keyids": ["f" * 64], "threshold": 1},
                   "profiles": {"default": "0" * 64}},
        "plan": None,
        "state": {"status": "failed", "reason": HOSTILE, "updated": "2026-01-01T00:00:01Z",
                  "seq": 3, "signed_audit_records": 1},
        "checks": [{"id": HOSTILE, "category": "plan", "subject": HOSTILE, "result": "fail",
                    "detail": HOSTILE}],
        "steps": [step], "budget": [], "products": [],
        "vault_tokens": [{"accessor": HOSTILE, "step_id": "s1", "issued": None,
                          "ttl_seconds": None, "revoked": None, "revoke_failed": HOSTILE,
                          "outstanding": True}],
        "kills": [{"seq": 0, "time": "2026-01-01T00:00:00.500000Z", "kind": "kill",
                   "scope": HOSTILE, "flag": HOSTILE, "step_id": "s1",
                   "latency_seconds": 0.01, "complete": True}],
        "audit": {"records": 1, "signed_records": 1, "head_sha256": "0" * 64,
                  "torn_tail_bytes": 0,
                  "entries": [{"seq": 0, "time": "t", "kind": HOSTILE,
                               "fields": {HOSTILE: HOSTILE}, "signed": True}]},
    })


class Tags(HTMLParser):
    """Every start tag and attribute name of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.names: Counter[str] = Counter()
        self.attributes: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.names[tag] += 1
        self.attributes += [name for name, _ in attrs]


def test_untrusted_text_is_escaped_everywhere() -> None:
    page = render_html(hostile_report())
    assert "<script>alert" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "{{7*7}}" in page  # data is never evaluated as a template
    assert page.count("<script>") == 1  # the page's own, at the end


def test_page_loads_nothing_and_hashes_its_own_inline_code() -> None:
    page = render_html(hostile_report())
    tags = Tags()
    tags.feed(page)
    assert tags.names["script"] == 1 and tags.names["style"] == 1
    assert not {"img", "link", "iframe", "object", "embed", "base", "form"} & set(tags.names)
    assert not [a for a in tags.attributes if a in ("src", "href", "action", "style", "srcset")
                or a.startswith("on")]
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    for name, directive in (("report.css", "style-src"), ("report.js", "script-src")):
        text = resources.files("haios.report").joinpath("templates", name).read_text("utf-8")
        digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
        assert f"{directive} &#39;sha256-{digest}&#39;" in page
        assert text in page
    assert "default-src &#39;none&#39;" in page and "unsafe-inline" not in page


def test_status_classes_come_from_an_allowlist() -> None:
    assert status_class("succeeded") == "st-succeeded"
    assert status_class('x" onclick="y') == "st-other"
    assert status_class(None) == "st-other"


def test_json_round_trips_through_the_model_and_schema_shape() -> None:
    report = hostile_report()
    document = json.loads(render_json(report))
    assert Report.model_validate(document) == report
    schema = json.loads(SCHEMA.read_text())
    assert set(schema["required"]) <= set(document)
    assert schema["properties"]["verdict"]["enum"] == ["verified", "failed"]
