# SPDX-License-Identifier: Apache-2.0
"""Unit tests of haios.sandbox.cglimits: detection, creation, joining, removal.

The tests that create cgroups do so for real, on this host's hierarchy (v1
on a hybrid host, v2 on a pure one), as root, each step with a kill cgroup
made as the watchdog makes it. Tests of cgroups that only v1 limits create
and remove are marked `v1_only`. The v2 tests at the end drive the v2 code
path against a fake cgroup2 directory, because a hybrid host binds memory
and pids to v1 and cannot show it for real.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import signal
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from haios.errors import InputError, SandboxSetupError
from haios.sandbox import cglimits
from haios.sandbox.cglimits import (
    V1_BASE_NAME,
    ControllerSite,
    LimitBackend,
    LimitGroup,
    StepLimits,
    Unavailable,
    check_enforceable,
    detect,
    detect_from,
    parse_v1_mounts,
)
from haios.watchdog import cgroups
from tests.adversarial.test_step_bounds import (
    KillCgroups,
    forked,
    join,
    kill_cgroup_of,
    new_run_id,
    read_report,
)

MIB = 1024 * 1024

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
PURE_V2 = "30 25 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
READ_ONLY = "35 31 0:32 / /sys/fs/cgroup/memory ro,relatime - cgroup cgroup rw,memory\n"
CO_MOUNTED = "35 31 0:32 / /cg/mem\\040x rw - cgroup cgroup rw,cpu,memory,pids\n"
SUBTREE_FIRST = """\
50 1 0:32 /docker/abc /mnt/memsub rw - cgroup cgroup rw,memory
35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
"""
NAMED_ONLY = "40 31 0:37 / /x rw - cgroup cgroup rw,name=pids\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            HYBRID,
            {"memory": Path("/sys/fs/cgroup/memory"), "pids": Path("/sys/fs/cgroup/pids")},
        ),
        (PURE_V2, {}),
        (READ_ONLY, {}),
        (CO_MOUNTED, {"memory": Path("/cg/mem x"), "pids": Path("/cg/mem x")}),
        (SUBTREE_FIRST, {"memory": Path("/sys/fs/cgroup/memory")}),
        (NAMED_ONLY, {}),
        ("garbage\n", {}),
    ],
    ids=["hybrid", "pure_v2", "read_only", "co_mounted", "subtree_first", "named", "garbage"],
)
def test_parse_v1_mounts(text: str, expected: dict[str, Path]) -> None:
    assert parse_v1_mounts(text) == expected


def test_this_host_can_enforce_memory_and_pids() -> None:
    # A test host that cannot enforce the limits is misconfigured: fail, not skip.
    check_enforceable(memory=True, pids=True)
    backend = detect()
    assert isinstance(backend.memory, ControllerSite)
    assert isinstance(backend.pids, ControllerSite)


def test_hybrid_mount_table_uses_v1_when_the_unified_root_lacks_controllers(
    tmp_path: Path,
) -> None:
    (tmp_path / "cgroup.controllers").write_text("hugetlb\n")
    text = HYBRID.replace("/sys/fs/cgroup/unified", str(tmp_path))
    backend = detect_from(text)
    assert backend.memory == ControllerSite("memory", "v1", Path("/sys/fs/cgroup/memory"))
    assert backend.pids == ControllerSite("pids", "v1", Path("/sys/fs/cgroup/pids"))


def test_v2_root_listing_the_controllers_is_preferred(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("memory pids\n")
    text = HYBRID.replace("/sys/fs/cgroup/unified", str(tmp_path))
    backend = detect_from(text)
    assert backend.memory == ControllerSite("memory", "v2", tmp_path)
    assert backend.pids == ControllerSite("pids", "v2", tmp_path)


def test_v2_controller_that_cannot_be_enabled_is_unavailable(tmp_path: Path) -> None:
    # A plain file keeps what is written ("+memory"), so enabling never shows.
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    backend = detect_from(PURE_V2.replace("/sys/fs/cgroup", str(tmp_path)))
    assert isinstance(backend.memory, Unavailable)
    assert "cannot be enabled" in backend.memory.reason


def test_no_hierarchy_at_all_is_unavailable() -> None:
    backend = detect_from("22 1 0:21 / /proc rw - proc proc rw\n")
    assert isinstance(backend.memory, Unavailable)
    assert isinstance(backend.pids, Unavailable)


def test_require_names_every_missing_controller() -> None:
    backend = LimitBackend(Unavailable("memory", "no memory here"), Unavailable("pids", "nope"))
    with pytest.raises(SandboxSetupError, match=r"memory: no memory here; pids: nope") as info:
        backend.require(memory=True, pids=True)
    assert info.value.exit_code == 6
    pids = ControllerSite("pids", "v1", Path("/sys/fs/cgroup/pids"))
    partial = LimitBackend(Unavailable("memory", "gone"), pids)
    assert partial.require(memory=False, pids=True) == (pids,)
    with pytest.raises(SandboxSetupError, match="memory: gone"):
        partial.require(memory=True, pids=True)


def test_create_refuses_when_a_controller_is_unavailable() -> None:
    real = detect()
    backend = LimitBackend(real.memory, Unavailable("pids", "not mounted"))
    run_id = new_run_id()
    with pytest.raises(SandboxSetupError, match="pids: not mounted"):
        StepLimits.create(run_id, "s1", 64 * MIB, 16, backend=backend)
    assert isinstance(real.memory, ControllerSite)
    assert not (real.memory.mount / V1_BASE_NAME / run_id).exists()


def _v1_only() -> bool:
    backend = detect()
    return isinstance(backend.memory, ControllerSite) and backend.memory.version == "v1"


v1_only = pytest.mark.skipif(
    not _v1_only(), reason="about the cgroups v1 limits create and remove themselves"
)


@pytest.fixture
def make_limits() -> Iterator[Callable[..., StepLimits]]:
    made: list[StepLimits] = []
    kill_cgroups = KillCgroups()

    def make(
        run_id: str | None = None, step_id: str = "s1", memory: int = 64 * MIB, pids: int = 32
    ) -> StepLimits:
        run = run_id or new_run_id()
        kill_cgroup = kill_cgroups.step(run, step_id)
        limits = StepLimits.create(run, step_id, memory, pids, kill_cgroup=kill_cgroup)
        made.append(limits)
        return limits

    try:
        yield make
    finally:
        try:
            for limits in made:
                limits.remove()
        finally:
            kill_cgroups.remove()


def _read(path: Path) -> str:
    return path.read_text().strip()


def test_create_writes_the_limits_and_remove_leaves_nothing(
    make_limits: Callable[..., StepLimits],
) -> None:
    memory = 64 * MIB + 1000  # not a page multiple: the kernel rounds down
    limits = make_limits(memory=memory, pids=24)
    page_floor = str(memory // mmap.PAGESIZE * mmap.PAGESIZE)
    assert {c for g in limits.groups for c in g.controllers} == {"memory", "pids"}
    assert limits.procs_files == tuple(str(d / "cgroup.procs") for d in limits.directories)
    assert limits.directories == tuple(g.path for g in limits.groups if g.version == "v1")
    for group in limits.groups:
        st = os.lstat(group.path)
        assert stat.S_ISDIR(st.st_mode)
        assert st.st_uid == 0
        assert stat.S_IMODE(st.st_mode) == 0o755
        if group.version == "v1":
            assert group.path == group.mount / V1_BASE_NAME / limits.run_id / "s1"
        if group.version == "v1" and "memory" in group.controllers:
            assert _read(group.path / "memory.limit_in_bytes") == page_floor
            memsw = group.path / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                assert _read(memsw) == page_floor
            else:
                assert _read(group.path / "memory.swappiness") == "0"
        if group.version == "v2":
            assert group.path == kill_cgroup_of(limits)
            assert _read(group.path / "memory.max") == page_floor
        if "pids" in group.controllers:
            assert _read(group.path / "pids.max") == "24"
    assert limits.violations() == ()
    limits.remove()
    for directory in limits.directories:
        assert not directory.exists()
        assert not directory.parent.exists()
    assert kill_cgroup_of(limits).is_dir(), "the kill cgroup is the watchdog's to remove"
    limits.remove()  # idempotent


def test_joining_puts_the_child_in_every_limit_cgroup(
    make_limits: Callable[..., StepLimits],
) -> None:
    limits = make_limits()
    report_r, report_w = os.pipe()

    def child() -> int:
        os.close(report_r)
        join(limits)
        os.write(report_w, Path("/proc/self/cgroup").read_bytes())
        return 0

    try:
        with forked(child) as proc:
            os.close(report_w)
            lines = read_report(report_r).splitlines()
            assert proc.wait() == 0
    finally:
        os.close(report_r)
    # Joining the limit cgroups never takes the step out of its kill cgroup
    # (on v2 that cgroup holds the limits).
    kill_cgroup = kill_cgroup_of(limits)
    assert f"0::/{kill_cgroup.relative_to(cgroups.find_cgroup2_mount())}" in lines
    for group in limits.groups:
        expected = "/" + str(group.path.relative_to(group.mount))
        if group.version == "v2":
            assert group.path == kill_cgroup
        else:
            (controller,) = group.controllers
            matching = [
                line.split(":", 2)[2]
                for line in lines
                if controller in line.split(":", 2)[1].split(",")
            ]
            assert matching == [expected]
    assert limits.violations() == ()


def test_steps_of_one_run_share_the_run_cgroup_until_the_last_is_removed(
    make_limits: Callable[..., StepLimits],
) -> None:
    first = make_limits()
    second = make_limits(run_id=first.run_id, step_id="s2")
    first.remove()
    assert all(not d.exists() and d.parent.exists() for d in first.directories)
    second.remove()
    assert all(not d.parent.exists() for d in second.directories)


@pytest.mark.parametrize(
    ("run_id", "step_id"),
    [
        ("../x", "s1"),
        (".", "s1"),
        ("", "s1"),
        ("a/b", "s1"),
        ("-x", "s1"),
        ("r\u00e9", "s1"),
        ("r1", ".."),
        ("r1", "S1"),
        ("r1", "s/1"),
        ("r1", ""),
    ],
    ids=[
        "dotdot",
        "dot",
        "empty",
        "slash",
        "dash",
        "non_ascii",
        "step_dotdot",
        "step_upper",
        "step_slash",
        "step_empty",
    ],
)
def test_unsafe_ids_are_refused(run_id: str, step_id: str) -> None:
    with pytest.raises(InputError):
        StepLimits.create(run_id, step_id, 64 * MIB, 16)


@pytest.mark.parametrize(
    ("memory", "pids"),
    [(0, 16), (MIB - 1, 16), (-1, 16), (64 * MIB, 0), (64 * MIB, -5), (64 * MIB, 5_000_000)],
    ids=[
        "memory_zero",
        "memory_tiny",
        "memory_negative",
        "pids_zero",
        "pids_negative",
        "pids_huge",
    ],
)
def test_unusable_limits_are_refused(memory: int, pids: int) -> None:
    run_id = new_run_id()
    with pytest.raises(SandboxSetupError):
        StepLimits.create(run_id, "s1", memory, pids)


@pytest.mark.skipif(not _v1_only(), reason="v1 cgroups have dot-less interface files")
@pytest.mark.parametrize(("run_id", "step_id"), [("tasks", "s1"), (None, "notify_on_release")])
def test_a_name_that_is_an_interface_file_is_refused(run_id: str | None, step_id: str) -> None:
    run = run_id or new_run_id()
    with pytest.raises(SandboxSetupError, match="not a cgroup directory"):
        StepLimits.create(run, step_id, 64 * MIB, 16)
    backend = detect()
    assert isinstance(backend.memory, ControllerSite)
    assert isinstance(backend.pids, ControllerSite)
    for site in (backend.memory, backend.pids):
        entry = site.mount / V1_BASE_NAME / run
        if run_id == "tasks":
            assert entry.is_file()  # the interface file, untouched
        else:
            assert not entry.exists()  # the run cgroup made for the refused step is pruned


def test_an_empty_leftover_step_cgroup_is_replaced(
    make_limits: Callable[..., StepLimits],
) -> None:
    crashed = make_limits(pids=20)
    again = make_limits(run_id=crashed.run_id, pids=30)
    assert again.directories == crashed.directories
    for group in again.groups:
        if "pids" in group.controllers:
            assert _read(group.path / "pids.max") == "30"


@v1_only
def test_a_leftover_step_cgroup_with_a_process_is_refused(
    make_limits: Callable[..., StepLimits],
) -> None:
    crashed = make_limits()
    hold_r, hold_w = os.pipe()

    def straggler() -> int:
        os.close(hold_w)
        join(crashed)
        os.read(hold_r, 1)
        return 0

    try:
        with forked(straggler) as proc:
            os.close(hold_r)
            _wait_for_member(crashed, proc.pid)
            with pytest.raises(SandboxSetupError, match="left over"):
                StepLimits.create(crashed.run_id, "s1", 64 * MIB, 16)
            # Refused, not adopted or cleaned: the straggler is untouched.
            assert all(d.exists() for d in crashed.directories)
            os.close(hold_w)
            hold_w = -1
            assert proc.wait() == 0
    finally:
        if hold_w != -1:
            os.close(hold_w)


def _wait_for_member(limits: StepLimits, pid: int) -> None:
    for _ in range(500):
        if all(str(pid) in Path(f).read_text().split() for f in limits.procs_files):
            return
        time.sleep(0.01)
    pytest.fail(f"{pid} never joined {limits.procs_files}")


@v1_only
def test_remove_kills_a_lingering_member(make_limits: Callable[..., StepLimits]) -> None:
    limits = make_limits()

    def lingerer() -> int:
        join(limits)
        signal.pause()
        return 0

    with forked(lingerer) as proc:
        _wait_for_member(limits, proc.pid)
        limits.remove()
        status = proc.wait()
    assert os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == signal.SIGKILL
    assert all(not d.exists() for d in limits.directories)


@v1_only
def test_remove_gives_up_on_a_cgroup_it_cannot_empty(
    make_limits: Callable[..., StepLimits],
) -> None:
    limits = make_limits()
    nested = limits.directories[0] / "nested"
    os.mkdir(nested)
    try:
        with pytest.raises(SandboxSetupError, match="still has members or child cgroups"):
            limits.remove(timeout_seconds=0.05)
    finally:
        os.rmdir(nested)
    limits.remove()
    assert all(not d.exists() for d in limits.directories)


@v1_only
def test_violations_of_removed_cgroups_are_an_error_not_none(
    make_limits: Callable[..., StepLimits],
) -> None:
    limits = make_limits()
    limits.remove()
    with pytest.raises(SandboxSetupError, match="cannot read"):
        limits.violations()


# -- the v2 code path, against a fake cgroup2 directory ---------------------------

V2_FILES = {
    "cgroup.procs": "",
    "cgroup.controllers": "memory pids\n",
    "cgroup.subtree_control": "",
    "memory.max": "",  # plain files are not truncated: start the written ones empty
    "memory.swap.max": "",
    "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n",
    "pids.max": "",
    "pids.events": "max 0\n",
}
ENABLE_BOTH = "+memory +pids"


def _fake_cgroup(path: Path) -> Path:
    """A directory with a v2 cgroup's interface files, root-owned, mode 0755."""
    path.mkdir()
    path.chmod(0o755)
    for name, text in V2_FILES.items():
        (path / name).write_text(text)
    return path


