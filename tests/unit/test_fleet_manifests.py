# SPDX-License-Identifier: Apache-2.0
"""The fleet deployment: Kubernetes manifests, the Nomad job, the container install steps.

No cluster, Nomad agent or image registry is reachable here, so each file is
checked against what can be had on this machine:

- every Kubernetes manifest (the base's files, the ConfigMap its generator
  makes, and everything `kubectl kustomize` renders for the base and the
  example overlay) validates strictly (unknown fields refused) against the
  Kubernetes schemas that the `kubernetes-validate` package ships, offline,
  for the oldest supported version (1.30, which has `appArmorProfile`) and
  the newest the package knows;
- the kustomization lists every resource file and every policy file, and the
  profiles it ships are byte-identical to policy/profiles;
- the Job and the Nomad job (parsed with python-hcl2) grant what the engine's
  code requires, and mount every file the fleet policy names at the path it
  names; the fleet policy loads with the engine's own loader when laid out as
  those mounts lay it out, and is refused as a ConfigMap volume mounted whole;
- the process-events connector refuses a PID or network namespace other than
  the initial ones, which is why the pod shares the node's;
- deploy/container/install.sh, run the way the image build runs it (the
  Containerfile's COPY set, into a throw-away root), yields a `haios` that
  runs a signed example plan, a working `haios-client`, the example policy
  with no key, and an entrypoint that delegates a cgroup v2 subtree on the
  real kernel.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from haios.errors import PolicyLoadError
from haios.load.policy import load_policy
from haios.sandbox.preflight import REQUIRED_CAPABILITIES
from haios.watchdog import _harden
from haios.watchdog.cgroups import find_cgroup2_mount
from tests.support.keys import KeyFile

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "kubernetes" / "base"
OVERLAY = ROOT / "deploy" / "kubernetes" / "overlays" / "example"
NOMAD_JOB = ROOT / "deploy" / "nomad" / "haios.nomad.hcl"
CONTAINER = ROOT / "deploy" / "container"
FLEET_DOC = ROOT / "docs" / "fleet.md"

#: the oldest Kubernetes the manifests support, and the newest schemas shipped
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
ENGINE_ARGS = ["run", "/os_root", "--policy", "/etc/haios/policy", "--json"]
POLICY_DIR = "/etc/haios/policy"
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and cgroups: needs root")


# -- helpers -------------------------------------------------------------------


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _validate(resource: dict[str, Any], version: str) -> None:
    """Strict schema validation; a kind without a schema is a failure, not a warning."""
    kubernetes_validate.validate(resource, version, strict=True)


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((BASE / "kustomization.yaml").read_text())


def _generated_configmaps() -> list[dict[str, Any]]:
    """The ConfigMaps the base's configMapGenerator makes (without the name hash)."""
    maps = []
    for generator in _kustomization()["configMapGenerator"]:
        data = {Path(name).name: (BASE / name).read_text() for name in generator["files"]}
        maps.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": generator["name"]},
                "data": data,
            }
        )
    return maps


def _job() -> dict[str, Any]:
    (job,) = _documents(BASE / "job.yaml")
    return job


