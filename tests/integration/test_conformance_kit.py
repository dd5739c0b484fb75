# SPDX-License-Identifier: Apache-2.0
"""Run the black-box conformance kit (../shared/conformance) against this build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
KIT = PROJECT.parent / "shared" / "conformance"


@pytest.mark.skipif(not KIT.is_dir(), reason="../shared/conformance is not beside the checkout")
def test_conformance_kit_passes() -> None:
    haios = shutil.which("haios")
    assert haios is not None, "the haios console script is not installed"
    env = {**os.environ, "HAIOS_BIN": haios, "HAIOS_PROJECT": str(PROJECT)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(KIT)],
        env=env,
        cwd=KIT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
