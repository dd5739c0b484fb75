# SPDX-License-Identifier: Apache-2.0
"""`[metrics]` policy settings and the textfile writer (haios.metrics_export).

Threats: a policy that sends metrics to a remote host in clear or with
credentials in the URL; a textfile directory others can write (forged
metrics silence alerts); a symlink planted at the directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from haios.errors import EnvironmentUnavailableError
from haios.metrics import MetricsRecorder
from haios.metrics_export import os_root_id, render_exported, write_textfile
from haios.models.policy import MetricsSection


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9091",
        "http://localhost:9091",
        "http://[::1]:9091",
        "http://127.0.0.1",
    ],
)
def test_loopback_pushgateway_is_accepted(url: str) -> None:
    assert MetricsSection(pushgateway_url=url).pushgateway_url == url


def test_remote_pushgateway_needs_https_and_consent() -> None:
    with pytest.raises(ValidationError, match="allow_remote"):
        MetricsSection(pushgateway_url="https://pg.example:9091")
    with pytest.raises(ValidationError, match="https"):
        MetricsSection(pushgateway_url="http://pg.example:9091", pushgateway_allow_remote=True)
    allowed = MetricsSection(
        pushgateway_url="https://pg.example:9091", pushgateway_allow_remote=True
    )
    assert allowed.pushgateway_allow_remote


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1",
        "http://user:pw@127.0.0.1:9091",
        "http://127.0.0.1:9091/metrics",
        "http://127.0.0.1:9091/?x=1",
        "http://127.0.0.1:99999",
        "127.0.0.1:9091",
    ],
    ids=["scheme", "credentials", "path", "query", "port", "no-scheme"],
)
def test_bad_pushgateway_url_is_refused(url: str) -> None:
    with pytest.raises(ValidationError):
        MetricsSection(pushgateway_url=url)


@pytest.mark.parametrize("path", ["relative", "/a/../b", "/a//b", "//a", "/", "/a/"])
def test_textfile_dir_must_be_absolute_and_normalised(path: str) -> None:
    with pytest.raises(ValidationError):
        MetricsSection(textfile_dir=path)


def test_instance_label_is_checked() -> None:
    with pytest.raises(ValidationError):
        MetricsSection(instance="bad label/")


def test_export_drops_created_and_adds_labels() -> None:
    text = render_exported(MetricsRecorder().registry, {"engine": "e", "os_root": "0" * 16})
    assert b"_created" not in text
    assert b'haios_build_info{contract="1",engine="e",os_root="0000000000000000"' in text


def test_os_root_id_names_no_path(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    assert os_root_id(os.stat(one)) != os_root_id(os.stat(two))
    assert len(os_root_id(os.stat(one))) == 16


def test_textfile_is_written_atomically_0644(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    old = os.umask(0o077)  # a strict umask must not narrow what node_exporter reads
    try:
        write_textfile(str(tmp_path), "haios_e_x.prom", b"a 1\n")
    finally:
        os.umask(old)
    target = tmp_path / "haios_e_x.prom"
    assert target.read_bytes() == b"a 1\n"
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["haios_e_x.prom"]


def test_group_writable_textfile_dir_is_refused(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o775)
    with pytest.raises(EnvironmentUnavailableError, match="not writable"):
        write_textfile(str(tmp_path), "haios_e_x.prom", b"a 1\n")


def test_symlinked_textfile_dir_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o755)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(EnvironmentUnavailableError):
        write_textfile(str(tmp_path / "link"), "haios_e_x.prom", b"a 1\n")
    assert not list(real.iterdir())


@pytest.mark.parametrize("name", ["../x.prom", "x.txt", ".x.prom"])
def test_textfile_name_must_be_plain(tmp_path: Path, name: str) -> None:
    os.chmod(tmp_path, 0o755)
    with pytest.raises(EnvironmentUnavailableError):
        write_textfile(str(tmp_path), name, b"a 1\n")