def _pod(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


def _container(job: dict[str, Any]) -> dict[str, Any]:
    (container,) = _pod(job)["containers"]
    return container


def _fleet_policy() -> dict[str, Any]:
    return tomllib.loads((BASE / "policy" / "policy.toml").read_text())


def _policy_files() -> dict[str, str]:
    """Container path -> file name in deploy/kubernetes/base/policy, for the policy folder."""
    files = {f"{POLICY_DIR}/policy.toml": "policy.toml"}
    for name in ("default", "network"):
        files[f"{POLICY_DIR}/profiles/{name}.toml"] = f"{name}.toml"
    return files


def _key_paths() -> list[str]:
    policy = _fleet_policy()
    keys = [
        *policy["roles"]["planner"]["keys"],
        *policy["roles"]["functionary"]["keys"],
        policy["engine"]["public_key"],
    ]
    return [f"{POLICY_DIR}/{key}" for key in keys]


def _signing_key_path() -> str:
    uri = _fleet_policy()["engine"]["signing_key"]
    assert uri.startswith("file2:/")
    return uri.removeprefix("file2:")


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl (with its kustomize) is missing; this machine image ships it")
        pytest.skip("kubectl is not installed: the rendered manifests are not checked")
    return kubectl


def _render(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


# -- Kubernetes schemas ----------------------------------------------------------


def _base_files() -> list[Path]:
    return sorted(p for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", _base_files(), ids=lambda p: p.name)
def test_every_base_manifest_validates_against_the_kubernetes_schemas(
    path: Path, version: str
) -> None:
    for resource in _documents(path):
        _validate(resource, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_generated_policy_configmap_validates(version: str) -> None:
    for configmap in _generated_configmaps():
        _validate(configmap, version)


def test_validation_is_strict_and_rejects_a_misspelt_field() -> None:
    job = _job()
    _pod(job)["hostPid"] = True  # the real field is hostPID
    with pytest.raises(kubernetes_validate.ValidationError, match="hostPid"):
        _validate(job, K8S_VERSIONS[-1])


def test_a_kind_without_a_schema_is_an_error_not_a_warning() -> None:
    with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
        _validate(
            {"apiVersion": "haios.dev/v1", "kind": "Nonsense", "metadata": {}}, K8S_VERSIONS[-1]
        )


@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay-example"])
def test_kustomize_renders_manifests_that_validate(directory: Path) -> None:
    rendered = _render(directory)
    kinds = sorted(resource["kind"] for resource in rendered)
    assert kinds == ["ConfigMap", "Job", "Namespace", "PersistentVolumeClaim", "ServiceAccount"]
    for resource in rendered:
        for version in K8S_VERSIONS:
            _validate(resource, version)
    by_kind = {resource["kind"]: resource for resource in rendered}
    volumes = {v["name"]: v for v in _pod(by_kind["Job"])["volumes"]}
    # The Job follows the generated (hash-suffixed) ConfigMap and the renamed PVC.
    assert volumes["policy"]["configMap"]["name"] == by_kind["ConfigMap"]["metadata"]["name"]
    assert (
        volumes["os-root"]["persistentVolumeClaim"]["claimName"]
        == by_kind["PersistentVolumeClaim"]["metadata"]["name"]
    )
    assert all(r["metadata"].get("namespace", "haios") == "haios" for r in rendered)


def test_the_overlay_gives_each_os_root_its_own_job_and_claim() -> None:
    rendered = {r["kind"]: r for r in _render(OVERLAY)}
    suffix = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())["nameSuffix"]
    assert rendered["Job"]["metadata"]["name"] == f"haios-run{suffix}"
    assert rendered["PersistentVolumeClaim"]["metadata"]["name"] == f"haios-os-root{suffix}"


# -- the kustomization -------------------------------------------------------------


def test_the_kustomization_lists_every_resource_file() -> None:
    listed = _kustomization()["resources"]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == [p.name for p in _base_files()]


def test_the_kustomization_lists_every_policy_file() -> None:
    listed = [name for g in _kustomization()["configMapGenerator"] for name in g["files"]]
    on_disk = sorted(f"policy/{p.name}" for p in (BASE / "policy").iterdir())
    assert sorted(listed) == on_disk


@pytest.mark.parametrize("name", ["default.toml", "network.toml"])
def test_the_shipped_profiles_are_byte_identical_copies(name: str) -> None:
    assert (BASE / "policy" / name).read_bytes() == (
        ROOT / "policy" / "profiles" / name
    ).read_bytes()


def test_the_base_ships_no_key_and_no_secret_object() -> None:
    for path in BASE.rglob("*"):
        if path.is_file():
            assert "PRIVATE KEY" not in path.read_text(), path
    for path in _base_files():
        assert all(r["kind"] != "Secret" for r in _documents(path)), path


# -- the Job grants what the code needs ------------------------------------------------


def test_the_job_runs_one_engine_once_with_its_own_resume_as_the_retry() -> None:
    spec = _job()["spec"]
    assert spec["suspend"] is True  # started once the client has filled os_root
    assert spec["backoffLimit"] == 0
    assert spec["parallelism"] == spec["completions"] == 1
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["activeDeadlineSeconds"] > 0
    assert _pod(_job())["restartPolicy"] == "Never"
    assert _container(_job())["args"] == ENGINE_ARGS


def test_the_pod_shares_the_namespaces_the_process_events_connector_needs() -> None:
    pod = _pod(_job())
    assert pod["hostPID"] is True
    assert pod["hostNetwork"] is True
    assert pod["hostUsers"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    context = _container(_job())["securityContext"]
    assert context["privileged"] is True
    assert context["runAsUser"] == 0
    assert context["seccompProfile"] == {"type": "Unconfined"}


def test_vault_addr_comes_from_the_environment_and_the_token_from_a_secret() -> None:
    env = {e["name"]: e for e in _container(_job())["env"]}
    assert set(env) == {"VAULT_ADDR", "VAULT_TOKEN"}
    assert env["VAULT_ADDR"]["value"].startswith("https://")
    assert env["VAULT_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "token"


def _mounts() -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in _container(_job())["volumeMounts"]}


def _volumes() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in _pod(_job())["volumes"]}


def test_every_policy_file_is_mounted_read_only_as_a_regular_file() -> None:
    mounts, volumes = _mounts(), _volumes()
    configmap_keys = set(_generated_configmaps()[0]["data"])
    for path, key in _policy_files().items():
        mount = mounts[path]
        assert mount["readOnly"] and mount["subPath"] == key, path
        assert volumes[mount["name"]]["configMap"]["defaultMode"] == 0o444
        assert key in configmap_keys
    for path in _key_paths():
        mount = mounts[path]
        assert mount["readOnly"] and mount["subPath"] == Path(path).name, path
        assert volumes[mount["name"]]["secret"]["defaultMode"] == 0o444
    signing = mounts[_signing_key_path()]
    assert signing["readOnly"] and signing["subPath"] == Path(_signing_key_path()).name
    assert volumes[signing["name"]]["secret"]["defaultMode"] == 0o400
    # Nothing but the policy files is mounted into the policy folder.
    inside = {p for p in mounts if p.startswith(POLICY_DIR + "/")}
    assert inside == set(_policy_files()) | set(_key_paths())


def test_state_dir_and_kill_flags_are_host_wide_paths_the_policy_names() -> None:
    policy, mounts, volumes = _fleet_policy(), _mounts(), _volumes()
    state = mounts[policy["engine"]["state_dir"]]
    assert volumes[state["name"]]["hostPath"] == {
        "path": policy["engine"]["state_dir"],
        "type": "DirectoryOrCreate",
    }
    node_flag, fleet_flag = policy["kill_switch"]["extra_paths"]
    node = mounts[str(Path(node_flag).parent)]
    assert node["readOnly"] and volumes[node["name"]]["hostPath"]["path"] == "/run/haios"
    fleet = mounts[str(Path(fleet_flag).parent)]
    assert fleet["readOnly"] and "subPath" not in fleet  # a subPath mount never updates
    assert volumes[fleet["name"]]["configMap"]["optional"] is True
    assert volumes[mounts["/os_root"]["name"]]["persistentVolumeClaim"]["claimName"]


# -- the fleet policy, as the mounts lay it out ----------------------------------------------


def _lay_out_policy(folder: Path, keys: Path) -> None:
    """Build the policy folder as the pod sees it: regular 0444 files in root 0755 dirs."""
    for sub in ("", "keys", "profiles"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub).chmod(0o755)
    for path, key in _policy_files().items():
        target = folder / Path(path).relative_to(POLICY_DIR)
        shutil.copyfile(BASE / "policy" / key, target)
        target.chmod(0o444)
    for path in _key_paths():
        name = Path(path).name.removesuffix(".pub.pem")
        target = folder / Path(path).relative_to(POLICY_DIR)
        shutil.copyfile(KeyFile(keys, name).public_path, target)
        target.chmod(0o444)


def test_the_fleet_policy_loads_with_the_engine_loader(tmp_path: Path) -> None:
    _lay_out_policy(tmp_path / "policy", tmp_path / "keys")
    policy = load_policy(tmp_path / "policy")
    assert policy.file.engine.state_dir == "/var/lib/haios"
    assert sorted(policy.profiles) == ["default", "network"]
    assert policy.file.metrics.pushgateway_url is not None
    assert policy.file.metrics.instance is None  # the node's host name (docs/fleet.md)


def test_a_configmap_volume_mounted_whole_is_refused_by_the_policy_loader(tmp_path: Path) -> None:
    # The kubelet's layout: every key is a symlink through ..data to a timestamped
    # directory. The loader opens with O_NOFOLLOW, hence the subPath mounts.
    pod_view = tmp_path / "pod"
    _lay_out_policy(pod_view, tmp_path / "keys")
    volume = tmp_path / "volume"
    stamped = volume / "..2026_12_02_14_00_00.000000001"
    shutil.copytree(pod_view, stamped)
    (volume / "..data").symlink_to(stamped.name)
    for entry in ("policy.toml", "keys", "profiles"):
        (volume / entry).symlink_to(f"..data/{entry}")
    volume.chmod(0o755)
    with pytest.raises(PolicyLoadError, match="symlink"):
        load_policy(volume)


# -- why the pod shares the node's namespaces --------------------------------------------------

_SUBSCRIBE = (
    "from haios.sandbox.treewatch import TreeWatch\n"
    "from haios.errors import SandboxSetupError\n"
    "try:\n    TreeWatch.start().close()\n"
    "except SandboxSetupError as exc:\n    print('refused:', exc)\n"
    "else:\n    print('subscribed')\n"
)


@NEEDS_ROOT
@pytest.mark.parametrize(
    ("unshare", "expected"),
    [
        ([], "subscribed"),
        (["--net"], "refused: process events: cannot subscribe"),
        (
            ["--pid", "--fork", "--mount-proc"],
            "refused: process events: the kernel did not acknowledge",
        ),
    ],
    ids=["initial-namespaces", "own-network-namespace", "own-pid-namespace"],
)
def test_process_events_answer_only_in_the_initial_namespaces(
    unshare: list[str], expected: str
) -> None:
    result = subprocess.run(
        ["unshare", *unshare, sys.executable, "-c", _SUBSCRIBE],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(expected), result.stdout


def test_the_documented_privileges_are_the_ones_the_code_asks_for() -> None:
    text = FLEET_DOC.read_text()
    for name in REQUIRED_CAPABILITIES:
        assert f"`{name}`" in text, name
    kept = {_harden.CAP_KILL: "CAP_KILL", _harden.CAP_DAC_READ_SEARCH: "CAP_DAC_READ_SEARCH"}
    assert set(kept) == set(_harden.KEPT_CAPABILITIES)
    for name in kept.values():
        assert f"`{name}`" in text, name


# -- the Nomad job ---------------------------------------------------------------------------


def _unwrap(block: Any) -> Any:
    """python-hcl2 gives repeated blocks as lists of one-key dicts; take the only one."""
    if isinstance(block, list) and len(block) == 1:
        return block[0]
    return block


def _nomad() -> tuple[str, dict[str, Any]]:
    """(job id, job body) from python-hcl2, or from a documented minimal parse without it."""
    try:
        import hcl2
    except ImportError:  # pragma: no cover - the test extras install python-hcl2
        return _nomad_minimal()
    options = hcl2.SerializationOptions(
        strip_string_quotes=True, explicit_blocks=False, with_comments=False
    )
    with NOMAD_JOB.open() as handle:
        document = hcl2.load(handle, serialization_options=options)
    ((job_id, body),) = _unwrap(document["job"]).items()
    return job_id, body


def _nomad_minimal() -> tuple[str, dict[str, Any]]:  # pragma: no cover
    """Without python-hcl2: the few facts the tests need, read with regular expressions.

    Only the shape this file uses is understood (one job, one group, one task;
    `key = "value"` lines; `mount`/`volume_mount`/`template` blocks of such lines).
    """
    text = NOMAD_JOB.read_text()
    job_id = re.search(r'^job "([^"]+)"', text, re.M)
    assert job_id is not None

    def blocks(name: str) -> list[dict[str, Any]]:
        found = []
        for body in re.findall(rf"^\s*{name} \{{\n(.*?)^\s*\}}", text, re.M | re.S):
            found.append(
                {
                    k: v.strip('"') if v.startswith('"') else v == "true"
                    for k, v in re.findall(r"^\s*(\w+)\s*=\s*(.+?)\s*$", body, re.M)
                }
            )
        return found

    def value(name: str) -> str:
        match = re.search(rf'^\s*{name}\s*=\s*"([^"]*)"', text, re.M)
        assert match is not None, name
        return match.group(1)

    args = re.search(r"^\s*args\s*=\s*\[(.*?)\]", text, re.M)
    assert args is not None
    config = {
        "args": re.findall(r'"([^"]*)"', args.group(1)),
        "privileged": True,
        "pid_mode": value("pid_mode"),
        "network_mode": value("network_mode"),
        "userns_mode": value("userns_mode"),
        "mount": blocks("mount"),
    }
    assert re.search(r"^\s*privileged\s*=\s*true", text, re.M)
    task = {
        "driver": value("driver"),
        "config": config,
        "volume_mount": blocks("volume_mount"),
        "template": blocks("template"),
        "env": blocks("env"),
        "vault": blocks("vault"),
    }
    group = {
        "count": 1,
        "restart": blocks("restart"),
        "reschedule": blocks("reschedule"),
        "task": {"haios": task},
    }
    return job_id.group(1), {"type": value("type"), "group": {"engine": group}}


def _nomad_task() -> tuple[str, dict[str, Any], dict[str, Any]]:
    job_id, body = _nomad()
    ((_, group),) = _unwrap(body["group"]).items()
    ((_, task),) = _unwrap(group["task"]).items()
    return job_id, group, task


def test_the_nomad_job_is_a_batch_job_that_never_retries_by_itself() -> None:
    _, body = _nomad()
    assert body["type"] == "batch"
    _, group, _ = _nomad_task()
    assert group["count"] == 1
    assert _unwrap(group["restart"])["attempts"] == 0
    reschedule = _unwrap(group["reschedule"])
    assert reschedule["attempts"] == 0 and reschedule["unlimited"] is False


def test_the_nomad_task_runs_the_same_command_with_the_same_namespaces() -> None:
    _, _, task = _nomad_task()
    assert task["driver"] == "docker"
    config = _unwrap(task["config"])
    assert config["args"] == _container(_job())["args"] == ENGINE_ARGS
    assert config["privileged"] is True
    assert (config["pid_mode"], config["network_mode"], config["userns_mode"]) == ("host",) * 3
    assert "VAULT_ADDR" in _unwrap(task["env"])
    assert _unwrap(task["vault"])["change_mode"] == "noop"


def test_the_nomad_task_mounts_the_same_files_at_the_same_paths() -> None:
    job_id, _, task = _nomad_task()
    config = _unwrap(task["config"])
    binds = {m["target"]: m for m in config["mount"]}
    assert set(binds) == set(_policy_files()) | set(_key_paths()) | {_signing_key_path()}
    assert all(m["type"] == "bind" and m["readonly"] is True for m in binds.values())
    rendered = {t["destination"]: t for t in task["template"]}
    for target, bind in binds.items():
        template = rendered[bind["source"]]
        mode = "0400" if target == _signing_key_path() else "0444"
        assert template["perms"] == mode, target
        assert template["change_mode"] == "noop", target
        if target in _policy_files():
            assert _policy_files()[target] in template["data"], target
        else:
            assert (
                f'nomadVar \\"nomad/jobs/{job_id}\\"' in template["data"]
                or f'nomadVar "nomad/jobs/{job_id}"' in template["data"]
            ), target
    destinations = {m["destination"]: m for m in task["volume_mount"]}
    assert set(destinations) == {"/os_root", "/var/lib/haios", "/run/haios"}
    assert destinations["/run/haios"]["read_only"] is True


@pytest.mark.parametrize("name", ["policy.toml", "default.toml", "network.toml"])
def test_policy_files_pass_through_nomad_templates_verbatim(name: str) -> None:
    # The Nomad job hands these files to its template engine: no delimiter in them.
    text = (BASE / "policy" / name).read_text()
    assert "{{" not in text and "}}" not in text


# -- the container image's install steps, run here -------------------------------------------


def test_the_containerfile_runs_install_sh_on_debian_bookworm_as_root() -> None:
    text = (CONTAINER / "Containerfile").read_text()
    assert re.search(r"^FROM \S*debian:bookworm", text, re.M)
    assert re.search(
        r"^RUN sh /usr/src/haios/deploy/container/install\.sh "
        r"packages engine files",
        text,
        re.M,
    )
    assert re.search(r"^USER 0:0$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["/usr/local/bin/haios-entrypoint"\]$', text, re.M)


def _containerfile_copies() -> list[tuple[list[str], str]]:
    copies = []
    for line in (CONTAINER / "Containerfile").read_text().splitlines():
        if line.startswith("COPY "):
            *sources, target = line.split()[1:]
            copies.append((sources, target))
    return copies


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run install.sh as the image build does: its COPY set, then the three phases.

    The packages phase only checks (HAIOS_APT=check) that this Debian machine
    has the packages the image installs; pip may use its cache here.
    """
    work = tmp_path_factory.mktemp("image")
    context = work / "src"
    for sources, target in _containerfile_copies():
        destination = context / Path(target).relative_to("/usr/src/haios")
        for source in sources:
            origin = ROOT / source
            if origin.is_dir():
                shutil.copytree(
                    origin,
                    destination,
                    dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"),
                )
            else:
                destination.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, destination / origin.name)
    root = work / "root"
    env = {**os.environ, "HAIOS_DESTDIR": str(root), "HAIOS_APT": "check", "HAIOS_PIP_CACHE": "on"}
    result = subprocess.run(
        ["sh", str(context / "deploy/container/install.sh"), "packages", "engine", "files"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return root


def test_the_installed_engine_and_client_run(installed: Path) -> None:
    bin_dir = installed / "usr/local/bin"
    version = subprocess.run(
        [bin_dir / "haios", "--version"], capture_output=True, text=True, check=True, timeout=60
    )
    assert version.stdout.strip() == "haios, version 1.0.0"
    client = subprocess.run(
        [bin_dir / "haios-client", "--help"], capture_output=True, text=True, check=True, timeout=60
    )
    assert "keygen" in client.stdout and "example" in client.stdout
    # The venv is Debian's interpreter, as in the image, not this machine's other Pythons.
    config = (installed / "opt/haios/pyvenv.cfg").read_text()
    assert re.search(r"^home = /usr/bin$", config, re.M)


def test_the_image_ships_the_policy_as_an_example_and_never_a_key(installed: Path) -> None:
    example = installed / "usr/share/haios/policy-example"
    shipped = sorted(p.name for p in (ROOT / "policy" / "profiles").glob("*.toml"))
    assert sorted(p.name for p in (example / "profiles").iterdir()) == shipped
    assert (example / "policy.toml").read_bytes() == (ROOT / "policy/policy.toml").read_bytes()
    for path in installed.rglob("*"):
        if path.is_file() and not path.is_symlink() and "opt/haios" not in str(path):
            assert path.suffix != ".pem", path
            assert b"PRIVATE KEY-----" not in path.read_bytes(), path


def test_the_mount_points_are_directories_the_policy_loader_accepts(installed: Path) -> None:
    for directory in (
        "etc/haios/policy",
        "etc/haios/policy/keys",
        "etc/haios/policy/profiles",
        "etc/haios/engine-key",
    ):
        info = (installed / directory).lstat()
        assert stat.S_ISDIR(info.st_mode), directory
        assert info.st_uid == os.geteuid() and not info.st_mode & 0o022, directory
    assert stat.S_IMODE((installed / "var/lib/haios").lstat().st_mode) == 0o700


@NEEDS_ROOT
def test_the_installed_engine_runs_a_signed_example_through_the_entrypoint(
    installed: Path, tmp_path: Path
) -> None:
    bin_dir = installed / "usr/local/bin"
    subprocess.run(
        [
            bin_dir / "haios-client",
            "example",
            str(tmp_path / "ex"),
            "--profiles",
            str(installed / "usr/share/haios/policy-example/profiles"),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run = subprocess.run(
        [
            bin_dir / "haios-entrypoint",
            "run",
            str(tmp_path / "ex/os_root"),
            "--policy",
            str(tmp_path / "ex/policy"),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["status"] == "succeeded"


@contextlib.contextmanager
def _child_cgroup(controller: str) -> Iterator[Path]:
    """A fresh child of the cgroup v2 root offering `controller`; removed afterwards."""
    mount = find_cgroup2_mount()
    control = mount / "cgroup.subtree_control"
    enabled_before = controller in control.read_text().split()
    if not enabled_before:
        control.write_text(f"+{controller}")
    child = mount / f"haios-fleet-test-{secrets.token_hex(4)}"
    child.mkdir()
    try:
        yield child
    finally:
        for leaf in (child / "engine", child):
            with contextlib.suppress(FileNotFoundError):
                leaf.rmdir()
        if not enabled_before:
            with contextlib.suppress(OSError):
                control.write_text(f"-{controller}")


@NEEDS_ROOT
def test_the_entrypoint_delegates_a_private_cgroup_namespace(
    installed: Path, tmp_path: Path
) -> None:
    # A container's view on a cgroup v2 host: its own cgroup, holding its own
    # processes, is the root of /sys/fs/cgroup. Enabling a controller for its
    # children then fails with EBUSY until the processes move to a leaf.
    mount = find_cgroup2_mount()
    offered = (mount / "cgroup.controllers").read_text().split()
    if not offered:
        pytest.skip("the cgroup v2 root offers no controller on this host")
    controller = "pids" if "pids" in offered else offered[0]
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "haios").write_text('#!/bin/sh\necho "haios $*"\ncat /proc/self/cgroup\n')
    (fake_bin / "haios").chmod(0o755)
    script = (
        "mount -t cgroup2 none /sys/fs/cgroup && "
        f"exec {installed}/usr/local/bin/haios-entrypoint run /os_root"
    )
    with _child_cgroup(controller) as child:

        def enter_child() -> None:
            (child / "cgroup.procs").write_text("0")

        env = {
            **os.environ,
            "PATH": f"{fake_bin}:{os.environ['PATH']}",
            "HAIOS_ENTRYPOINT_CONTROLLERS": controller,
        }
        result = subprocess.run(
            [
                "unshare",
                "--cgroup",
                "--mount",
                "--propagation",
                "private",
                "--fork",
                "sh",
                "-c",
                script,
            ],
            preexec_fn=enter_child,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0] == "haios run /os_root"
        assert "0::/engine" in result.stdout.splitlines()
        assert controller in (child / "cgroup.subtree_control").read_text().split()
        assert (child / "cgroup.procs").read_text() == ""