@dataclasses.dataclass
class FakeV2:
    """A fake cgroup2 mount holding the watchdog's tree for run "run1".

    `writes` records every interface-file write in order. Writes to
    `cgroup.subtree_control` act as the kernel's do (each "+c" adds c to
    what the file lists) and are refused, as the kernel refuses them with
    EBUSY, in the directories of `busy`.
    """

    root: Path
    run: Path
    kill: Path
    elsewhere: Path
    writes: list[tuple[Path, str]]
    busy: set[Path]

    def backend(self) -> LimitBackend:
        return LimitBackend(
            ControllerSite("memory", "v2", self.root), ControllerSite("pids", "v2", self.root)
        )

    def subtree_writes(self) -> list[tuple[Path, str]]:
        return [(p.parent, v) for p, v in self.writes if p.name == "cgroup.subtree_control"]


@pytest.fixture
def fake_v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeV2:
    root = _fake_cgroup(tmp_path / "cg2")
    run = _fake_cgroup(_fake_cgroup(root / "haios") / "haios-run1")
    fake = FakeV2(
        root=root,
        run=run,
        kill=_fake_cgroup(run / "step-s1"),
        elsewhere=_fake_cgroup(tmp_path / "elsewhere"),
        writes=[],
        busy=set(),
    )
    real_write = cglimits._write

    def kernel_write(path: Path, value: str) -> None:
        fake.writes.append((path, value))
        if path.name != "cgroup.subtree_control":
            real_write(path, value)
            return
        if path.parent in fake.busy:
            raise SandboxSetupError(f"cannot write {value!r} to {path}: Device or resource busy")
        enabled = path.read_text().split()
        enabled += [w[1:] for w in value.split() if w.startswith("+") and w[1:] not in enabled]
        path.write_text(" ".join(enabled) + "\n")

    monkeypatch.setattr(cglimits, "_write", kernel_write)
    return fake


