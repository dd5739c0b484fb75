# SPDX-License-Identifier: Apache-2.0
"""`haios run` shows its progress on stderr (issue 15), through the real engine.

stderr captured (not a terminal): one timestamped line per event, in order,
for a success, a failure, a kill and a budget halt; no escape code, nothing
secret, never the engine's private area (`state_dir`). Under a pseudo-
terminal: a live block that ends cleanly (cursor shown again, the block
erased, the final summary left on screen). stdout stays the summary, or
one JSON document with --json.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
import uuid
from pathlib import Path

import pytest

from haios.cli.render import render_human
from haios.models.policy import DEFAULT_STATE_DIR
from tests.adversarial.conftest import DATA
from tests.adversarial.test_kill_support import marker_pids, wait_for
from tests.support.world import World, plan, py, read_json, sh, step

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (.+)$")
COUNT = "tail -n +2 data.csv | wc -l | tr -d ' \\n' > count.txt"
# Two steps report 0.1 and 0.2 USD: as binary floats they sum to
# 0.30000000000000004; a person must read $0.30.
REPORT = ("import json, os\nopen('report.txt', 'w').write(open('count.txt').read())\n"
          "json.dump({'usd': 0.1, 'tokens': 10}, open(os.environ['HAIOS_COST_REPORT'], 'w'))\n")
SUMMARY = ("import json, os, time\ntime.sleep({sleep})\n"
           "open('summary.txt', 'w').write(open('report.txt').read())\n"
           "json.dump({{'usd': 0.2, 'tokens': 1500}}, "
           "open(os.environ['HAIOS_COST_REPORT'], 'w'))\n")
SPEND = ("import json, os\njson.dump({'usd': 0.6, 'tokens': 0}, "
         "open(os.environ['HAIOS_COST_REPORT'], 'w'))\n")


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path / "world")


def three_step_plan(*, sleep: float = 0.2) -> dict[str, object]:
    return plan("nightly-report", [
        step("count", sh(COUNT), materials=["data.csv"], products=["count.txt"]),
        step("report", py(REPORT), needs=["count"], materials=["count.txt"],
             products=["report.txt"]),
        step("summary", py(SUMMARY.format(sleep=sleep)), needs=["report"],
             materials=["report.txt"], products=["summary.txt"]),
    ], {"data.csv": DATA}, budget={"usd": 1.0, "cpu_seconds": 60})


def messages(stderr: str) -> list[str]:
    """The progress lines' messages; every line before the last must be one."""
    found = []
    for line in stderr.splitlines():
        match = STAMP.match(line)
        if match is not None:
            found.append(match.group(1))
    return found


def assert_clean(stderr: str, world: World) -> None:
    """No escape code, no raw control character, no private path, no secret."""
    assert "\x1b" not in stderr and "\x9b" not in stderr, repr(stderr)
    for line in stderr.splitlines():
        assert line.isprintable(), repr(line)
    assert DEFAULT_STATE_DIR not in stderr, stderr
    assert str(world.engine.private_path) not in stderr
    assert "accessor" not in stderr and "hvs." not in stderr
    assert "uid" not in stderr  # the leased uid is not for a person


def assert_in_order(found: list[str], *patterns: str) -> list[int]:
    """Each pattern matches a later message than the one before; return their indexes."""
    indexes, start = [], 0
    for pattern in patterns:
        for index in range(start, len(found)):
            if re.fullmatch(pattern, found[index]):
                indexes.append(index)
                start = index + 1
                break
        else:
            pytest.fail(f"no message matching {pattern!r} after #{start} in:\n" +
                        "\n".join(found))
    return indexes


DURATION = r"(?:[0-9.]+ ms|<0\.1 ms|[0-9.]+ s|\d+ min \d\d s)"


def test_success_shows_verification_each_step_and_totals(world: World) -> None:
    document = three_step_plan()
    root = world.os_root(document, {"data.csv": DATA})
    result = world.run(root)
    assert result.code == 0, result.stderr
    assert_clean(result.stderr, world)
    found = messages(result.stderr)
    assert len(found) == len(result.stderr.splitlines()), result.stderr  # every line stamped
    digest = hashlib.sha256((root / "exec_plan.json").read_bytes()).hexdigest()[:12]
    assert_in_order(
        found,
        rf"verified in {DURATION}: plan signature, 1 input \(1 digest, 1 signature, 1 link\)",
        rf"run started: plan nightly-report \(sha256 {digest}\), 3 steps, jobs 1",
        r"step count: started \(attempt 1, profile default\)",
        rf"step count: succeeded in {DURATION} \(attempt 1, exit 0; cpu {DURATION}\)",
        r"step report: started \(attempt 1, profile default\)",
        rf"step report: succeeded in {DURATION} \(attempt 1, exit 0; cpu {DURATION}, "
        r"\$0\.10, 10 tokens\)",
        r"step summary: started \(attempt 1, profile default\)",
        rf"step summary: succeeded in {DURATION} \(.*\$0\.20, 1500 tokens\)",
        rf"plan nightly-report: succeeded in {DURATION}; steps: 3 succeeded; "
        rf"used cpu {DURATION}, wall {DURATION}, \$0\.30, 1510 tokens; "
        rf"budget left cpu {DURATION}, \$0\.70",
    )
    assert len(found) == 9, found  # nothing else: no token, product or uid noise
    # stdout is the summary, as before, with its numbers for people.
    state = read_json(root / "state.json")
    assert result.stdout == render_human(state) + "\n"
    assert "  cost: cpu " in result.stdout and ", $0.30, 1510 tokens" in result.stdout
    assert "0.30000000000000004" not in result.stdout + result.stderr
    # The rerun verifies, then says there is nothing to do.
    again = world.run(root)
    assert again.code == 0, again.stderr
    assert_in_order(messages(again.stderr), r"verified in .*",
                    r"plan already succeeded: nothing to run")


