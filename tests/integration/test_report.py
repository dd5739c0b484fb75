# SPDX-License-Identifier: Apache-2.0
"""`haios-client report` over real runs of the real engine.

Runs that succeed, fail, are killed, halt on budget, use Vault, and resume
after an engine crash are reported on; then each kind of file in os_root is
tampered with and the exact failing check is asserted in `--json`. The HTML
is opened in a real headless Chromium driven over the DevTools protocol (a
pipe, standard library only): no console error, no network request, the
expected step count and verdict, hostile step output shown as text.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from haios.cli.client import cli
from haios.report.model import Report
from tests.adversarial.conftest import DATA
from tests.support.openbao import ENGINE_POLICY, REPORTS_POLICY, OpenBaoServer
from tests.support.world import World, plan, py, read_json, sh, step

COUNT = "tail -n +2 data.csv | wc -l | tr -d ' \\n' > count.txt"
REPORT = ("import json, os\nn = int(open('count.txt').read())\n"
          "open('report.txt', 'w').write(f'rows={n}\\n')\n"
          "json.dump({'usd': 0.25, 'tokens': 10}, open(os.environ['HAIOS_COST_REPORT'], 'w'))\n")
HOSTILE = ('<script>window.__pwned = 1</script><img src="http://192.0.2.1/x.png" '
           'onerror="window.__pwned = 2"></pre><b>bold</b>')
CHROMIUM = shutil.which("chromium")


def invoke(root: Path, policy: Path, *args: str) -> tuple[int, str, str]:
    """Run `haios-client report` in process: (exit code, stdout, stderr)."""
    result = CliRunner().invoke(cli, ["report", str(root), "--policy", str(policy), *args])
    return result.exit_code, result.stdout, result.stderr


def report_json(root: Path, policy: Path, *args: str) -> tuple[int, dict[str, Any]]:
    code, out, _err = invoke(root, policy, "--json", *args)
    document = json.loads(out)
    Report.model_validate(document)  # the output is the schema's model
    return code, document


def failed(document: dict[str, Any]) -> set[str]:
    return {c["id"] for c in document["checks"] if c["result"] == "fail"}


def results(document: dict[str, Any]) -> dict[str, str]:
    return {c["id"]: c["result"] for c in document["checks"]}


def two_step_plan(**fields: Any) -> dict[str, Any]:
    return plan("happy", [
        step("count", sh(COUNT), materials=["data.csv"], products=["count.txt"]),
        step("report", py(REPORT), needs=["count"], materials=["count.txt"],
             products=["report.txt"]),
    ], {"data.csv": DATA}, budget={"cpu_seconds": 60, "usd": 1.0}, **fields)


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "HAIOS_"))}


@pytest.fixture(scope="module")
def happy(tmp_path_factory: pytest.TempPathFactory) -> tuple[World, Path]:
    """One succeeded two-step run, shared read-only by the tests of this module."""
    world = World(tmp_path_factory.mktemp("report") / "world")
    root = world.os_root(two_step_plan(), {"data.csv": DATA})
    result = world.run(root)
    assert result.code == 0, result.stderr
    return world, root


@pytest.fixture
def copy(happy: tuple[World, Path], tmp_path: Path) -> Path:
    """A private copy of the succeeded os_root to tamper with."""
    target = tmp_path / "os_root"
    shutil.copytree(happy[1], target, symlinks=True)
    return target


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in root.rglob("*")}


# -- runs that verify ----------------------------------------------------------


def test_succeeded_run_verifies_with_provenance(happy: tuple[World, Path]) -> None:
    world, root = happy
    before = snapshot(root)
    code, document = report_json(root, world.policy)
    assert code == 0, failed(document)
    assert document["verdict"] == "verified" and document["state"]["status"] == "succeeded"
    assert snapshot(root) == before  # the report never writes into os_root
    outcome = results(document)
    for check in ("plan.signature", "state.signature", "registry.signature", "audit.chain",
                  "audit.head", "layout.in_toto", "input.digest:data.csv",
                  "input.signature:data.csv", "input.link:data.csv",
                  "artefact.signature:report.txt", "link.engine:report",
                  "cost.signature:count", "registry.agrees", "audit.agrees"):
        assert outcome[check] == "ok", check
    assert [s["status"] for s in document["steps"]] == ["succeeded", "succeeded"]
    product = next(p for p in document["products"] if p["name"] == "report.txt")
    assert product["verified"] and product["signers"] == [world.engine.keyid]
    assert product["materials"][0] | {"evidence": None} == {
        "name": "count.txt", "origin": "step:count", "signers": [world.engine.keyid],
        "sha256": read_json(root / "state.json")["steps"]["count"]["products"]["count.txt"],
        "evidence": None}
    data_csv = next(p for p in document["products"] if p["name"] == "count.txt")["materials"][0]
    assert data_csv["origin"] == "input" and data_csv["signers"] == [world.agent.keyid]
    assert any(e.startswith("links/agent-submit.") for e in data_csv["evidence"])
    confinement = product["confinement"]
    finished = [json.loads(line) for line in (root / "audit.jsonl").read_text().splitlines()
                if '"step.finished"' in line]
    uid = next(r["fields"]["uid"] for r in finished if r["fields"]["step_id"] == "report")
    assert confinement["uid"] == uid and confinement["network"] == "none"
    assert confinement["profile_matches_policy"] is True and confinement["no_new_privs"]
    assert "pid" in confinement["namespaces"] and confinement["capabilities_empty"]
    usd = next(line for line in document["budget"] if line["unit"] == "usd")
    assert usd == {"unit": "usd", "consumed": 0.25, "budget": 1.0, "fraction": 0.25,
                   "exhausted": False}
    assert document["audit"]["records"] == document["audit"]["signed_records"]


def test_human_summary_and_html_file(happy: tuple[World, Path], tmp_path: Path) -> None:
    world, root = happy
    out = tmp_path / "report.html"
    code, stdout, stderr = invoke(root, world.policy, "-o", str(out))
    assert code == 0
    assert "VERIFIED" in stdout and "plan happy: succeeded" in stdout
    assert "report written to" in stderr
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and 'data-verdict="verified"' in page
    assert "Content-Security-Policy" in page and "default-src &#39;none&#39;" in page


def test_unusable_policy_is_exit_6_and_usage_is_exit_2(happy: tuple[World, Path],
                                                        tmp_path: Path) -> None:
    world, root = happy
    code, stdout, stderr = invoke(root, tmp_path / "missing")
    assert code == 6 and stdout == "" and "PolicyLoadError" in stderr
    loose = tmp_path / "loose"
    shutil.copytree(world.policy, loose)
    os.chmod(loose / "policy.toml", 0o666)
    assert invoke(root, loose)[0] == 6
    assert CliRunner().invoke(cli, ["report", str(root)]).exit_code == 2  # --policy required


def test_failed_run_verifies_and_shows_why(tmp_path: Path) -> None:
    world = World(tmp_path / "w")
    root = world.os_root(plan("fail", [
        step("alpha", sh("echo a > a.txt"), products=["a.txt"]),
        step("boom", sh(f"printf '%s' '{HOSTILE}' >&2; exit 3"), products=["b.txt"]),
        step("child", sh("echo c > c.txt"), needs=["boom"], products=["c.txt"]),
    ]))
    assert world.run(root).code == 1
    code, document = report_json(root, world.policy)
    assert code == 0, failed(document)
    assert document["state"]["status"] == "failed"
    steps = {s["id"]: s for s in document["steps"]}
    assert (steps["boom"]["status"], steps["boom"]["exit_code"]) == ("failed", 3)
    assert steps["child"]["status"] == "skipped" and steps["child"]["history"] == []
    assert steps["boom"]["output"]["stderr"] == HOSTILE
    outcome = results(document)
    assert outcome["cost.signature:boom"] == "ok" and "cost.signature:child" not in outcome
    assert outcome["layout.in_toto"] == "ok"  # the engine's link for alpha alone
    assert [p["name"] for p in document["products"]] == ["a.txt"]


def test_rejected_run_fails_verification_and_says_why(tmp_path: Path) -> None:
    world = World(tmp_path / "w")
    root = world.os_root(plan("rej", [step("s", sh("true"))]))
    (root / "exec_plan.json.sig").unlink()
    assert world.run(root).code == 3
    code, document = report_json(root, world.policy)
    assert code == 3 and failed(document) == {"plan.signature"}
    assert document["state"]["status"] == "rejected" and document["state"]["reason"]
    assert results(document)["state.signature"] == "ok"  # the engine signed the refusal


def test_killed_run_reports_the_kill_with_latency(tmp_path: Path) -> None:
    world = World(tmp_path / "w")
    root = world.os_root(plan("kill", [
        step("first", sh("echo one > one.txt"), products=["one.txt"]),
        step("sleeper", sh("sleep 120"), needs=["first"], timeout_seconds=300),
    ]))
    engine = subprocess.Popen([sys.executable, "-m", "haios", "run", str(root), "--policy",
                               str(world.policy)], env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for_status(root, "sleeper", "running", 60)
        time.sleep(0.5)
        (root / "control" / "KILL.sleeper").write_text("stop")
        _, stderr = engine.communicate(timeout=60)
    finally:
        engine.kill()
        engine.wait()
    assert engine.returncode == 4, stderr
    code, document = report_json(root, world.policy)
    assert code == 0, failed(document)
    assert document["state"]["status"] == "killed"
    kills = [k for k in document["kills"] if k["kind"] == "kill"]
    assert kills and kills[0]["step_id"] == "sleeper" and kills[0]["scope"] == "step"
    assert kills[0]["latency_seconds"] is not None and kills[0]["latency_seconds"] >= 0
    steps = {s["id"]: s for s in document["steps"]}
    assert steps["sleeper"]["status"] == "killed" and steps["first"]["status"] == "succeeded"


def test_budget_halt_shows_the_exhausted_dimension(tmp_path: Path) -> None:
    world = World(tmp_path / "w")
    spend = ("import json, os; open('x.txt', 'w').write('x'); "
             "json.dump({'usd': 0.75}, open(os.environ['HAIOS_COST_REPORT'], 'w'))")
    root = world.os_root(plan("budget", [
        step("spend", py(spend), products=["x.txt"]),
        step("later", sh("echo y > y.txt"), needs=["spend"], products=["y.txt"]),
    ], budget={"usd": 0.5}))
    assert world.run(root).code == 5
    code, document = report_json(root, world.policy)
    assert code == 0, failed(document)
    assert document["state"]["status"] == "budget_exhausted"
    usd = next(line for line in document["budget"] if line["unit"] == "usd")
    assert usd["exhausted"] and usd["consumed"] == 0.75 and usd["fraction"] == 1.5
    assert {s["id"]: s["status"] for s in document["steps"]}["later"] == "skipped"


def wait_for_status(root: Path, step_id: str, status: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if read_json(root / "state.json")["steps"][step_id]["status"] == status:
                return True
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    return False


def test_crash_then_resume_both_verify(tmp_path: Path) -> None:
    world = World(tmp_path / "w")
    root = world.os_root(plan("resume", [
        step("first", py("import os; open('a.txt','w').write(os.urandom(8).hex())"),
             products=["a.txt"]),
        step("second", sh("sleep 3; cp a.txt b.txt"), needs=["first"], materials=["a.txt"],
             products=["b.txt"], timeout_seconds=60),
    ]))
    engine = subprocess.Popen([sys.executable, "-m", "haios", "run", str(root), "--policy",
                               str(world.policy)], env=env(), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for_status(root, "second", "running", 60)
        os.kill(engine.pid, signal.SIGKILL)
    finally:
        engine.wait()
    time.sleep(0.5)
    code, crashed = report_json(root, world.policy)
    assert code == 0, failed(crashed)
    assert results(crashed)["state.status"] == "warn"  # stopped mid-run
    assert results(crashed)["registry.signature"] == "skipped"
    assert world.run(root, timeout=120).code == 0
    code, document = report_json(root, world.policy)
    assert code == 0, failed(document)
    steps = {s["id"]: s for s in document["steps"]}
    assert steps["first"]["attempts"] == 1 and steps["second"]["attempts"] == 2
    history = steps["second"]["history"]
    assert [a["status"] for a in history] == [None, "succeeded"]  # the first never ended
    assert results(document)["layout.in_toto"] == "ok"


def test_vault_tokens_are_reported_by_accessor(tmp_path: Path, openbao: OpenBaoServer) -> None:
    world = World(tmp_path / "w", vault_scopes={"reports": {"policies": [REPORTS_POLICY]}})
    root = world.os_root(plan("vault", [
        step("probe", py("open('v.txt', 'w').write('ok')"), profile="network",
             vault_scope="reports", products=["v.txt"]),
    ]))
    token = openbao.create_token([ENGINE_POLICY])
    result = world.run(root, env={"VAULT_ADDR": openbao.addr, "VAULT_TOKEN": token})
    assert result.code == 0, result.stderr
    code, document = report_json(root, world.policy)
    assert code == 0, failed(document)
    tokens = {t["step_id"]: t for t in document["vault_tokens"]}
    probe = tokens["probe"]
    assert probe["issued"] and probe["revoked"] and not probe["outstanding"]
    assert token not in json.dumps(document)


# -- tampering: each kind of file ----------------------------------------------


def _flip(relative: str, old: bytes, new: bytes) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        path = root / relative
        data = path.read_bytes()
        assert old in data, (relative, old)
        path.write_bytes(data.replace(old, new, 1))
    return mutate


def _glob(pattern: str) -> Callable[[Path], Path]:
    return lambda root: next(root.glob(pattern))


def _edit_first(pattern: str, edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        path = _glob(pattern)(root)
        path.write_bytes(edit(path.read_bytes()))
    return mutate


def _resign_sig(relative: str) -> Callable[[Path], None]:
    """Replace a signature with a valid one by a key the policy does not trust."""
    def mutate(root: Path) -> None:
        from tests.support.keys import KeyFile, sign_bytes

        stranger = KeyFile(root.parent / "stranger", "stranger")
        data = (root / relative).read_bytes()
        (root / f"{relative}.sig").write_bytes(sign_bytes(Path(relative).name, data, [stranger]))
    return mutate


def _audit_value_edit(root: Path) -> None:
    """Change a value in a middle record, keeping the line canonical."""
    path = root / "audit.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b'"result":"ok"', b'"result":"no"')
    path.write_bytes(b"".join(lines))


def _audit_drop_last(root: Path) -> None:
    path = root / "audit.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))


def _symlink_artefact(root: Path) -> None:
    target = root / "artefacts" / "report.txt"
    target.unlink()
    target.symlink_to("/etc/hostname")


def _link_product_digest(root: Path) -> None:
    path = _glob("links/count.*.link")(root)
    document = json.loads(path.read_text())
    document["signed"]["products"]["count.txt"]["sha256"] = hashlib.sha256(b"tampered").hexdigest()
    path.write_text(json.dumps(document, indent=1))


TAMPERING: list[tuple[str, Callable[[Path], None], set[str]]] = [
    ("plan_bytes", _flip("exec_plan.json", b'"happy"', b'"HAPPY"'),
     {"plan.signature", "state.plan"}),
    ("plan_untrusted_signer", _resign_sig("exec_plan.json"), {"plan.signature"}),
    ("input_bytes", _flip("inbox/data.csv", b"1,2", b"9,9"), {"input.digest:data.csv"}),
    ("input_untrusted_signer", _resign_sig("inbox/data.csv"), {"input.signature:data.csv"}),
    ("functionary_link", _edit_first("links/agent-submit.*.link",
                                     lambda d: d.replace(b'"sha256": "', b'"sha256": "0', 1)),
     {"input.link:data.csv"}),
    ("artefact_bytes", _flip("artefacts/report.txt", b"rows=1", b"rows=9"),
     {"artefact.digest:report.txt"}),
    ("artefact_untrusted_signer", _resign_sig("artefacts/report.txt"),
     {"artefact.signature:report.txt"}),
    ("artefact_symlink", _symlink_artefact, {"artefact.digest:report.txt"}),
    ("cost_record", _flip("cost/report.json", b'"tokens":10', b'"tokens":11'),
     {"cost.signature:report"}),
    ("cost_untrusted_signer", _resign_sig("cost/count.json"), {"cost.signature:count"}),
    ("engine_link", _link_product_digest, {"link.engine:count", "layout.in_toto"}),
    ("state", _flip("state.json", b'"attempts":1', b'"attempts":2'), {"state.signature"}),
    ("registry", _flip("registry_map.json", b'"size":8', b'"size":9'), {"registry.signature"}),
    ("audit_middle_record", _audit_value_edit, {"audit.chain"}),
    ("audit_last_record_removed", _audit_drop_last, {"audit.head"}),
]


@pytest.mark.parametrize(("mutate", "expected"), [(m, e) for _, m, e in TAMPERING],
                         ids=[name for name, _, _ in TAMPERING])
def test_tampered_file_fails_its_check(copy: Path, happy: tuple[World, Path],
                                       mutate: Callable[[Path], None],
                                       expected: set[str]) -> None:
    mutate(copy)
    code, document = report_json(copy, happy[0].policy)
    assert code == 3
    assert document["verdict"] == "failed"
    assert expected <= failed(document), failed(document)


def test_edited_log_is_shown_but_unsigned(copy: Path, happy: tuple[World, Path]) -> None:
    (copy / "logs" / "count.out").write_text("edited after the run\n")
    code, document = report_json(copy, happy[0].policy)
    assert code == 0  # logs are not signed by the engine: shown as untrusted text
    assert document["steps"][0]["output"]["stdout"] == "edited after the run\n"


def test_failed_verification_still_writes_the_html(copy: Path, happy: tuple[World, Path],
                                                   tmp_path: Path) -> None:
    (copy / "state.json").write_bytes((copy / "state.json").read_bytes().replace(
        b'"attempts":1', b'"attempts":2', 1))
    out = tmp_path / "r.html"
    code, _out, _err = invoke(copy, happy[0].policy, "-o", str(out))
    assert code == 3 and 'data-verdict="failed"' in out.read_text()


# -- the page in a real browser --------------------------------------------------


class DevTools:
    """Headless Chromium driven over --remote-debugging-pipe (fds 3 and 4)."""

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--remote-debugging-pipe")

    def __init__(self, binary: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="haios-chromium-")
        commands_r, self._commands = os.pipe()
        self._replies_r, replies_w = os.pipe()
        # Move the child's ends above 10 so the dup2 to 3 and 4 cannot clobber them.
        child_in = fcntl.fcntl(commands_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(replies_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(commands_r)
        os.close(replies_w)

        def pipe_fds() -> None:
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        self.process = subprocess.Popen(
            [binary, *self.FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(3, 4), preexec_fn=pipe_fds)
        os.close(child_in)
        os.close(child_out)
        self.events: list[dict[str, Any]] = []
        self._replies: dict[int, dict[str, Any]] = {}
        self._next = 0
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._replies_r, 1 << 16):
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                with self._cond:
                    if "id" in message:
                        self._replies[message["id"]] = message
                    else:
                        self.events.append(message)
                    self._cond.notify_all()

    def send(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None, timeout: float = 30) -> dict[str, Any]:
        self._next += 1
        number = self._next
        message: dict[str, Any] = {"id": number, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        with self._cond:
            if not self._cond.wait_for(lambda: number in self._replies, timeout):
                raise TimeoutError(method)
            reply = self._replies.pop(number)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return dict(reply.get("result", {}))

    def wait_event(self, method: str, timeout: float = 30) -> None:
        with self._cond:
            if not self._cond.wait_for(
                    lambda: any(e.get("method") == method for e in self.events), timeout):
                raise TimeoutError(method)

    def open(self, page: Path) -> str:
        """Load `page` in the first tab; return the DevTools session id."""
        targets = self.send("Target.getTargets")["targetInfos"]
        target = next(t for t in targets if t["type"] == "page")
        session = str(self.send("Target.attachToTarget",
                                {"targetId": target["targetId"], "flatten": True})["sessionId"])
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.send(f"{domain}.enable", session=session)
        self.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        self.wait_event("Page.loadEventFired")
        time.sleep(0.5)  # late console messages and requests
        return session

    def evaluate(self, session: str, expression: str) -> Any:
        reply = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                          session=session)
        return reply["result"].get("value")

    def screenshot(self, session: str, width: int = 1280, max_height: int = 3200) -> bytes:
        """A PNG of the top of the page at `width` CSS pixels."""
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
                  session=session)
        height = self.send("Page.getLayoutMetrics", session=session)["cssContentSize"]["height"]
        shot = self.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": min(height, max_height),
                     "scale": 1}}, session=session)
        return base64.b64decode(shot["data"])

    def problems(self) -> list[str]:
        """Console errors, exceptions and error log entries seen so far."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            thrown = method == "Runtime.exceptionThrown"
            logged = method == "Runtime.consoleAPICalled" and params.get("type") in ("error",
                                                                                    "assert")
            if thrown or logged:
                found.append(json.dumps(params)[:300])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(params["entry"]["text"][:300])
        return found

    def requests(self) -> list[str]:
        """Every URL the page asked for."""
        return [e["params"]["request"]["url"] for e in self.events
                if e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        with contextlib.suppress(OSError, TimeoutError, RuntimeError):
            self.send("Browser.close", timeout=5)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def browser() -> Iterator[DevTools]:
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    tools = DevTools(CHROMIUM)
    try:
        yield tools
    finally:
        tools.close()


def test_html_in_headless_chromium_is_inert_and_complete(browser: DevTools,
                                                          tmp_path: Path) -> None:
    world = World(tmp_path / "w")
    root = world.os_root(plan("hostile", [
        step("loud", sh(f"printf '%s' '{HOSTILE}'; printf '%s' '{HOSTILE}' >&2"),
             products=["l.txt"]),
        step("after", sh("echo a > a.txt"), needs=["loud"], products=["a.txt"]),
        step("alone", sh("echo b > b.txt"), products=["b.txt"]),
    ]))
    assert world.run(root).code == 1  # `loud` never writes l.txt
    page = tmp_path / "report.html"
    code, _out, _err = invoke(root, world.policy, "-o", str(page))
    assert code == 0
    session = browser.open(page)
    assert browser.problems() == []
    assert browser.requests() == [page.resolve().as_uri()]  # the page itself, nothing else
    assert browser.evaluate(session, "document.getElementById('verdict').dataset.verdict") \
        == "verified"
    assert browser.evaluate(session, "document.getElementById('plan-status').textContent") \
        == "failed"
    assert browser.evaluate(session, "document.querySelectorAll('#steps-table tbody tr')"
                                     ".length") == 3
    assert browser.evaluate(session, "document.querySelectorAll('g.dag-node').length") == 3
    shown = browser.evaluate(session, "Array.from(document.querySelectorAll("
                                      "'details.output pre')).map(p => p.textContent)")
    assert shown == [HOSTILE, HOSTILE]
    assert browser.evaluate(session, "typeof window.__pwned") == "undefined"
    assert browser.evaluate(session, "document.scripts.length") == 1
    assert browser.evaluate(session, "document.querySelectorAll('img, b').length") == 0
    # The audit filter works (the page's own script runs under the CSP).
    browser.evaluate(session, "const f = document.getElementById('audit-kind');"
                              "f.value = 'step.finished'; f.dispatchEvent(new Event('change'))")
    assert browser.evaluate(session, "document.getElementById('audit-shown').textContent") \
        == "2"
    assert browser.problems() == []


def test_failed_verdict_in_chromium(browser: DevTools, copy: Path,
                                    happy: tuple[World, Path], tmp_path: Path) -> None:
    _flip("artefacts/report.txt", b"rows=1", b"rows=9")(copy)
    page = tmp_path / "failed.html"
    assert invoke(copy, happy[0].policy, "-o", str(page))[0] == 3
    session = browser.open(page)
    assert browser.problems() == []
    assert browser.evaluate(session, "document.getElementById('verdict').dataset.verdict") \
        == "failed"
    assert browser.evaluate(session, "document.querySelectorAll('tr.fail').length") >= 1
