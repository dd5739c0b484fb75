# SPDX-License-Identifier: Apache-2.0
"""Fixed paths inside every step's view (contract section 9). Pure constants."""

from __future__ import annotations

from typing import Final

#: the workspace (read-write, HOME and cwd)
VIEW_WORKSPACE: Final = "/haios/work"
#: the cost report directory (read-write)
VIEW_COST_DIR: Final = "/haios/cost"
VIEW_COST_REPORT: Final = "/haios/cost/report.json"
#: the Vault token directory (read-only)
VIEW_SECRET_DIR: Final = "/haios/secret"
VIEW_TOKEN_FILE: Final = "/haios/secret/token"
