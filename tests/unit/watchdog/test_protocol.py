# SPDX-License-Identifier: Apache-2.0
"""Unit tests of haios.watchdog.protocol: strict JSON lines both ways."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from haios.errors import InternalError
from haios.watchdog import protocol

EXAMPLES: list[protocol.Message] = [
    protocol.Config(
        version=1,
        run_id="r1",
        control_dir="/r/control",
        extra_paths=("/run/haios/KILL",),
        journal_path="/var/lib/haios/j",
        run_cgroup="/sys/fs/cgroup/haios/haios-r1",
        poll_interval_seconds=0.02,
        use_inotify=True,
    ),
    protocol.Register(step_id="s1", cgroup="/sys/fs/cgroup/haios/haios-r1/step-s1"),
    protocol.Unregister(step_id="s1"),
    protocol.Shutdown(),
    protocol.Ready(pid=42, inotify=False),
    protocol.Failed(reason="no"),
    protocol.Registered(step_id="s1"),
    protocol.Refused(step_id="s1", reason="no"),
    protocol.Engaged(scope="global", flag="/r/control/KILL", step_id=None),
    protocol.Engaged(scope="step", flag="/r/control/KILL.s1", step_id="s1"),
    protocol.Killed(
        scope="engine_lost",
        flag=None,
        step_id="s1",
        latency_seconds=0.001,
        complete=True,
        cpu_seconds=None,
    ),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.TYPE)
def test_every_message_round_trips(message: protocol.Message) -> None:
    line = protocol.encode(message)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert protocol.decode(line) == message


def test_every_message_type_has_an_example() -> None:
    assert {m.TYPE for m in EXAMPLES} == set(protocol._CLASSES)


def test_integer_latency_is_accepted_as_float() -> None:
    line = (
        b'{"type":"killed","scope":"step","flag":"f","step_id":"s1",'
        b'"latency_seconds":0,"complete":true,"cpu_seconds":1}'
    )
    message = protocol.decode(line)
    assert isinstance(message, protocol.Killed)
    assert message.latency_seconds == 0.0


REJECTED = {
    "duplicate_key": b'{"type":"unregister","step_id":"a","step_id":"b"}',
    "nan": b'{"type":"killed","scope":"step","flag":null,"step_id":"s","latency_seconds":NaN,'
    b'"complete":true,"cpu_seconds":null}',
    "infinity": b'{"type":"ready","pid":Infinity,"inotify":true}',
    "huge_float": b'{"type":"killed","scope":"step","flag":null,"step_id":"s",'
    b'"latency_seconds":1e400,"complete":true,"cpu_seconds":null}',
    "unknown_type": b'{"type":"exec","argv":["/bin/sh"]}',
    "no_type": b'{"step_id":"s1"}',
    "missing_field": b'{"type":"register","step_id":"s1"}',
    "extra_field": b'{"type":"unregister","step_id":"s1","force":true}',
    "bool_as_int": b'{"type":"ready","pid":true,"inotify":true}',
    "int_as_bool": b'{"type":"ready","pid":1,"inotify":1}',
    "string_as_float": b'{"type":"killed","scope":"step","flag":null,"step_id":"s",'
    b'"latency_seconds":"1","complete":true,"cpu_seconds":null}',
    "null_not_allowed": b'{"type":"unregister","step_id":null}',
    "list_of_non_strings": b'{"type":"config","version":1,"run_id":"r","control_dir":"/c",'
    b'"extra_paths":[1],"journal_path":"/j","run_cgroup":"/g","poll_interval_seconds":0.1,'
    b'"use_inotify":true}',
    "unknown_scope": b'{"type":"engaged","scope":"all","flag":"f","step_id":null}',
    "engine_lost_is_not_a_flag_scope": b'{"type":"engaged","scope":"engine_lost","flag":"f",'
    b'"step_id":null}',
    "negative_latency": b'{"type":"killed","scope":"step","flag":null,"step_id":"s",'
    b'"latency_seconds":-1,"complete":true,"cpu_seconds":null}',
    "wrong_version": b'{"type":"config","version":2,"run_id":"r","control_dir":"/c",'
    b'"extra_paths":[],"journal_path":"/j","run_cgroup":"/g","poll_interval_seconds":0.1,'
    b'"use_inotify":true}',
    "not_an_object": b'["type","shutdown"]',
    "not_utf8": b'{"type":"failed","reason":"\xff"}',
    "not_json": b"shutdown",
    "too_long": b'{"type":"failed","reason":"' + b"x" * protocol.MAX_LINE_BYTES + b'"}',
}


@pytest.mark.parametrize("line", list(REJECTED.values()), ids=list(REJECTED))
def test_malformed_lines_are_refused(line: bytes) -> None:
    with pytest.raises(InternalError):
        protocol.decode(line)


def test_non_finite_values_are_never_sent() -> None:
    message = protocol.Killed(
        scope="step",
        flag=None,
        step_id="s",
        latency_seconds=float("nan"),
        complete=True,
        cpu_seconds=None,
    )
    with pytest.raises(InternalError):
        protocol.encode(message)


def test_oversized_messages_are_never_sent() -> None:
    with pytest.raises(InternalError):
        protocol.encode(protocol.Failed(reason="x" * protocol.MAX_LINE_BYTES))


@given(st.binary(max_size=512))
def test_decode_of_arbitrary_bytes_raises_only_internal_error(data: bytes) -> None:
    with contextlib.suppress(InternalError):
        protocol.decode(data)


@given(
    st.dictionaries(
        st.sampled_from(["type", "step_id", "cgroup", "pid", "inotify", "reason", "x"]),
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    )
)
def test_decode_of_arbitrary_objects_raises_only_internal_error(body: dict[str, object]) -> None:
    import json

    with contextlib.suppress(InternalError):
        protocol.decode(json.dumps(body).encode())
