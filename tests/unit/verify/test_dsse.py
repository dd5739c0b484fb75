# SPDX-License-Identifier: Apache-2.0
"""DSSE role verification: thresholds of distinct keys, binding, confusion (B20-B29)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from haios.errors import DigestError, InputError, SignatureError, ThresholdError
from haios.verify.dsse import VerifiedStatement, verify_detached, verify_envelope
from tests.support.keys import KeyFile, b64, envelope, role, sign_bytes, statement

DATA = b"a,b\n1,2\n"
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyFile]:
    base: Path = tmp_path_factory.mktemp("keys")
    return {name: KeyFile(base, name) for name in ("k1", "k2", "k3", "other")} | {
        "ec": KeyFile(base, "ec", "ecdsa")}


def _detached(data: bytes, trusted: list[KeyFile], threshold: int = 1, name: str = "data.csv",
              sha: str = SHA) -> VerifiedStatement:
    return verify_detached(data, role("functionary", trusted, threshold), name=name, sha256=sha,
                           max_depth=32)


def _assert_verified(verified: VerifiedStatement, signers: list[KeyFile]) -> None:
    """The statement binds data.csv to its digest; exactly `signers` counted."""
    subject = verified.statement.subject[0]
    assert (len(verified.statement.subject), subject.name, subject.digest.sha256) == (
        1, "data.csv", SHA)
    assert verified.signers == frozenset(k.keyid for k in signers)


def test_valid_signature_returns_statement_and_signers(keys: dict[str, KeyFile]) -> None:
    verified = _detached(sign_bytes("data.csv", DATA, [keys["k1"]]), [keys["k1"]])
    _assert_verified(verified, [keys["k1"]])
    assert isinstance(verified.signers, frozenset)


def test_ecdsa_p256_is_supported(keys: dict[str, KeyFile]) -> None:
    verified = _detached(sign_bytes("data.csv", DATA, [keys["ec"]]), [keys["ec"]])
    _assert_verified(verified, [keys["ec"]])


def test_envelope_returns_the_exact_payload_and_signers(keys: dict[str, KeyFile]) -> None:
    payload = json.dumps(statement("data.csv", SHA)).encode()
    data = json.dumps(envelope(payload, [keys["k1"], keys["k2"]])).encode()
    verified = verify_envelope(data, role("planner", [keys["k1"], keys["k2"], keys["k3"]], 2),
                               label="x.sig", max_depth=32)
    assert verified.payload == payload
    assert verified.signers == frozenset({keys["k1"].keyid, keys["k2"].keyid})


def test_untrusted_signature_beside_a_trusted_one_is_ignored(keys: dict[str, KeyFile]) -> None:
    verified = _detached(sign_bytes("data.csv", DATA, [keys["other"], keys["k1"]]),
                         [keys["k1"], keys["k2"]])
    _assert_verified(verified, [keys["k1"]])


def test_untrusted_key_is_refused(keys: dict[str, KeyFile]) -> None:
    with pytest.raises(SignatureError):
        _detached(sign_bytes("data.csv", DATA, [keys["other"]]), [keys["k1"]])


def test_below_threshold_is_refused(keys: dict[str, KeyFile]) -> None:
    with pytest.raises(ThresholdError):
        _detached(sign_bytes("data.csv", DATA, [keys["k1"]]), [keys["k1"], keys["k2"]], 2)


def test_threshold_of_distinct_keys_passes(keys: dict[str, KeyFile]) -> None:
    verified = _detached(sign_bytes("data.csv", DATA, [keys["k1"], keys["k2"]]),
                         [keys["k1"], keys["k2"], keys["k3"]], 2)
    _assert_verified(verified, [keys["k1"], keys["k2"]])


def test_same_signature_twice_does_not_pad_a_threshold(keys: dict[str, KeyFile]) -> None:
    env = json.loads(sign_bytes("data.csv", DATA, [keys["k1"]]))
    env["signatures"].append(dict(env["signatures"][0]))
    with pytest.raises(ThresholdError):
        _detached(json.dumps(env).encode(), [keys["k1"], keys["k2"]], 2)
    # Below the threshold it verifies, counting the key once.
    _assert_verified(_detached(json.dumps(env).encode(), [keys["k1"], keys["k2"]]), [keys["k1"]])


def test_lying_keyid_never_counts_for_the_other_key(keys: dict[str, KeyFile]) -> None:
    env = json.loads(sign_bytes("data.csv", DATA, [keys["k1"]]))
    forged = dict(env["signatures"][0], keyid=keys["k2"].keyid)
    env["signatures"].append(forged)
    with pytest.raises(ThresholdError):
        _detached(json.dumps(env).encode(), [keys["k1"], keys["k2"]], 2)
    _assert_verified(_detached(json.dumps(env).encode(), [keys["k1"], keys["k2"]]), [keys["k1"]])


def test_missing_keyid_is_refused(keys: dict[str, KeyFile]) -> None:
    env = json.loads(sign_bytes("data.csv", DATA, [keys["k1"]]))
    del env["signatures"][0]["keyid"]
    with pytest.raises(InputError):
        _detached(json.dumps(env).encode(), [keys["k1"]])


@pytest.mark.parametrize("payload_type", ["application/json", "application/vnd.in-toto+JSON",
                                          "text/plain"])
def test_payload_type_confusion_is_refused(keys: dict[str, KeyFile], payload_type: str) -> None:
    payload = json.dumps(statement("data.csv", SHA)).encode()
    data = json.dumps(envelope(payload, [keys["k1"]], payload_type)).encode()
    with pytest.raises(SignatureError, match="payloadType"):
        _detached(data, [keys["k1"]])


def test_signature_over_raw_payload_not_pae_is_refused(keys: dict[str, KeyFile]) -> None:
    payload = json.dumps(statement("data.csv", SHA)).encode()
    sig = keys["k1"].signer.sign(payload)
    data = json.dumps({"payload": b64(payload), "payloadType": "application/vnd.in-toto+json",
                       "signatures": [{"keyid": sig.keyid,
                                       "sig": b64(bytes.fromhex(sig.signature))}]}).encode()
    with pytest.raises(SignatureError):
        _detached(data, [keys["k1"]])


def test_subject_swap_is_refused(keys: dict[str, KeyFile]) -> None:
    with pytest.raises(DigestError, match="signs 'other.csv'"):
        _detached(sign_bytes("other.csv", DATA, [keys["k1"]]), [keys["k1"]])


def test_digest_mismatch_is_refused(keys: dict[str, KeyFile]) -> None:
    with pytest.raises(DigestError):
        _detached(sign_bytes("data.csv", b"other", [keys["k1"]]), [keys["k1"]])


@pytest.mark.parametrize("mutate", [
    lambda s: s.update(_type="https://in-toto.io/Statement/v0.1"),
    lambda s: s.update(predicateType="https://example.com/other"),
    lambda s: s["subject"].append(dict(s["subject"][0])),
    lambda s: s["subject"][0].update(digest={"sha512": "00"}),
    lambda s: s.update(extra=1),
])
def test_malformed_statement_is_refused(keys: dict[str, KeyFile], mutate: object) -> None:
    st = statement("data.csv", SHA)
    mutate(st)  # type: ignore[operator]
    data = json.dumps(envelope(json.dumps(st).encode(), [keys["k1"]])).encode()
    with pytest.raises(InputError):
        _detached(data, [keys["k1"]])


def test_url_safe_base64_is_accepted(tmp_path: Path) -> None:
    # The statement's base64 never holds "+" or "/"; find a key whose signature does,
    # so the URL-safe form really differs from the standard one.
    for index in range(100):
        key = KeyFile(tmp_path, f"u{index}")
        env = json.loads(sign_bytes("data.csv", DATA, [key]))
        if {"+", "/"} & set(env["signatures"][0]["sig"]):
            break
    else:
        pytest.fail("no signature with '+' or '/' in 100 keys")
    raw = base64.b64decode(env["payload"])
    env["payload"] = base64.urlsafe_b64encode(raw).decode()
    sig = base64.urlsafe_b64encode(base64.b64decode(env["signatures"][0]["sig"])).decode()
    assert {"-", "_"} & set(sig)
    env["signatures"][0]["sig"] = sig
    _assert_verified(_detached(json.dumps(env).encode(), [key]), [key])


@pytest.mark.parametrize("bad", ["not base64!", "YWJj\n", "YWJjZA"])
def test_invalid_base64_is_refused(keys: dict[str, KeyFile], bad: str) -> None:
    env = json.loads(sign_bytes("data.csv", DATA, [keys["k1"]]))
    env["payload"] = bad
    with pytest.raises((InputError, SignatureError)):
        _detached(json.dumps(env).encode(), [keys["k1"]])


@pytest.mark.parametrize("data", [b"", b"{}", b'{"payload":"","payloadType":"x","signatures":[]}',
                                  b"[" * 100 + b"]" * 100])
def test_empty_or_malformed_envelopes_are_refused(keys: dict[str, KeyFile], data: bytes) -> None:
    with pytest.raises(InputError):
        verify_envelope(data, role("planner", [keys["k1"]]), label="x.sig", max_depth=32)


def test_duplicate_key_in_envelope_is_refused(keys: dict[str, KeyFile]) -> None:
    good = sign_bytes("data.csv", DATA, [keys["k1"]]).decode()
    doubled = good.replace('"payloadType":', '"payloadType": "text/plain", "payloadType":', 1)
    with pytest.raises(InputError, match="duplicate key"):
        _detached(doubled.encode(), [keys["k1"]])