def test_v2_limits_are_written_into_the_kill_cgroup(fake_v2: FakeV2) -> None:
    limits = StepLimits.create(
        "run1", "s1", 64 * MIB, 16, backend=fake_v2.backend(), kill_cgroup=fake_v2.kill
    )
    # Enabled top-down in every ancestor, never in the kill cgroup itself.
    assert fake_v2.subtree_writes() == [
        (fake_v2.root, ENABLE_BOTH),
        (fake_v2.root / "haios", ENABLE_BOTH),
        (fake_v2.run, ENABLE_BOTH),
    ]
    for directory in (fake_v2.root, fake_v2.root / "haios", fake_v2.run):
        assert _read(directory / "cgroup.subtree_control") == "memory pids"
    assert _read(fake_v2.kill / "cgroup.subtree_control") == ""
    assert _read(fake_v2.kill / "memory.max") == str(64 * MIB)
    assert _read(fake_v2.kill / "memory.swap.max") == "0"
    assert _read(fake_v2.kill / "pids.max") == "16"
    assert limits.groups == (LimitGroup("v2", ("memory", "pids"), fake_v2.root, fake_v2.kill),)
    # The init joins the kill cgroup anyway: there is nothing else to join.
    assert limits.directories == ()
    assert limits.procs_files == ()
    assert sorted(p.name for p in fake_v2.root.iterdir() if p.is_dir()) == ["haios"]


