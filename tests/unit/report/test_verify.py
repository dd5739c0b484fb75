# SPDX-License-Identifier: Apache-2.0
"""Signature checks of the report: DSSE threshold and subject, embedded signatures."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
import rfc8785

from haios.errors import DigestError, InputError, SignatureError, ThresholdError
from haios.report.verify import verify_detached, verify_embedded
from tests.support.keys import KeyFile, envelope, sign_bytes, statement

DATA = b"a,b\n1,2\n"
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def keys(tmp_path: Path) -> list[KeyFile]:
    return [KeyFile(tmp_path, "k1"), KeyFile(tmp_path, "k2", "ecdsa"), KeyFile(tmp_path, "k3")]


def check(sig: bytes, keys: list[KeyFile], threshold: int = 1, name: str = "data.csv",
          sha: str = SHA) -> tuple[str, ...]:
    return verify_detached(sig, [k.public for k in keys], threshold, name=name,
                           data_sha256=sha, label="x.sig", max_depth=32).signers


def test_threshold_counts_distinct_trusted_keys(keys: list[KeyFile]) -> None:
    sig = sign_bytes("data.csv", DATA, keys[:2])
    assert set(check(sig, keys, 2)) == {keys[0].keyid, keys[1].keyid}
    with pytest.raises(ThresholdError):
        check(sig_one := sign_bytes("data.csv", DATA, keys[:1]), keys, 2)
    assert check(sig_one, keys[:1]) == (keys[0].keyid,)


def test_untrusted_signer_does_not_count(keys: list[KeyFile]) -> None:
    with pytest.raises(ThresholdError):
        check(sign_bytes("data.csv", DATA, [keys[2]]), keys[:2])


@pytest.mark.parametrize(("name", "sha", "error"), [("other.csv", SHA, DigestError),
                                                     ("data.csv", "0" * 64, DigestError)])
def test_subject_must_be_the_file_as_read(keys: list[KeyFile], name: str, sha: str,
                                          error: type[Exception]) -> None:
    with pytest.raises(error):
        check(sign_bytes("data.csv", DATA, keys[:1]), keys, name=name, sha=sha)


def test_wrong_payload_type_and_statement_are_refused(keys: list[KeyFile]) -> None:
    payload = json.dumps(statement("data.csv", SHA)).encode()
    with pytest.raises(SignatureError):
        check(json.dumps(envelope(payload, keys[:1], "text/plain")).encode(), keys)
    bad = statement("data.csv", SHA) | {"predicate": {"x": 1}}
    with pytest.raises(SignatureError):
        check(json.dumps(envelope(json.dumps(bad).encode(), keys[:1])).encode(), keys)


@pytest.mark.parametrize("raw", [b"[]", b'{"payload": 1, "payload": 2}', b"\xff", b"NaN"])
def test_hostile_envelope_bytes_are_refused(keys: list[KeyFile], raw: bytes) -> None:
    with pytest.raises((InputError, SignatureError)):
        check(raw, keys)


def test_tampered_payload_fails(keys: list[KeyFile]) -> None:
    document = json.loads(sign_bytes("data.csv", DATA, keys[:1]))
    payload = json.loads(base64.b64decode(document["payload"]))
    payload["subject"][0]["digest"]["sha256"] = "1" * 64
    document["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    with pytest.raises(ThresholdError):
        check(json.dumps(document).encode(), keys, sha="1" * 64)


def test_embedded_signature_over_rfc8785(keys: list[KeyFile]) -> None:
    body = {"schema": "x", "usd": 0.1, "steps": {"b": 1, "a": [1.5, None]}}
    sig = keys[0].signer.sign(rfc8785.dumps(body)).signature
    document = {**body, "signatures": [{"keyid": "f" * 64, "sig": "00"},
                                       {"keyid": keys[0].keyid, "sig": sig}]}
    verify_embedded(document, keys[0].public, label="state.json")
    with pytest.raises(SignatureError):
        verify_embedded({**document, "usd": 0.2}, keys[0].public, label="state.json")
    with pytest.raises(SignatureError):
        verify_embedded(document, keys[1].public, label="state.json")
