# SPDX-License-Identifier: Apache-2.0
"""A test world: real keys, a policy folder, signed os_roots, the real engine.

Builds everything the way a client would (DSSE signatures, in-toto links)
and runs `haios` in-process through the CLI entry or as a subprocess.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from haios.cli.client import sign_file, write_link
from tests.support.keys import KeyFile

PROJECT = Path(__file__).resolve().parents[2]
PROFILES = PROJECT / "policy" / "profiles"


def expires(hours: float = 24) -> str:
    when = dt.datetime.now(dt.UTC) + dt.timedelta(hours=hours)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def step(step_id: str, run: list[str], **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"id": step_id, "run": run, "needs": [], "materials": [],
                            "products": [], "profile": "default", "vault_scope": None,
                            "env": {}, "timeout_seconds": 30}
    base.update(fields)
    return base


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def py(source: str) -> list[str]:
    return ["/usr/bin/python3", "-c", source]


def plan(plan_id: str, steps: list[dict[str, Any]], inputs: dict[str, bytes] | None = None,
         **fields: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "schema": "haios/exec_plan/v1", "plan_id": plan_id, "expires": expires(),
        "budget": {}, "inputs": [{"name": n, "sha256": hashlib.sha256(d).hexdigest()}
                                 for n, d in sorted((inputs or {}).items())],
        "steps": steps,
    }
    document.update(fields)
    return document


@dataclasses.dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


class World:
    """Keys for every party, one policy folder, os_roots under `base`."""

    def __init__(self, base: Path, *, vault_scopes: dict[str, dict[str, Any]] | None = None,
                 extra_kill_paths: list[str] | None = None) -> None:
        self.base = base
        keys = base / "keys"
        self.planner = KeyFile(keys, "planner")
        self.agent = KeyFile(keys, "agent")
        self.outsider = KeyFile(keys, "outsider")
        secret = base / "engine-secret"
        secret.mkdir(mode=0o700, parents=True)
        self.engine = KeyFile(secret, "engine")
        self.policy = base / "policy"
        self.write_policy(self.policy, vault_scopes=vault_scopes,
                          extra_kill_paths=extra_kill_paths or [])

    def write_policy(self, directory: Path, *, planners: list[KeyFile] | None = None,
                     threshold: int = 1, vault_scopes: dict[str, dict[str, Any]] | None = None,
                     extra_kill_paths: list[str] | None = None, extra: str = "") -> Path:
        (directory / "keys").mkdir(parents=True, exist_ok=True)
        planners = planners or [self.planner]
        for key in [*planners, self.agent, self.engine]:
            shutil.copyfile(key.public_path, directory / "keys" / key.public_path.name)
        planner_keys = ", ".join(f'"keys/{k.public_path.name}"' for k in planners)
        text = (
            'schema = "haios/policy/v1"\n\n'
            f"[roles.planner]\nkeys = [{planner_keys}]\nthreshold = {threshold}\n\n"
            '[roles.functionary]\nkeys = ["keys/agent.pub.pem"]\nthreshold = 1\n\n'
            f'[engine]\nsigning_key = "file2:{self.engine.private_path}"\n'
            'public_key = "keys/engine.pub.pem"\n\n'
            f"[kill_switch]\nextra_paths = {json.dumps(extra_kill_paths or [])}\n"
        )
        for name, scope in (vault_scopes or {}).items():
            text += (f"\n[vault_scopes.{name}]\npolicies = {json.dumps(scope['policies'])}\n"
                     f"ttl_seconds = {scope.get('ttl_seconds', 120)}\n"
                     f"num_uses = {scope.get('num_uses', 0)}\n")
        (directory / "policy.toml").write_text(text + extra)
        if not (directory / "profiles").exists():
            shutil.copytree(PROFILES, directory / "profiles")
        for path in [directory, *directory.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        return directory

    def os_root(self, document: dict[str, Any], inputs: dict[str, bytes] | None = None, *,
                name: str = "os_root", sign_plan: bool = True, links: bool = True) -> Path:
        root = self.base / name
        (root / "inbox").mkdir(parents=True, exist_ok=True)
        (root / "control").mkdir(exist_ok=True)
        for item, data in sorted((inputs or {}).items()):
            (root / "inbox" / item).write_bytes(data)
            sign_file(root / "inbox" / item, self.agent.private_path)
        if inputs and links:
            write_link(sorted(inputs), root / "inbox", root / "links", self.agent.private_path)
        self.write_plan(root, document, sign=sign_plan)
        return root

    def write_plan(self, root: Path, document: dict[str, Any] | bytes, *, sign: bool = True,
                   key: KeyFile | None = None) -> None:
        data = document if isinstance(document, bytes) else json.dumps(document).encode()
        (root / "exec_plan.json").write_bytes(data)
        if sign:
            sign_file(root / "exec_plan.json", (key or self.planner).private_path)

    def run(self, root: Path, *args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> Result:
        return haios("run", str(root), "--policy", str(self.policy), *args, env=env,
                     timeout=timeout)

    def state(self, root: Path, *args: str) -> Result:
        return haios("state", str(root), "--policy", str(self.policy), *args)


def haios(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Result:
    """Run the installed engine as a user would (a fresh process each time)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "HAIOS_"))}
    base.update(env or {})
    done = subprocess.run([sys.executable, "-m", "haios", *args], capture_output=True,
                          text=True, timeout=timeout, env=base, check=False)
    return Result(done.returncode, done.stdout, done.stderr)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