def test_json_stdout_stays_one_document(world: World) -> None:
    root = world.os_root(three_step_plan(sleep=0), {"data.csv": DATA})
    result = world.run(root, "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout) == read_json(root / "state.json")
    assert result.stdout.count("\n") == 1
    assert_in_order(messages(result.stderr), r"run started: .*",
                    r"plan nightly-report: succeeded .*")


def test_failure_shows_the_failed_step_and_the_halt(world: World) -> None:
    root = world.os_root(plan("fail", [
        step("a", sh("echo boom >&2; exit 3"), products=["a.txt"]),
        step("b", sh("echo b > b.txt"), needs=["a"], products=["b.txt"]),
        step("c", sh("echo c > c.txt"), products=["c.txt"]),
    ]))
    result = world.run(root)
    assert result.code == 1, result.stderr
    assert_clean(result.stderr, world)
    found = messages(result.stderr)
    assert_in_order(
        found,
        r"verified in .*: plan signature, 0 inputs",
        r"run started: plan fail .*",
        r"step a: started \(attempt 1, profile default\)",
        rf"step a: failed in {DURATION} \(attempt 1, exit 3; cpu {DURATION}\): "
        r"exited with status 3",
        r"plan fail: failed in .* \(step a failed: exited with status 3\); "
        rf"steps: 1 failed, 2 skipped; used cpu {DURATION}, wall {DURATION}",
    )
    assert not any(m.startswith(("step b:", "step c:")) for m in found), found
    # After the progress, the CLI's one diagnostic line.
    assert result.stderr.splitlines()[-1].startswith("haios: ")


def test_refusal_stays_one_diagnostic_line(world: World) -> None:
    root = world.os_root(three_step_plan(), {"data.csv": DATA}, sign_plan=False)
    result = world.run(root)
    assert result.code == 3
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert messages(result.stderr) == []


def test_budget_halt_shows_its_reason(world: World) -> None:
    steps = [step(f"s{i}", py(SPEND), needs=[f"s{i - 1}"] if i else []) for i in range(4)]
    root = world.os_root(plan("spend", steps, budget={"usd": 1.0}))
    result = world.run(root)
    assert result.code == 5, result.stderr
    assert_clean(result.stderr, world)
    found = messages(result.stderr)
    assert_in_order(
        found,
        r"run started: plan spend .*",
        rf"step s0: succeeded in {DURATION} \(attempt 1, exit 0; .*\$0\.60\)",
        rf"step s1: succeeded in {DURATION} \(attempt 1, exit 0; .*\$0\.60\)",
        r"budget halt: budget exhausted: usd; no further step starts",
        r"plan spend: budget exhausted in .* \(budget exhausted: usd\); "
        rf"steps: 2 succeeded, 2 skipped; used cpu {DURATION}, wall {DURATION}, \$1\.20; "
        r"budget left \$0\.00",
    )
    assert not any(m.startswith(("step s2", "step s3")) for m in found), found


def _start(world: World, root: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "HAIOS_"))}
    return subprocess.Popen([sys.executable, "-m", "haios", "run", str(root), "--policy",
                             str(world.policy)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("flag", ["KILL", "KILL.tree"])
def test_kill_shows_the_flag_by_base_name(world: World, flag: str) -> None:
    marker = f"haios-marker-{uuid.uuid4().hex}"
    root = world.os_root(plan("kill", [
        step("tree", [*py("import time; time.sleep(300)"), marker], timeout_seconds=300)]))
    engine = _start(world, root)
    try:
        assert wait_for(lambda: bool(marker_pids(marker)), 30), "the step never ran"
        (root / "control" / flag).write_text("stop")
        stdout, stderr = engine.communicate(timeout=60)
    finally:
        engine.kill()
    assert engine.returncode == 4, stderr
    assert_clean(stderr, world)
    assert str(root / "control") not in stderr  # flags by base name only
    found = messages(stderr)
    started, _, _, final = assert_in_order(
        found,
        r"step tree: started \(attempt 1, profile default\)",
        rf"kill switch engaged: {re.escape(flag)} \(.+\)",
        rf"step tree: killed in {DURATION} \(attempt 1.*\): .*{re.escape(flag)}.*",
        rf"plan kill: killed in {DURATION} \(.*{re.escape(flag)}.*\); steps: 1 killed; used .*",
    )
    killed = [i for i, m in enumerate(found) if re.fullmatch(
        rf"step tree: process tree killed by {re.escape(flag)}, {DURATION} after the flag "
        r"was seen", m)]
    assert len(killed) == 1 and started < killed[0] < final, found
    assert stdout.startswith("plan kill: killed\n")


# -- under a pseudo-terminal ------------------------------------------------------------------

COLUMNS = 200
CSI = re.compile(r"\x1b\[([0-9;?]*)([@-~])")
OSC = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")


class Screen:
    """Just enough of a terminal to replay what rich writes: text, CR/LF,
    cursor up/down/column and erase in line/display."""

    def __init__(self) -> None:
        self.rows: list[list[str]] = [[]]
        self.y = self.x = 0

    def feed(self, text: str) -> None:
        text = OSC.sub("", text)
        pos = 0
        while pos < len(text):
            match = CSI.match(text, pos)
            if match is not None:
                self._csi(match.group(1), match.group(2))
                pos = match.end()
                continue
            self._char(text[pos])
            pos += 1

    def _row(self) -> list[str]:
        while len(self.rows) <= self.y:
            self.rows.append([])
        return self.rows[self.y]

    def _char(self, char: str) -> None:
        if char == "\r":
            self.x = 0
        elif char == "\n":
            self.y += 1
            self._row()
        elif char == "\b":
            self.x = max(0, self.x - 1)
        elif char >= " ":
            row = self._row()
            row.extend(" " * (self.x + 1 - len(row)))
            row[self.x] = char
            self.x += 1

    def _csi(self, params: str, final: str) -> None:
        if params.startswith("?"):
            return  # private modes (cursor shown/hidden): checked on the raw bytes
        n = int(params.split(";")[0] or 0)
        row = self._row()
        if final == "A":
            self.y = max(0, self.y - max(n, 1))
        elif final == "B":
            self.y += max(n, 1)
        elif final == "G":
            self.x = max(n, 1) - 1
        elif final == "K":
            if n == 0:
                del row[self.x:]
            elif n == 1:
                row[: self.x + 1] = [" "] * min(len(row), self.x + 1)
            else:
                row.clear()
        elif final == "J" and n == 0:
            del row[self.x:]
            del self.rows[self.y + 1:]

    def lines(self) -> list[str]:
        return [text for text in ("".join(row).rstrip() for row in self.rows) if text]


def _read_pty(master: int, engine: subprocess.Popen[bytes], timeout: float) -> bytes:
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif engine.poll() is not None:
            break
    return b"".join(chunks)


def test_terminal_gets_a_live_block_that_ends_cleanly(world: World) -> None:
    root = world.os_root(three_step_plan(sleep=1.5), {"data.csv": DATA})
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, COLUMNS, 0, 0))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VAULT_", "HAIOS_")) and k not in ("COLUMNS", "LINES")}
    env["TERM"] = "xterm-256color"
    try:
        engine = subprocess.Popen([sys.executable, "-m", "haios", "run", str(root),
                                   "--policy", str(world.policy)], env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=slave)
        os.close(slave)
        slave = -1
        raw = _read_pty(master, engine, timeout=120).decode()
        stdout = engine.communicate(timeout=60)[0].decode()
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert engine.returncode == 0, raw
    # stdout is untouched: the plain summary, no escape code.
    assert stdout == render_human(read_json(root / "state.json")) + "\n"
    # The live block was drawn while a step ran, with the cursor hidden ...
    assert "\x1b[?25l" in raw
    plain = CSI.sub("", OSC.sub("", raw))
    assert "plan nightly-report · " in plain and "1 running" in plain, plain[-2000:]
    assert "▸ summary · attempt 1" in plain
    # ... and the run ends with the cursor shown again, after the last hide.
    assert raw.rfind("\x1b[?25h") > raw.rfind("\x1b[?25l")
    screen = Screen()
    screen.feed(raw)
    shown = screen.lines()
    # The block is erased; the log lines and the final summary stay visible.
    assert not any("running" in line or "▸" in line for line in shown), shown
    assert shown[0].startswith("verified in "), shown
    assert any(line.startswith("step summary: succeeded in ") for line in shown), shown
    assert shown[-1].startswith("plan nightly-report: succeeded in "), shown
    assert "$0.30, 1510 tokens" in shown[-1]
    assert not any(line.startswith("step count: started") for line in shown)  # in the block
    assert DEFAULT_STATE_DIR not in raw
