# SPDX-License-Identifier: Apache-2.0
"""Metrics that outlive a run: Pushgateway pushes and node_exporter textfiles.

`haios run` serves its metrics only while it runs, and a refusal, a kill or
a seccomp violation ends the run within a second: a scraper rarely sees the
final values. Prometheus's answer for batch jobs is to push them, or to
leave them in a file node_exporter serves. This module does both, as the
operator's `[metrics]` policy settings ask (`haios.models.policy.MetricsSection`):

- `pushgateway_url`: PUT the run's metrics to
  `/metrics/job/haios/engine/<instance>/os_root/<os_root id>` every
  `push_interval_seconds` while it runs and once at its end, so each
  (engine, os_root) pair holds the metrics of its latest run;
- `textfile_dir`: write `haios_<instance>_<os_root id>.prom` there atomically
  at the end (temp file, fsync, rename, mode 0644), each sample labelled
  `engine` and `os_root`.

The os_root id is a hash of the os_root directory's device and inode: it
tells os_roots apart without naming a path, a step or a secret (contract
section 10). `*_created` samples are left out: after the run they only
restate its start time.

What this module does not do: define metrics (`haios.metrics` does, and
this module only reads the recorder's registry), or fail a run: an export
that fails is a warning on stderr, because metrics are for watching and
`state.json` and `audit.jsonl` are the record.

I/O: HTTP to the Pushgateway, files in the textfile directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import stat
import threading
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest, push_to_gateway
from prometheus_client.metrics_core import Metric

from haios import events
from haios.errors import EnvironmentUnavailableError, PathError
from haios.metrics import write_atomically

if TYPE_CHECKING:
    from collections.abc import Iterable

    from prometheus_client.registry import Collector

    from haios.events import Event
    from haios.models.policy import MetricsSection

_log = logging.getLogger(__name__)

#: the Pushgateway job label of every push
PUSH_JOB: Final = "haios"
PUSH_TIMEOUT_SECONDS: Final = 5.0
DEFAULT_INSTANCE: Final = "haios"
_INSTANCE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_OS_ROOT_ID_HEX: Final = 16
_CREATED_SUFFIX: Final = "_created"
TEXTFILE_MODE: Final = 0o644


def os_root_id(st: os.stat_result) -> str:
    """A stable, path-free id of an os_root directory: hash of device and inode. Pure.

    Args:
        st: the os_root directory's stat (from its open descriptor).

    Returns:
        16 hex digits.
    """
    return hashlib.sha256(f"haios-os-root:{st.st_dev}:{st.st_ino}".encode()).hexdigest()[
        :_OS_ROOT_ID_HEX
    ]


def instance_name(configured: str | None) -> str:
    """The `engine` label: the configured name, else the host name if it fits, else `haios`.

    Args:
        configured: `[metrics] instance` from the policy, or None.

    Returns:
        A label value matching ``[A-Za-z0-9][A-Za-z0-9._-]{0,62}``.
    """
    if configured is not None:
        return configured
    host = socket.gethostname()
    return host if _INSTANCE_RE.fullmatch(host) else DEFAULT_INSTANCE


class _Exported:
    """A collector over the recorder's registry: no `*_created`, extra constant labels."""

    def __init__(self, source: CollectorRegistry, labels: dict[str, str]) -> None:
        self._source = source
        self._labels = labels

    def collect(self) -> Iterable[Metric]:
        """Yield the source's families with `_created` samples dropped and labels added."""
        for family in self._source.collect():
            copy = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                if sample.name.endswith(_CREATED_SUFFIX):
                    continue
                labels = {**sample.labels, **self._labels}
                copy.add_sample(
                    sample.name, labels, sample.value, sample.timestamp, sample.exemplar
                )
            if copy.samples:
                yield copy


