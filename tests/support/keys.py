# SPDX-License-Identifier: Apache-2.0
"""Test helpers: real keys, real DSSE envelopes, real in-toto links."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from securesystemslib.dsse import Envelope
from securesystemslib.signer import CryptoSigner, SSlibKey

from haios.load.keys import TrustedRole
from haios.models.envelope import PAYLOAD_TYPE, PREDICATE_TYPE, STATEMENT_TYPE


class KeyFile:
    """A private key on disk with its signer and public SSlibKey."""

    def __init__(self, directory: Path, name: str, algorithm: str = "ed25519") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        if algorithm == "ed25519":
            private = ed25519.Ed25519PrivateKey.generate()
            self.public = SSlibKey.from_crypto(private.public_key())
        else:
            private = ec.generate_private_key(ec.SECP256R1())  # type: ignore[assignment]
            self.public = SSlibKey.from_crypto(private.public_key(),
                                               scheme="ecdsa-sha2-nistp256")
        self.private_path = directory / f"{name}.pem"
        self.public_path = directory / f"{name}.pub.pem"
        self.private_path.write_bytes(private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        self.private_path.chmod(0o600)
        self.public_path.write_bytes(private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        self.signer = CryptoSigner.from_priv_key_uri(f"file2:{self.private_path}", self.public)

    @property
    def keyid(self) -> str:
        return str(self.public.keyid)


def role(name: str, keys: list[KeyFile], threshold: int = 1) -> TrustedRole:
    return TrustedRole(name, tuple(k.public for k in keys), threshold)


def statement(name: str, sha256: str) -> dict[str, Any]:
    return {"_type": STATEMENT_TYPE, "subject": [{"name": name, "digest": {"sha256": sha256}}],
            "predicateType": PREDICATE_TYPE, "predicate": {}}


def envelope(payload: bytes, signers: list[KeyFile], payload_type: str = PAYLOAD_TYPE
             ) -> dict[str, Any]:
    env = Envelope(payload, payload_type, {})
    for key in signers:
        env.sign(key.signer)
    return env.to_dict()  # type: ignore[no-any-return]


def sign_bytes(name: str, data: bytes, signers: list[KeyFile]) -> bytes:
    payload = json.dumps(statement(name, hashlib.sha256(data).hexdigest())).encode()
    return json.dumps(envelope(payload, signers)).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
