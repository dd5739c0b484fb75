# SPDX-License-Identifier: Apache-2.0
"""`haios-client example DIR` with a relative DIR (issue 13).

It used to write a relative `file2:` key path into policy.toml, so the
`haios run` command it printed next exited 6. The key path and the printed
command must be absolute, and the printed command must work from another
directory.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "HAIOS_"))}


def test_relative_directory_writes_absolute_key_path(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from haios.cli.client import main; main()",
            "example",
            "demo",
            "--profiles",
            str(PROJECT / "policy" / "profiles"),
        ],
        cwd=work,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    policy = tomllib.loads((work / "demo" / "policy" / "policy.toml").read_text())
    key = policy["engine"]["signing_key"]
    assert key.startswith("file2:/"), key
    assert Path(key.removeprefix("file2:")) == work / "demo" / "engine" / "engine.pem"

    command = shlex.split(done.stdout.strip())
    assert command[:2] == ["haios", "run"]
    assert all(Path(arg).is_absolute() for arg in command[2:] if not arg.startswith("--"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "haios", *command[1:]],
        cwd=elsewhere,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
