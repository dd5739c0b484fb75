# SPDX-License-Identifier: Apache-2.0
"""`haios-client`: the client side (keys, signing, links, an example os_root).

Not part of the engine contract: a helper so a new user needs no
hand-written Python. Everything it writes follows contract section 5, and
it uses only the chosen libraries (cryptography, securesystemslib, in-toto).
Does I/O in the directories it is given.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from pathlib import Path

import click
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from haios._util.signer_api import CryptoSigner, Envelope, SSlibKey
from haios.models.envelope import PAYLOAD_TYPE, PREDICATE_TYPE, STATEMENT_TYPE


def generate_key(directory: Path, name: str) -> tuple[Path, Path]:
    """Write `<name>.pem` (PKCS#8, mode 0600) and `<name>.pub.pem` (SPKI)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    private = directory / f"{name}.pem"
    public = directory / f"{name}.pub.pem"
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def load_signer(private: Path) -> CryptoSigner:
    """A securesystemslib signer for a PKCS#8 key file."""
    key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    public = SSlibKey.from_crypto(key.public_key())
    return CryptoSigner.from_priv_key_uri(f"file2:{private}", public)


def sign_file(path: Path, private: Path, *, subject: str | None = None) -> Path:
    """Write `<path>.sig`: a DSSE envelope over the haios signature Statement."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    statement = {"_type": STATEMENT_TYPE,
                 "subject": [{"name": subject or path.name, "digest": {"sha256": digest}}],
                 "predicateType": PREDICATE_TYPE, "predicate": {}}
    envelope = Envelope(json.dumps(statement, sort_keys=True).encode(), PAYLOAD_TYPE, {})
    envelope.sign(load_signer(private))
    out = path.with_name(path.name + ".sig")
    out.write_text(json.dumps(envelope.to_dict(), indent=2) + "\n")
    return out


def write_link(names: list[str], base: Path, links: Path, private: Path,
               step_name: str = "agent-submit") -> None:
    """A classic in-toto link listing `names` (under `base`) as products."""
    from in_toto.runlib import in_toto_run

    links.mkdir(parents=True, exist_ok=True)
    in_toto_run(step_name, None, names, [], signer=load_signer(private), base_path=str(base),
                metadata_directory=str(links))


@click.group()
def cli() -> None:
    """Client helper for haios: keys, signatures, links, an example os_root."""


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.argument("name")
def keygen(directory: Path, name: str) -> None:
    """Generate an Ed25519 key pair DIRECTORY/NAME.pem and NAME.pub.pem."""
    private, public = generate_key(directory, name)
    click.echo(f"{private}\n{public}")


@cli.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--key", "private", required=True, type=click.Path(path_type=Path, exists=True))
def sign(file: Path, private: Path) -> None:
    """Write FILE.sig (DSSE, contract section 5) signed with --key."""
    click.echo(sign_file(file, private))


@cli.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--key", "private", required=True, type=click.Path(path_type=Path, exists=True))
@click.option("--base", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--links", type=click.Path(path_type=Path, file_okay=False), required=True)
def link(names: tuple[str, ...], private: Path, base: Path, links: Path) -> None:
    """Record NAMES under --base as products of a signed in-toto link in --links."""
    write_link(list(names), base, links, private)


EXAMPLE_DATA = b"region,amount\nnorth,12\nsouth,30\neast,7\n"
COUNT = "tail -n +2 data.csv | wc -l | tr -d ' \\n' > count.txt"
REPORT = (
    "import json, os\n"
    "rows = int(open('count.txt').read())\n"
    "open('report.txt', 'w').write(f'rows={rows}\\n')\n"
    "json.dump({'usd': 0.01, 'tokens': 42}, open(os.environ['HAIOS_COST_REPORT'], 'w'))\n"
)


def write_example(directory: Path, profiles: Path, *, vault_scope: str | None = None) -> None:
    """Lay out keys, a policy folder and a signed os_root under `directory`."""
    keys = directory / "keys"
    policy = directory / "policy"
    root = directory / "os_root"
    engine_dir = directory / "engine"
    for name in ("planner", "agent"):
        generate_key(keys, name)
    generate_key(engine_dir, "engine")
    os.chmod(engine_dir, 0o700)
    (policy / "keys").mkdir(parents=True)
    for name in ("planner", "agent"):
        shutil.copyfile(keys / f"{name}.pub.pem", policy / "keys" / f"{name}.pub.pem")
    shutil.copyfile(engine_dir / "engine.pub.pem", policy / "keys" / "engine.pub.pem")
    shutil.copytree(profiles, policy / "profiles")
    scope = ("\n[vault_scopes.reports]\npolicies = [\"haios-reports-read\"]\n"
             "ttl_seconds = 120\nnum_uses = 0\n") if vault_scope else ""
    (policy / "policy.toml").write_text(
        "schema = \"haios/policy/v1\"\n\n[roles.planner]\nkeys = [\"keys/planner.pub.pem\"]\n"
        "threshold = 1\n\n[roles.functionary]\nkeys = [\"keys/agent.pub.pem\"]\nthreshold = 1\n\n"
        f"[engine]\nsigning_key = \"file2:{engine_dir / 'engine.pem'}\"\n"
        "public_key = \"keys/engine.pub.pem\"\n\n[kill_switch]\nextra_paths = []\n" + scope)
    for path in [policy, *policy.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    (root / "inbox").mkdir(parents=True)
    (root / "control").mkdir()
    (root / "inbox" / "data.csv").write_bytes(EXAMPLE_DATA)
    sign_file(root / "inbox" / "data.csv", keys / "agent.pem")
    write_link(["data.csv"], root / "inbox", root / "links", keys / "agent.pem")
    steps = [
        {"id": "count", "run": ["/bin/sh", "-c", COUNT], "needs": [], "materials": ["data.csv"],
         "products": ["count.txt"], "profile": "default", "timeout_seconds": 30},
        {"id": "report", "run": ["/usr/bin/python3", "-c", REPORT], "needs": ["count"],
         "materials": ["count.txt"], "products": ["report.txt"], "profile": "default",
         "timeout_seconds": 30},
    ]
    if vault_scope:
        steps.append({
            "id": "secret-check", "needs": ["report"], "materials": [], "profile": "network",
            "vault_scope": vault_scope, "products": ["vault.txt"], "timeout_seconds": 30,
            "run": ["/usr/bin/python3", "-c", VAULT_READ]})
    expires = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    plan = {"schema": "haios/exec_plan/v1", "plan_id": "example-report", "expires": expires,
            "budget": {"cpu_seconds": 60, "wall_seconds": 300, "usd": 1.0, "tokens": 10000},
            "inputs": [{"name": "data.csv",
                        "sha256": hashlib.sha256(EXAMPLE_DATA).hexdigest()}],
            "steps": steps}
    (root / "exec_plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    sign_file(root / "exec_plan.json", keys / "planner.pem")


VAULT_READ = (
    "import json, os, urllib.request\n"
    "token = open(os.environ['HAIOS_VAULT_TOKEN_FILE']).read().strip()\n"
    "req = urllib.request.Request(os.environ['VAULT_ADDR'] + '/v1/secret/data/reports/db',\n"
    "                             headers={'X-Vault-Token': token})\n"
    "data = json.load(urllib.request.urlopen(req))['data']['data']\n"
    "open('vault.txt', 'w').write('secret fields: ' + ','.join(sorted(data)) + '\\n')\n"
)


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--profiles", type=click.Path(path_type=Path, file_okay=False, exists=True),
              default="policy/profiles", show_default=True,
              help="Sandbox profiles to copy into the example policy.")
@click.option("--vault-scope", default=None, help="Add a step using this Vault scope.")
def example(directory: Path, profiles: Path, vault_scope: str | None) -> None:
    """Scaffold DIRECTORY with keys, a policy folder and a signed example os_root."""
    if directory.exists() and any(directory.iterdir()):
        raise click.UsageError(f"{directory} is not empty")
    # policy.toml needs an absolute `file2:` key path (the engine refuses a
    # relative one, exit 6), and the printed command must work from any cwd.
    directory = Path(os.path.abspath(directory))
    write_example(directory, profiles, vault_scope=vault_scope)
    click.echo(f"haios run {directory / 'os_root'} --policy {directory / 'policy'}")


REPORT_EXIT_HELP = """\b
Exit codes:
  0  every check verified (the plan itself may have failed, been killed or
     halted: the report shows its status)
  2  usage error (bad arguments, or -o FILE cannot be written)
  3  at least one check failed verification; the report says which
  6  the policy folder is unusable; nothing was verified
  70 internal error
"""


def write_report_file(path: Path, text: str) -> None:
    """Publish `text` as `path` atomically (temp file, fsync, rename); mode 0644.

    Raises:
        OSError: the directory is missing or not writable.

    Side Effects:
        Creates a temp file beside `path` and renames it over `path`.
    """
    directory = path.parent
    temp = directory / f".{path.name}.{os.urandom(6).hex()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@cli.command(epilog=REPORT_EXIT_HELP)
@click.argument("os_root", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--policy", "policy_dir", required=True,
              type=click.Path(path_type=Path, file_okay=False),
              help="The operator's policy folder: the only source of trust.")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Write a self-contained HTML report to this file.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the findings as one JSON object (schemas/report.schema.json).")
def report(os_root: Path, policy_dir: Path, output: Path | None, as_json: bool) -> None:
    """Re-verify OS_ROOT offline against the policy and report what the run did.

    Checks the plan, inputs, products, cost records, engine links (in-toto
    layout verification), state.json, registry_map.json and the audit hash
    chain with stock libraries, never writing to OS_ROOT. Prints a summary
    (or --json), and with -o writes the HTML report whatever the verdict.
    """
    import datetime as dt
    import sys

    from rich.console import Console

    from haios._util.strict_json import printable
    from haios.errors import EXIT_INTERNAL, HaiosError
    from haios.report import build_report, load_trust, render_html, render_json, summary_table

    try:
        trust = load_trust(policy_dir)
        findings = build_report(os_root, trust, now=dt.datetime.now(dt.UTC))
        page = render_html(findings) if output is not None else None
    except HaiosError as exc:
        click.echo(f"haios-client: {type(exc).__name__}: {printable(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # the command's one broad catch: a bug is exit 70, one line
        click.echo(f"haios-client: internal error: {type(exc).__name__}", err=True)
        sys.exit(EXIT_INTERNAL)
    if output is not None and page is not None:
        try:
            write_report_file(output, page)
        except OSError as exc:
            raise click.BadParameter(f"cannot write {output}: {exc.strerror}",
                                     param_hint="-o") from exc
    if as_json:
        click.echo(render_json(findings))
    else:
        console = Console(markup=False, highlight=False, emoji=False)
        for renderable in summary_table(findings):
            console.print(renderable)
    if output is not None:
        click.echo(f"report written to {output}", err=True)
    sys.exit(3 if findings.verdict == "failed" else 0)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="haios-client")
