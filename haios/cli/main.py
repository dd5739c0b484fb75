# SPDX-License-Identifier: Apache-2.0
"""`haios run` and `haios state` (contract section 2).

Exit codes are the contract's: 2 usage, 3 rejected, 4 killed, 5 budget,
6 environment, 7 busy, 70 internal. Codes 2, 3 and 6 mean nothing ran.
Diagnostics go to stderr as one line; no traceback reaches a user. This
is the only place with a broad `except`, and it maps to exit 70.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from haios import __version__
from haios._util.strict_json import printable
from haios.errors import EXIT_INTERNAL, HaiosError

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


def _fail(exc: BaseException) -> NoReturn:
    if isinstance(exc, HaiosError):
        # Messages can carry os_root names: never raw control characters.
        click.echo(f"haios: {type(exc).__name__}: {printable(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    click.echo(f"haios: internal error: {type(exc).__name__}", err=True)
    sys.exit(EXIT_INTERNAL)


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
        from haios.app import run_command

        code, document, message = run_command(os_root, policy_dir, dict(os.environ), jobs=jobs,
                                              metrics_addr=metrics_addr)
    except Exception as exc:  # the one broad catch: map to the contract's codes
        _fail(exc)
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

        document = state_command(os_root, policy_dir, dict(os.environ))
    except Exception as exc:  # the one broad catch: map to the contract's codes
        _fail(exc)
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


def main() -> None:
    """Console-script entry point."""
    _no_core_dumps()
    cli(prog_name="haios")
