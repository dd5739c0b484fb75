# SPDX-License-Identifier: Apache-2.0
"""`haios-client report`: offline re-verification of an os_root, and its report.

Modules, one concern each: `trust` (the policy the report trusts), `checks`
(the check list and hostile-safe reads), `verify` (signatures through
securesystemslib, rfc8785 and in-toto), `chain` (the audit hash chain),
`layout` (in-toto layout verification), `steps` and `collect` (gathering
the findings), `evidence` (what the audit log tells), `model` (the findings,
`schemas/report.schema.json`) and `render` (HTML, JSON, terminal).
"""

from haios.report.collect import build_report
from haios.report.model import REPORT_SCHEMA, Report
from haios.report.render import render_html, render_json, summary_table
from haios.report.trust import Trust, load_trust

__all__ = ["REPORT_SCHEMA", "Report", "Trust", "build_report", "load_trust", "render_html",
           "render_json", "summary_table"]
