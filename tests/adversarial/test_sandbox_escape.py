# SPDX-License-Identifier: Apache-2.0
"""Escape attempts from inside a step under the `default` profile.

Threats T-S02 (filesystem view), T-S03 (namespaces), T-S04 (network),
T-S05 (other processes), T-S06 (kernel attack surface), T-S07 (terminal
injection) of threat_model/sandbox.md. The attacker controls the step's
code (a hostile `run`). Each probe tries the escape from inside the sandbox
and writes what it observed to its workspace; the refusal expected is the
profile's errno (EPERM, ENOSYS for clone3, EAFNOSUPPORT for socket families),
ENOENT for paths outside the view, or EROFS for writes to read-only places.
A reachable call would return EFAULT/EBADF/EINVAL instead (attack catalog
TRY technique).
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from pathlib import Path

import pytest

from haios.sandbox.profile import load_profile
from haios.sandbox.runner import NamespaceRunner
from tests.support.sandbox import (
    POLICY_DIR,
    ProbeRun,
    cost_path,
    host_network_profile_text,
    run_python_probe,
    workspace_path,
    write_profile,
)

CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000
SIGCHLD = 17
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
READ_IMPLIES_EXEC = 0x0400000
ADDR_NO_RANDOMIZE = 0x0040000

#: (probe name, x86_64 number, arguments): each must be refused with EPERM.
REFUSED_SYSCALLS = [
    ("ptrace_attach_init", 101, (16, 1, 0, 0)),
    ("process_vm_readv", 310, (1, 0, 0, 0, 0, 0)),
    ("process_vm_writev", 311, (1, 0, 0, 0, 0, 0)),
    ("pidfd_getfd", 438, (-1, 0, 0)),
    ("kcmp", 312, (1, 1, 0, 0, 0)),
    ("mount", 165, (0, 0, 0, 0, 0)),
    ("umount2", 166, (0, 0)),
    ("pivot_root", 155, (0, 0)),
    ("chroot", 161, (0,)),
    ("open_tree", 428, (-1, 0, 0)),
    ("move_mount", 429, (-1, 0, -1, 0, 0)),
    ("fsopen", 430, (0, 0)),
    ("fsconfig", 431, (-1, 0, 0, 0, 0)),
    ("fsmount", 432, (-1, 0, 0)),
    ("fspick", 433, (-1, 0, 0)),
    ("mount_setattr", 442, (-1, 0, 0, 0, 0)),
    ("unshare_user", 272, (CLONE_NEWUSER,)),
    ("unshare_mount", 272, (CLONE_NEWNS,)),
    ("setns", 308, (-1, 0)),
    ("clone_newuser", 56, (CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)),
    ("clone_newns", 56, (CLONE_NEWNS | SIGCHLD, 0, 0, 0, 0)),
    ("bpf", 321, (0, 0, 0)),
    ("perf_event_open", 298, (0, 0, -1, -1, 0)),
    ("userfaultfd", 323, (0,)),
    ("keyctl", 250, (0, 0, 0, 0, 0)),
    ("add_key", 248, (0, 0, 0, 0, 0)),
    ("request_key", 249, (0, 0, 0, 0)),
    ("kexec_load", 246, (0, 0, 0, 0)),
    ("kexec_file_load", 320, (-1, -1, 0, 0, 0)),
    ("init_module", 175, (0, 0, 0)),
    ("finit_module", 313, (-1, 0, 0)),
    ("delete_module", 176, (0, 0)),
    ("open_by_handle_at", 304, (-1, 0, 0)),
    ("name_to_handle_at", 303, (-1, 0, 0, 0, 0)),
    ("io_uring_setup", 425, (1, 0)),
    ("io_uring_enter", 426, (-1, 0, 0, 0, 0, 0)),
    ("io_uring_register", 427, (-1, 0, 0, 0)),
    ("setuid_root", 105, (0,)),
    ("setgid_root", 106, (0,)),
    ("setresuid_root", 117, (0, 0, 0)),
    ("setgroups", 116, (0, 0)),
    ("capset", 126, (0, 0)),
    ("swapon", 167, (0, 0)),
    ("reboot", 169, (0, 0, 0, 0)),
    ("acct", 163, (0,)),
    ("quotactl", 179, (0, 0, 0, 0)),
    ("syslog", 103, (0, 0, 0)),
    ("vhangup", 153, ()),
    ("iopl", 172, (3,)),
    ("ioperm", 173, (0, 1, 1)),
    ("modify_ldt", 154, (0, 0, 0)),
    ("settimeofday", 164, (0, 0)),
    ("clock_settime", 227, (0, 0)),
    ("sethostname", 170, (0, 0)),
    ("personality_read_implies_exec", 135, (READ_IMPLIES_EXEC,)),
    ("personality_addr_no_randomize", 135, (ADDR_NO_RANDOMIZE,)),
    ("personality_high_bits", 135, ((1 << 32) | READ_IMPLIES_EXEC,)),
    ("tiocsti_stdin", 16, (0, TIOCSTI, 0)),
    ("tiocsti_high_bits", 16, (0, (0x123 << 32) | TIOCSTI, 0)),
    ("tiocsti_stdout", 16, (1, TIOCSTI, 0)),
    ("tioclinux", 16, (0, TIOCLINUX, 0)),
]


@pytest.fixture(scope="module")
def syscall_probe(tmp_path_factory: pytest.TempPathFactory) -> ProbeRun:
    """One step that tries every refused call and records each errno."""
    lines = [
        f"record({name!r}, lambda: try_syscall({nr}, *{args!r}))"
        for name, nr, args in REFUSED_SYSCALLS
    ]
    body = "\n".join(
        [
            *lines,
            "record('clone3', lambda: try_syscall(435, 0, 0))",
            "record('personality_query', lambda: try_syscall(135, 0xFFFFFFFF))",
            "record('ioctl_tcgets_allowed', lambda: try_syscall(16, 0, 0x5401, 0))",
            "record('socket_netlink', lambda: try_syscall(41, 16, 3, 0))",
            "record('socket_packet', lambda: try_syscall(41, 17, 3, 0))",
            "record('socket_vsock', lambda: try_syscall(41, 40, 1, 0))",
            "record('socket_alg', lambda: try_syscall(41, 38, 5, 0))",
            "record('socket_bluetooth', lambda: try_syscall(41, 31, 1, 0))",
            "save()",
        ]
    )
    return run_python_probe(NamespaceRunner(), tmp_path_factory.mktemp("syscalls"), body)


def test_syscall_probe_ran_to_completion(syscall_probe: ProbeRun) -> None:
    assert syscall_probe.outcome.exit_code == 0, syscall_probe.stderr
    assert syscall_probe.outcome.violation is None


@pytest.mark.parametrize("name", [name for name, _nr, _args in REFUSED_SYSCALLS])
def test_escape_syscall_is_refused_with_eperm(syscall_probe: ProbeRun, name: str) -> None:
    assert syscall_probe.results[name] == errno.EPERM


def test_clone3_returns_enosys_so_glibc_falls_back(syscall_probe: ProbeRun) -> None:
    assert syscall_probe.results["clone3"] == errno.ENOSYS


def test_personality_query_still_works(syscall_probe: ProbeRun) -> None:
    assert syscall_probe.results["personality_query"] == 0


def test_harmless_ioctl_is_reachable(syscall_probe: ProbeRun) -> None:
    # TCGETS on /dev/null reaches the kernel, which answers ENOTTY.
    assert syscall_probe.results["ioctl_tcgets_allowed"] == errno.ENOTTY


@pytest.mark.parametrize("family", ["netlink", "packet", "vsock", "alg", "bluetooth"])
def test_dangerous_socket_families_are_refused(syscall_probe: ProbeRun, family: str) -> None:
    assert syscall_probe.results[f"socket_{family}"] == errno.EAFNOSUPPORT


# -- filesystem view (T-S02) ---------------------------------------------------


@pytest.fixture(scope="module")
def view_probe(tmp_path_factory: pytest.TempPathFactory) -> tuple[ProbeRun, dict[str, Path]]:
    """One step that looks for host paths it must not see and writes where it must not."""
    base = tmp_path_factory.mktemp("view")
    secrets = {
        "engine_key": base / "engine" / "engine.pem",
        "os_root": base / "os_root",
        "other_workspace": base / "other-step" / "work",
        "policy_dir": POLICY_DIR,
    }
    secrets["engine_key"].parent.mkdir()
    secrets["engine_key"].write_text("-----BEGIN PRIVATE KEY-----\n")
    secrets["os_root"].mkdir()
    (secrets["os_root"] / "exec_plan.json").write_text("{}")
    secrets["other_workspace"].mkdir(parents=True)
    (secrets["other_workspace"] / "product.txt").write_text("other step's product")
    stat_lines = [
        f"record('stat_{key}', lambda: os.stat({str(path)!r}) and 0)"
        for key, path in secrets.items()
    ]
    body = "\n".join(
        [
            *stat_lines,
            "record('stat_other_product', lambda: os.stat("
            f"{str(secrets['other_workspace'] / 'product.txt')!r}) and 0)",
            *(
                f"record('stat_{name}', lambda: os.stat({path!r}) and 0)"
                for name, path in (
                    ("etc_shadow", "/etc/shadow"),
                    ("root_home", "/root"),
                    ("home", "/home"),
                    ("var", "/var"),
                    ("run", "/run"),
                    ("sys", "/sys"),
                    ("proc_sys", "/proc/sys"),
                    ("proc_kcore", "/proc/kcore"),
                    ("sysrq_trigger", "/proc/sysrq-trigger"),
                    ("dev_tty", "/dev/tty"),
                    ("dev_mem", "/dev/mem"),
                    ("docker_sock", "/var/run/docker.sock"),
                    ("host_tmp_canary", str(base)),
                )
            ),
            "record('read_etc_shadow', lambda: open('/etc/shadow').read() and 0)",
            *(
                f"record('write_{name}', lambda: open({path!r}, 'w').write('x') and 0)"
                for name, path in (
                    ("usr", "/usr/haios-canary"),
                    ("etc", "/etc/haios-canary"),
                    ("root_dir", "/haios-canary"),
                    ("dev", "/dev/haios-canary"),
                    ("bin", "/bin/haios-canary"),
                    ("passwd", "/etc/passwd"),
                )
            ),
            "record('write_workspace', lambda: open('/haios/work/ok.txt', 'w').write('x') and 0)",
            "record('write_private_tmp', lambda: open('/tmp/ok.txt', 'w').write('x') and 0)",
            "record('write_cost_dir',"
            " lambda: open('/haios/cost/report.json', 'w').write('{}') and 0)",
            "record('mkdir_under_haios', lambda: os.mkdir('/haios/other'))",
            "results['root_entries'] = sorted(os.listdir('/'))",
            "results['proc_entries'] = sorted(os.listdir('/proc'))",
            "save()",
        ]
    )
    return run_python_probe(NamespaceRunner(), base, body), secrets


@pytest.mark.parametrize(
    "key", ["engine_key", "os_root", "other_workspace", "other_product", "policy_dir"]
)
def test_engine_paths_are_not_in_the_view(
    view_probe: tuple[ProbeRun, dict[str, Path]], key: str
) -> None:
    probe, _secrets = view_probe
    assert probe.results[f"stat_{key}"] == errno.ENOENT


@pytest.mark.parametrize(
    "name",
    [
        "etc_shadow",
        "root_home",
        "home",
        "var",
        "run",
        "sys",
        "proc_sys",
        "proc_kcore",
        "sysrq_trigger",
        "dev_tty",
        "dev_mem",
        "docker_sock",
        "host_tmp_canary",
    ],
)
def test_host_paths_are_not_in_the_view(
    view_probe: tuple[ProbeRun, dict[str, Path]], name: str
) -> None:
    probe, _secrets = view_probe
    assert probe.results[f"stat_{name}"] == errno.ENOENT


def test_etc_shadow_cannot_be_read(view_probe: tuple[ProbeRun, dict[str, Path]]) -> None:
    probe, _secrets = view_probe
    assert probe.results["read_etc_shadow"] == errno.ENOENT


@pytest.mark.parametrize("name", ["usr", "etc", "root_dir", "dev", "bin", "passwd"])
def test_writes_outside_the_workspace_fail(
    view_probe: tuple[ProbeRun, dict[str, Path]], name: str
) -> None:
    probe, _secrets = view_probe
    assert probe.results[f"write_{name}"] == errno.EROFS


def test_nothing_was_written_on_the_host(view_probe: tuple[ProbeRun, dict[str, Path]]) -> None:
    for path in ("/usr/haios-canary", "/etc/haios-canary", "/haios-canary", "/bin/haios-canary"):
        assert not Path(path).exists()


def test_workspace_cost_dir_and_private_tmp_are_writable(
    view_probe: tuple[ProbeRun, dict[str, Path]],
) -> None:
    probe, _secrets = view_probe
    assert probe.results["write_workspace"] == 0
    assert probe.results["write_private_tmp"] == 0
    assert probe.results["write_cost_dir"] == 0
    assert (workspace_path(probe.spec) / "ok.txt").read_text() == "x"
    assert (cost_path(probe.spec) / "report.json").read_text() == "{}"
    assert probe.results["mkdir_under_haios"] == errno.EROFS


def test_the_view_holds_only_profile_paths(view_probe: tuple[ProbeRun, dict[str, Path]]) -> None:
    probe, _secrets = view_probe
    assert probe.results["root_entries"] == [
        "bin",
        "dev",
        "etc",
        "haios",
        "lib",
        "lib64",
        "proc",
        "sbin",
        "tmp",
        "usr",
    ]


def test_proc_shows_only_the_steps_own_processes(
    view_probe: tuple[ProbeRun, dict[str, Path]],
) -> None:
    probe, _secrets = view_probe
    # subset=pid hides /proc/sys, /proc/kcore...; hidepid=invisible hides the
    # init (non-dumpable); the engine's processes are in another namespace.
    assert probe.results["proc_entries"] == ["2", "self", "thread-self"]


# -- processes and signals (T-S05) ---------------------------------------------


def test_engine_process_cannot_be_signalled(tmp_path: Path) -> None:
    engine_pid = os.getpid()
    body = "\n".join(
        [
            f"record('kill_engine', lambda: os.kill({engine_pid}, 0))",
            f"record('kill_engine_sigkill', lambda: os.kill({engine_pid}, 9))",
            "record('kill_init', lambda: os.kill(1, 9))",
            "results['parent'] = os.getppid()",
            "save()",
        ]
    )
    probe = run_python_probe(NamespaceRunner(), tmp_path, body)
    assert probe.outcome.exit_code == 0, probe.stderr
    # The engine's pid does not exist in the step's PID namespace.
    assert probe.results["kill_engine"] == errno.ESRCH
    assert probe.results["kill_engine_sigkill"] == errno.ESRCH
    # SIGKILL to the namespace init from inside is dropped by the kernel:
    # the probe went on to save its results and exit normally.
    assert probe.results["parent"] == 1


# -- network (T-S04) -----------------------------------------------------------


def _listener() -> tuple[socket.socket, list[bytes]]:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(15)
    received: list[bytes] = []

    def accept() -> None:
        try:
            conn, _addr = server.accept()
        except OSError:
            return
        with conn:
            received.append(conn.recv(16))

    threading.Thread(target=accept, daemon=True).start()
    return server, received


def _connect_body(port: int) -> str:
    return "\n".join(
        [
            "import socket",
            "def connect():",
            "    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)",
            "    s.settimeout(5)",
            f"    s.connect(('127.0.0.1', {port}))",
            "    s.sendall(b'hello')",
            "    s.close()",
            "record('connect', connect)",
            "record('unix_socket', lambda: socket.socket(socket.AF_UNIX).close())",
            "save()",
        ]
    )


def test_default_profile_cannot_reach_a_local_listener(tmp_path: Path) -> None:
    server, received = _listener()
    with server:
        probe = run_python_probe(
            NamespaceRunner(), tmp_path, _connect_body(server.getsockname()[1])
        )
    assert probe.outcome.exit_code == 0, probe.stderr
    assert probe.results["connect"] in (errno.ENETUNREACH, errno.ECONNREFUSED)
    assert received == []


def test_network_profile_without_its_forwarder_reaches_nothing(tmp_path: Path) -> None:
    # The `network` profile no longer shares the host's network (ADR 0004):
    # a step reaches only the endpoints its forwarder serves, here none.
    server, received = _listener()
    with server:
        probe = run_python_probe(
            NamespaceRunner(), tmp_path, _connect_body(server.getsockname()[1]), profile="network"
        )
    assert probe.outcome.exit_code == 0, probe.stderr
    assert probe.results["connect"] == errno.ENETUNREACH
    assert received == []
    # Abstract unix names are private to the step's own network namespace.
    assert probe.results["unix_socket"] == 0


def test_unsafe_host_network_reaches_a_local_listener(tmp_path: Path) -> None:
    # The explicit, documented-unsafe operator setting no shipped profile uses.
    (tmp_path / "policy").mkdir()
    profile = load_profile(write_profile(tmp_path / "policy", host_network_profile_text()), "test")
    server, received = _listener()
    with server:
        probe = run_python_probe(
            NamespaceRunner(), tmp_path, _connect_body(server.getsockname()[1]), profile=profile
        )
        for _ in range(100):
            if received:
                break
            threading.Event().wait(0.05)
    assert probe.outcome.exit_code == 0, probe.stderr
    assert probe.results["connect"] == 0
    assert received == [b"hello"]
    # Host abstract unix names are reachable from the host network namespace:
    # the lint makes such a profile refuse AF_UNIX.
    assert probe.results["unix_socket"] == errno.EPERM
