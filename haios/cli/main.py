# SPDX-License-Identifier: Apache-2.0
"""`haios run` and `haios state` (contract section 2).

Exit codes are the contract's: 2 usage, 3 rejected, 4 killed, 5 budget,
6 environment, 7 busy, 70 internal. Codes 2, 3 and 6 mean nothing ran.
Diagnostics go to stderr as one line; no traceback reaches a user. This
is the only place with a broad `except`, and it maps to exit 70.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from haios import __version__
from haios._util.strict_json import printable
from haios.errors import EXIT_INTERNAL, EXIT_USAGE, HaiosError

if TYPE_CHECKING:
    from haios.sandbox.launcher import PendingLauncher
    from haios.watchdog.client import PendingWatchdog

EXIT_CODES_HELP = """\b
Exit codes:
  0  plan succeeded / state read and verified
  1  a step failed or timed out; the plan halted
  2  usage error
  3  rejected: contract violation; no step ran
  4  killed by a kill switch, or refused to start while one is set
  5  budget exhausted; the plan halted
  6  environment unavailable (policy, Vault, sandbox, engine key); no step ran
  7  os_root busy: another haios run holds its lock
  70 internal error
"""


# True while `main` holds cyclic garbage collection paused for the engine's import.
_collection_paused = False


def _pause_collection() -> None:
    """Pause cyclic garbage collection until the engine is imported (`main` only).

    Importing the engine makes some 60,000 long-lived objects (modules,
    classes, pydantic validators) and next to no garbage: collecting while
    importing finds nothing to free (about 50 ms here), and neither does
    traversing them again in each later full collection and at exit (about
    100 ms at exit alone).
    """
    global _collection_paused
    if gc.isenabled():
        gc.disable()
        _collection_paused = True


def _resume_collection(*, freeze: bool) -> None:
    """Resume collection if `main` paused it; `freeze` keeps later collections
    off what is alive now (collected objects then are only the run's own)."""
    global _collection_paused
    if _collection_paused:
        _collection_paused = False
        if freeze:
            gc.freeze()
        gc.enable()


def _fail(exc: BaseException, *, command: str, as_json: bool = False,
          os_root: Path | None = None, policy_dir: Path | None = None) -> NoReturn:
    if isinstance(exc, HaiosError):
        # Messages can carry os_root names: never raw control characters.
        message, code = f"{type(exc).__name__}: {printable(str(exc))}", exc.exit_code
        reason, error_class = exc.reason, type(exc).__name__
    else:
        # An unexpected exception's text may hold anything: only its class is shown.
        message, code = f"internal error: {type(exc).__name__}", EXIT_INTERNAL
        reason, error_class = "internal", type(exc).__name__
    click.echo(f"haios: {message}", err=True)
    if as_json:
        # Refusals are runs too (ADR 0005): one object on stdout, whatever the code.
        state = _verified_state(os_root, policy_dir) if os_root is not None else None
        _echo_result(command=command, exit_code=code, reason=reason, error_class=error_class,
                     message=message, state=state)
    sys.exit(code)


def _verified_state(os_root: Path, policy_dir: Path | None) -> dict[str, Any] | None:
    """The os_root's state after a refusal, when it verifies; else None.

    Side Effects:
        Reads the policy folder and os_root (never writes).
    """
    from haios.app import state_command

    try:
        return state_command(os_root, policy_dir, dict(os.environ))
    except Exception:  # no verified state is an answer (null), not a second failure
        return None


def _echo_result(*, command: str | None, exit_code: int, reason: str,
                 error_class: str | None, message: str,
                 state: dict[str, Any] | None) -> None:
    from haios.cli.render import render_json, result_document

    try:
        document = result_document(command=command, exit_code=exit_code, reason=reason,
                                   error_class=error_class, message=message, state=state)
    except ValueError:
        # A state that does not fit RunState must not cost the client its object.
        document = result_document(command=command, exit_code=exit_code, reason=reason,
                                   error_class=error_class, message=message, state=None)
    click.echo(render_json(document))


def _metrics_addr(_ctx: click.Context, _param: click.Parameter, value: str | None
                  ) -> tuple[str, int] | None:
    if value is None:
        return None
    from haios.metrics import parse_metrics_addr

    try:
        return parse_metrics_addr(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.group(epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="haios")
def cli() -> None:
    """haios: verify a signed plan and its attested inputs, then run it sandboxed."""


def _spawn_helpers(spawned: contextlib.ExitStack
                   ) -> tuple[PendingWatchdog | None, PendingLauncher | None]:
    """Spawn the watchdog and the sandbox launcher before the engine is imported.

    Their interpreters start while the engine imports and verifies; neither
    takes anything of the run before the run reaches it (the watchdog's
    config, the launcher's first step), so the refusal order is unchanged.
    The run takes over what it uses; `spawned` kills and reaps the rest when
    `run` ends, so a refused run leaves no process behind. A spawn that fails
    here is left to the run, which spawns where it needs the process and
    refuses there (exit 6 after busy, kill switch and admission).
    """
    from haios.sandbox.launcher import PendingLauncher
    from haios.watchdog.client import PendingWatchdog

    watchdog: PendingWatchdog | None = None
    launcher: PendingLauncher | None = None
    with contextlib.suppress(OSError):
        watchdog = PendingWatchdog.spawn()
        spawned.callback(watchdog.discard)
    with contextlib.suppress(HaiosError):
        # Here, on the main thread: the launcher's parent-death signal follows it.
        launcher = PendingLauncher.spawn()
        spawned.callback(launcher.discard)
    return watchdog, launcher


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("os_root", type=click.Path(path_type=Path, file_okay=False))
@click.option("--policy", "policy_dir", type=click.Path(path_type=Path),
              help="Policy folder (default: $HAIOS_POLICY, then /etc/haios/policy).")
@click.option("--jobs", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Independent steps run concurrently; results do not depend on it.")
@click.option("--metrics-addr", callback=_metrics_addr,
              help="Serve Prometheus metrics at HOST:PORT/metrics during the run.")
@click.option("--json", "as_json", is_flag=True, help="Print the final state as one JSON object.")
def run(os_root: Path, policy_dir: Path | None, jobs: int,
        metrics_addr: tuple[str, int] | None, as_json: bool) -> None:
    """Verify OS_ROOT against the policy and run its plan.

    Progress goes to stderr: a live display on a terminal, one timestamped
    line per event otherwise. stdout carries only the result.
    """
    try:
        with contextlib.ExitStack() as spawned:
            watchdog, launcher = _spawn_helpers(spawned)
            from haios.app import run_command

            _resume_collection(freeze=True)
            code, document, message = run_command(
                os_root, policy_dir, dict(os.environ), jobs=jobs, metrics_addr=metrics_addr,
                watchdog=watchdog, launcher=launcher)
    except Exception as exc:  # the one broad catch: map to the contract's codes
        _fail(exc, command="run", as_json=as_json, os_root=os_root, policy_dir=policy_dir)
    if document is None and as_json:
        # A run that ended without a state document still prints its one object.
        click.echo(f"haios: {message}", err=True)
        _echo_result(command="run", exit_code=code, reason=_reason_for(code),
                     error_class=None, message=printable(message), state=None)
        sys.exit(code)
    _print(document, as_json, message, code)
    sys.exit(code)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("os_root", type=click.Path(path_type=Path, file_okay=False))
@click.option("--policy", "policy_dir", type=click.Path(path_type=Path),
              help="Policy folder (default: $HAIOS_POLICY, then /etc/haios/policy).")
@click.option("--json", "as_json", is_flag=True, help="Print state.json as one JSON object.")
def state(os_root: Path, policy_dir: Path | None, as_json: bool) -> None:
    """Verify and print the state of OS_ROOT."""
    try:
        from haios.app import state_command

        _resume_collection(freeze=True)
        document = state_command(os_root, policy_dir, dict(os.environ))
    except Exception as exc:  # the one broad catch: map to the contract's codes
        # `state` reports no state on a refusal: the state is what failed to verify.
        _fail(exc, command="state", as_json=as_json)
    _print(document, as_json, None, 0)


def _print(document: dict[str, Any] | None, as_json: bool, message: str | None,
           code: int) -> None:
    from haios.cli.render import render_human, render_json

    if document is not None:
        click.echo(render_json(document) if as_json else render_human(document))
    if message and code != 0:
        click.echo(f"haios: {message}", err=True)


def _no_core_dumps() -> None:
    """Keep secrets (Vault tokens, key material) out of core files and ptrace."""
    import ctypes
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    pr_set_dumpable = 4
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_dumpable, 0, 0, 0, 0)


def _reason_for(code: int) -> str:
    """The reason label for an exit code that came without an exception."""
    from haios.models.result import STATUS_BY_EXIT

    return STATUS_BY_EXIT.get(code, "internal_error")


def _command_of(args: list[str]) -> str | None:
    """The subcommand the arguments name, if any (for a usage error's object)."""
    return next((a for a in args if a in {"run", "state"}), None)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point.

    Usage errors are handled here rather than by click, so that `--json`
    gets its one object on exit 2 too (ADR 0005); click still prints its
    usage diagnostic to stderr.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    _no_core_dumps()
    args = sys.argv[1:] if argv is None else argv
    _pause_collection()
    try:
        code = cli.main(args=args, prog_name="haios", standalone_mode=False)
    except click.UsageError as exc:
        exc.show()  # stderr: the usage line and the error
        if "--json" in args:
            # The arguments did not parse, so `--json` is taken from their text.
            _echo_result(command=_command_of(args), exit_code=EXIT_USAGE, reason="usage",
                         error_class=type(exc).__name__,
                         message=printable(exc.format_message()), state=None)
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    finally:
        _resume_collection(freeze=False)  # a command that never imported the engine
    sys.exit(code if isinstance(code, int) else 0)


def _waited_threads() -> list[threading.Thread]:
    """The threads the interpreter's normal exit would wait for."""
    main_thread = threading.main_thread()
    return [t for t in threading.enumerate() if t is not main_thread and not t.daemon]


def console() -> NoReturn:
    """The `haios` console script and `python -m haios`: `main`, then a prompt exit.

    When `main` ends, the command's files are durable and its helper
    processes reaped; what is left is the interpreter's teardown (every
    module and object finalised: about 20 ms after a run, and nothing
    needs it). So this flushes the standard streams and ends the process
    with os._exit. It falls back to the normal exit when a non-daemon
    thread besides this one is still alive (the normal exit waits for it;
    it never waits for daemon threads, such as an import warming up), when
    a flush fails (the normal exit reports it), or for a code that is not an
    int. Callers that need the normal exit (tests, in-process drivers) call
    `main`.
    """
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    else:  # main always exits; a return would be a bug, so exit as it would have
        code = 0
    exit_promptly(code)


def exit_promptly(code: str | int | None) -> NoReturn:
    """End the process with `code` as `console` does: flush, then os._exit,
    or the normal exit in the cases `console` names. For in-process drivers
    (benchmarks) that must end a run as the console script does."""
    if isinstance(code, int) and not _waited_threads():
        try:
            for stream in (sys.stdout, sys.stderr):
                if stream is not None:  # None: the descriptor was closed at start
                    stream.flush()
        except (OSError, ValueError):
            sys.exit(code)
        os._exit(code)
    sys.exit(code)