def test_v2_violations_are_read_from_the_kill_cgroup(fake_v2: FakeV2) -> None:
    limits = StepLimits.create(
        "run1", "s1", 64 * MIB, 16, backend=fake_v2.backend(), kill_cgroup=fake_v2.kill
    )
    assert limits.violations() == ()
    (fake_v2.kill / "memory.events").write_text("max 3\noom 1\noom_kill 1\n")
    (fake_v2.kill / "pids.events").write_text("max 7\n")
    assert limits.violations() == ("memory", "processes")
    (fake_v2.kill / "memory.events").write_text("max 9\noom 0\noom_kill 0\n")
    assert limits.violations() == ("processes",), "reaching memory.max is not a kill"


def test_v2_remove_leaves_the_kill_cgroup_to_the_watchdog(fake_v2: FakeV2) -> None:
    limits = StepLimits.create(
        "run1", "s1", 64 * MIB, 16, backend=fake_v2.backend(), kill_cgroup=fake_v2.kill
    )
    limits.remove()
    limits.remove()
    assert fake_v2.kill.is_dir()
    assert _read(fake_v2.kill / "pids.max") == "16"
    assert fake_v2.run.is_dir()
    assert limits.violations() == ()  # its counters are still there to read


def test_v2_second_step_of_a_run_enables_nothing_again(fake_v2: FakeV2) -> None:
    second = _fake_cgroup(fake_v2.run / "step-s2")
    backend = fake_v2.backend()
    StepLimits.create("run1", "s1", 64 * MIB, 16, backend=backend, kill_cgroup=fake_v2.kill)
    fake_v2.writes.clear()
    StepLimits.create("run1", "s2", 32 * MIB, 8, backend=backend, kill_cgroup=second)
    assert fake_v2.subtree_writes() == []
    assert _read(second / "pids.max") == "8"