def render_exported(source: CollectorRegistry, labels: dict[str, str]) -> bytes:
    """The registry as Prometheus text, without `*_created`, with `labels` on each sample.

    Args:
        source: the run's registry (`MetricsRecorder.registry`).
        labels: constant labels to add (empty for a push: the grouping key
            adds them there).

    Returns:
        The text exposition format, UTF-8.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_as_collector(_Exported(source, labels)))
    return generate_latest(registry)


def _as_collector(exported: _Exported) -> Collector:
    return exported  # structurally a Collector (it has `collect`)


class MetricsExporter:
    """Pushes and writes one run's metrics as the policy asks; `close()` at the end."""

    def __init__(
        self, settings: MetricsSection, registry: CollectorRegistry, root_stat: os.stat_result
    ) -> None:
        """Prepare the export; nothing is sent until `start` or `finish`.

        Args:
            settings: the policy's `[metrics]` section.
            registry: the run recorder's registry (read only).
            root_stat: stat of the os_root directory, for its id.
        """
        self.settings = settings
        self.instance = instance_name(settings.instance)
        self.os_root = os_root_id(root_stat)
        self._registry = registry
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._push_lock = threading.Lock()

    @property
    def grouping_key(self) -> dict[str, str]:
        """The Pushgateway grouping key (besides `job`): engine instance and os_root id."""
        return {"engine": self.instance, "os_root": self.os_root}

    def start(self) -> None:
        """Push once now, then every `push_interval_seconds` until `finish`.

        Side Effects:
            Starts a daemon thread that makes HTTP requests to the Pushgateway.
        """
        if self.settings.pushgateway_url is None:
            return
        self.push()
        self._thread = threading.Thread(
            target=self._push_loop, name="haios-metrics-push", daemon=True
        )
        self._thread.start()

    def on_event(self, event: Event) -> None:
        """Start the progress pushes when the run starts; pass to `EventBus.subscribe`.

        `run.started` is published only under the os_root lock, after
        verification: a run refused as busy never pushes over the group of
        the run that holds the lock.
        """
        starting = isinstance(event, events.RunStarted)
        if starting and self._thread is None and not self._stop.is_set():
            self.start()

    def _push_loop(self) -> None:
        while not self._stop.wait(self.settings.push_interval_seconds):
            self.push()

    def push(self) -> bool:
        """PUT the current metrics to the Pushgateway (replacing the group). Never raises.

        Returns:
            True when the gateway accepted them (or no gateway is set).

        Side Effects:
            One HTTP PUT to the Pushgateway; a warning on stderr when it fails.
        """
        url = self.settings.pushgateway_url
        if url is None:
            return True
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_as_collector(_Exported(self._registry, {})))
        with self._push_lock:
            try:
                push_to_gateway(
                    url,
                    job=PUSH_JOB,
                    registry=registry,
                    grouping_key=self.grouping_key,
                    timeout=PUSH_TIMEOUT_SECONDS,
                )
            except OSError as exc:  # urllib's URLError and HTTPError are OSErrors
                # Metrics are for watching: a gateway that is down never fails a run.
                _log.warning("metrics push to the Pushgateway failed: %s", type(exc).__name__)
                return False
        return True

    def finish(self, root_stat: os.stat_result | None = None) -> None:
        """Stop progress pushes; push and write the final metrics. Never raises.

        Args:
            root_stat: stat of the os_root through the run's own descriptor,
                when the run holds it (the id then names exactly that directory).

        Side Effects:
            HTTP to the Pushgateway; writes a file in `textfile_dir`;
            warnings on stderr when either fails.
        """
        self.close()
        if root_stat is not None:
            self.os_root = os_root_id(root_stat)
        self.push()
        if self.settings.textfile_dir is not None:
            try:
                write_textfile(
                    self.settings.textfile_dir,
                    self.file_name,
                    render_exported(self._registry, self.grouping_key),
                )
            except (EnvironmentUnavailableError, PathError) as exc:
                _log.warning("metrics textfile not written: %s", exc)

    @property
    def file_name(self) -> str:
        """The textfile name: ``haios_<instance>_<os_root id>.prom``."""
        return f"haios_{self.instance}_{self.os_root}.prom"

    def close(self) -> None:
        """Stop the progress pushes (idempotent).

        Side Effects:
            Joins the push thread.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(PUSH_TIMEOUT_SECONDS * 2)
            self._thread = None


def write_textfile(directory: str, name: str, data: bytes) -> None:
    """Publish `data` as `directory/name` atomically, mode 0644, for node_exporter.

    The directory must be a real directory (not a symlink) owned by root or
    this process's user and not writable by group or others: anyone who can
    write there can forge the metrics the alerts read. The file is a
    temporary file created with ``O_EXCL|O_NOFOLLOW``, written, fsynced and
    renamed over `name`; then the directory is fsynced. node_exporter never
    sees a partial file.

    Args:
        directory: absolute path of the textfile-collector directory.
        name: the file name (no slash), ending in ``.prom``.
        data: the text exposition.

    Raises:
        EnvironmentUnavailableError: the directory is unsafe or a write failed.
        PathError: a directory was planted at the file's name.

    Side Effects:
        Creates, renames and fsyncs files in `directory`.
    """
    if "/" in name or not name.endswith(".prom") or name.startswith("."):
        msg = f"metrics textfile name {name!r} is not a plain .prom name"
        raise EnvironmentUnavailableError(msg)
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        msg = f"metrics textfile_dir {directory}: {exc.strerror or type(exc).__name__}"
        raise EnvironmentUnavailableError(msg) from exc
    try:
        st = os.fstat(dir_fd)
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            msg = (
                f"metrics textfile_dir {directory} must be owned by root and not writable "
                "by group or others"
            )
            raise EnvironmentUnavailableError(msg)
        write_atomically(dir_fd, name, data, mode=TEXTFILE_MODE, label=directory)
    finally:
        os.close(dir_fd)
