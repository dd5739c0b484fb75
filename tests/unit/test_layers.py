# SPDX-License-Identifier: Apache-2.0
"""The layering contract in pyproject.toml ([tool.importlinter]) holds.

models, verify and decide never import sandbox, secrets, state, watchdog or
cli (STYLE.md section 1), not even for type checking.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.support.world import PROJECT


def test_import_contracts_are_kept() -> None:
    lint_imports = shutil.which("lint-imports")
    if lint_imports is None:
        pytest.fail("lint-imports is missing: install the `test` extras (import-linter)")
    done = subprocess.run([lint_imports, "--no-cache"], cwd=PROJECT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout, done.stdout[-4000:]