def test_v2_limits_without_a_kill_cgroup_are_refused(fake_v2: FakeV2) -> None:
    # A separate v2 limit cgroup would move the step out of its kill cgroup.
    with pytest.raises(SandboxSetupError, match="need the step's kill cgroup") as info:
        StepLimits.create("run1", "s1", 64 * MIB, 16, backend=fake_v2.backend())
    assert info.value.exit_code == 6
    assert fake_v2.writes == []
    assert sorted(p.name for p in fake_v2.root.iterdir() if p.is_dir()) == ["haios"]


def _symlinked_step(fake: FakeV2) -> Path:
    link = fake.run / "step-s9"
    link.symlink_to(fake.elsewhere)
    return link


def _symlinked_run(fake: FakeV2) -> Path:
    run = fake.root / "haios" / "haios-run9"
    run.symlink_to(fake.elsewhere.parent)
    return run / "elsewhere"


def _group_writable(fake: FakeV2) -> Path:
    fake.kill.chmod(0o775)
    return fake.kill


def _not_root_owned(fake: FakeV2) -> Path:
    os.chown(fake.kill, 65534, 65534)
    return fake.kill


def _a_file(fake: FakeV2) -> Path:
    return fake.kill / "pids.max"


NOT_BELOW = "is not below the cgroup2 mount"
SYMLINK = "is a symbolic link"
NOT_ROOT = "not root with mode 0755"


