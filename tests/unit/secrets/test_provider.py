# SPDX-License-Identifier: Apache-2.0
"""ScopeGrant invariants and IssuedToken hygiene (threats T-V01, T-V03)."""

from __future__ import annotations

import base64
import copy
import os
import pickle
import urllib.parse
from pathlib import PurePosixPath

import pytest

from haios.errors import InternalError, PolicyLoadError
from haios.sandbox.spec import VIEW_TOKEN_FILE
from haios.secrets import TOKEN_FILE_NAME, IssuedToken, ScopeGrant
from haios.secrets.provider import REDACTED, effective_ttl_seconds

TOKEN = "s.Zk3JvQq0pH1xW8nYtB7cLmRa"


@pytest.mark.parametrize(
    ("policies", "ttl", "uses"),
    [
        pytest.param((), 60, 0, id="no-policy-would-inherit-the-engine-policies"),
        pytest.param(("root",), 60, 0, id="root"),
        pytest.param(("default",), 60, 0, id="default-policy"),
        pytest.param(("a", "a"), 60, 0, id="duplicate"),
        pytest.param(("",), 60, 0, id="blank"),
        pytest.param((" a",), 60, 0, id="edge-space"),
        pytest.param(("haios-*",), 60, 0, id="wildcard"),
        pytest.param(("a",), 0, 0, id="zero-ttl"),
        pytest.param(("a",), -5, 0, id="negative-ttl"),
        pytest.param(("a",), True, 0, id="bool-ttl"),
        pytest.param(("a",), 60, -1, id="negative-uses"),
    ],
)
def test_scope_grant_that_would_widen_the_token_is_refused(
    policies: tuple[str, ...], ttl: int, uses: int
) -> None:
    with pytest.raises(PolicyLoadError, match="invalid vault scope"):
        ScopeGrant(policies=policies, ttl_seconds=ttl, num_uses=uses)


def test_scope_grant_accepts_the_contract_example() -> None:
    grant = ScopeGrant(policies=("haios-reports-read",), ttl_seconds=120, num_uses=0)
    assert grant.policies == ("haios-reports-read",)
    assert hash(grant) == hash(ScopeGrant(("haios-reports-read",), 120, 0))


@pytest.mark.parametrize(("bound", "expected"), [(1, 1), (60, 60), (119, 119), (3600, 120)])
def test_token_ttl_is_bounded_by_scope_and_caller(bound: int, expected: int) -> None:
    assert effective_ttl_seconds(ScopeGrant(("a",), 120), bound) == expected


@pytest.mark.parametrize("bound", [0, -1])
def test_token_ttl_bound_below_one_second_is_a_bug(bound: int) -> None:
    with pytest.raises(InternalError):
        effective_ttl_seconds(ScopeGrant(("a",), 120), bound)


def test_issued_token_never_shows_in_repr_str_or_format() -> None:
    issued = IssuedToken("acc123", TOKEN, 60)
    for text in (repr(issued), str(issued), f"{issued}", f"{issued!r}", "%s" % issued):  # noqa: UP031
        assert TOKEN not in text
        assert "acc123" in text
    assert not hasattr(issued, "__dict__")  # no vars() / asdict() route to the token


def test_issued_token_cannot_be_pickled_or_copied() -> None:
    issued = IssuedToken("acc", TOKEN, 60)
    with pytest.raises(TypeError):
        pickle.dumps(issued)
    with pytest.raises(TypeError):
        copy.copy(issued)
    with pytest.raises(TypeError):
        copy.deepcopy(issued)


@pytest.mark.parametrize("bad", ["", "s.a b", "s.a\n", "s.é", " s.a"])
def test_issued_token_refuses_tokens_that_break_the_file_format(bad: str) -> None:
    with pytest.raises(InternalError) as caught:
        IssuedToken("acc", bad, 60)
    assert bad.strip() == "" or bad.strip() not in str(caught.value)


def test_issued_token_writes_the_token_alone(tmp_path: PurePosixPath) -> None:
    path = f"{tmp_path}/t"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        IssuedToken("acc", TOKEN, 60).write_to(fd)
    finally:
        os.close(fd)
    with open(path, "rb") as handle:
        assert handle.read() == TOKEN.encode()


def test_redact_masks_every_encoding_the_leak_scan_uses() -> None:
    raw = TOKEN.encode()
    forms = [
        raw,
        base64.b64encode(raw),
        base64.urlsafe_b64encode(raw).rstrip(b"="),
        raw.hex().encode(),
        raw.hex().upper().encode(),
        urllib.parse.quote(TOKEN, safe="").encode(),
    ]
    issued = IssuedToken("acc", TOKEN, 60)
    for form in forms:
        text = b"before " + form + b" after"
        assert issued.appears_in(text)
        masked = issued.redact(text)
        assert masked == b"before " + REDACTED + b" after"
        assert not issued.appears_in(masked)
    assert issued.redact(b"nothing here") == b"nothing here"


def test_token_file_name_matches_the_step_view() -> None:
    assert PurePosixPath(VIEW_TOKEN_FILE).name == TOKEN_FILE_NAME