@pytest.mark.parametrize(
    ("kill_cgroup", "message"),
    [
        (lambda fake: fake.elsewhere, NOT_BELOW),
        (lambda fake: fake.root, NOT_BELOW),
        (lambda fake: fake.root / "haios" / ".." / ".." / "elsewhere", NOT_BELOW),
        (lambda fake: Path("haios/haios-run1/step-s1"), NOT_BELOW),
        (lambda fake: fake.run / "step-gone", "No such file"),
        (_symlinked_step, SYMLINK),
        (_symlinked_run, SYMLINK),
        (_group_writable, NOT_ROOT),
        (_not_root_owned, NOT_ROOT),
        (_a_file, "not a cgroup directory"),
    ],
    ids=[
        "outside_the_mount",
        "the_mount_itself",
        "dotdot",
        "relative",
        "missing",
        "symlink",
        "symlinked_ancestor",
        "group_writable",
        "not_root_owned",
        "a_file",
    ],
)
def test_v2_kill_cgroup_that_is_not_a_cgroup_below_the_mount_is_refused(
    fake_v2: FakeV2, kill_cgroup: Callable[[FakeV2], Path], message: str
) -> None:
    with pytest.raises(SandboxSetupError, match=message):
        StepLimits.create(
            "run1", "s1", 64 * MIB, 16, backend=fake_v2.backend(), kill_cgroup=kill_cgroup(fake_v2)
        )
    # Refused before any controller is enabled or any limit written.
    assert fake_v2.writes == []
    assert _read(fake_v2.elsewhere / "pids.max") == ""


def test_v2_ancestor_holding_processes_is_refused(fake_v2: FakeV2) -> None:
    fake_v2.busy.add(fake_v2.run)
    with pytest.raises(SandboxSetupError, match="busy"):
        StepLimits.create(
            "run1", "s1", 64 * MIB, 16, backend=fake_v2.backend(), kill_cgroup=fake_v2.kill
        )
    assert _read(fake_v2.kill / "memory.max") == ""
    assert _read(fake_v2.kill / "pids.max") == ""


@v1_only
def test_v1_memory_with_v2_pids_limits_pids_on_the_kill_cgroup(fake_v2: FakeV2) -> None:
    real = detect()
    assert isinstance(real.memory, ControllerSite)
    backend = LimitBackend(real.memory, ControllerSite("pids", "v2", fake_v2.root))
    run_id = new_run_id()
    limits = StepLimits.create(
        run_id, "s1", 64 * MIB, 16, backend=backend, kill_cgroup=fake_v2.kill
    )
    own = real.memory.mount / V1_BASE_NAME / run_id / "s1"
    try:
        assert limits.groups == (
            LimitGroup("v1", ("memory",), real.memory.mount, own),
            LimitGroup("v2", ("pids",), fake_v2.root, fake_v2.kill),
        )
        assert limits.directories == (own,)
        assert fake_v2.subtree_writes() == [
            (fake_v2.root, "+pids"),
            (fake_v2.root / "haios", "+pids"),
            (fake_v2.run, "+pids"),
        ]
        assert _read(fake_v2.kill / "pids.max") == "16"
        assert _read(fake_v2.kill / "memory.max") == ""
        assert limits.violations() == ()
    finally:
        limits.remove()
    assert not own.exists()
    assert not own.parent.exists()
    assert fake_v2.kill.is_dir()


@v1_only
def test_v2_failure_removes_the_v1_cgroups_made_before_it(fake_v2: FakeV2) -> None:
    real = detect()
    assert isinstance(real.memory, ControllerSite)
    backend = LimitBackend(real.memory, ControllerSite("pids", "v2", fake_v2.root))
    fake_v2.busy.add(fake_v2.root / "haios")
    run_id = new_run_id()
    with pytest.raises(SandboxSetupError, match="busy"):
        StepLimits.create(run_id, "s1", 64 * MIB, 16, backend=backend, kill_cgroup=fake_v2.kill)
    assert not (real.memory.mount / V1_BASE_NAME / run_id).exists()
    assert fake_v2.kill.is_dir()


@v1_only
def test_v1_ignores_the_kill_cgroup(tmp_path: Path) -> None:
    # The kill cgroup is joined on its own hierarchy: nothing of it is checked or written.
    not_a_cgroup = tmp_path / "not-a-cgroup"
    limits = StepLimits.create(new_run_id(), "s1", 64 * MIB, 16, kill_cgroup=not_a_cgroup)
    try:
        assert {g.version for g in limits.groups} == {"v1"}
        assert len(limits.directories) == 2
        assert not not_a_cgroup.exists()
    finally:
        limits.remove()


def test_cglimits_exports_are_importable() -> None:
    for name in cglimits.__all__:
        assert hasattr(cglimits, name), name
