# SPDX-License-Identifier: Apache-2.0
"""The engine's signing key and everything it signs.

The key is named by a securesystemslib private key URI from the policy
(`file2:PATH`, or `hv:KEY/VERSION` for Vault transit so the key never
touches disk). At start the signer proves it matches the policy's engine
public key, or the run stops with exit 6. Signs: detached DSSE envelopes
for write-once files, embedded signatures for replaced files, classic
in-toto links. I/O only when loading the key (and in Vault for `hv:`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

from securesystemslib.exceptions import UnverifiedSignatureError, VerificationError

from haios._util.signer_api import Envelope, Signer, SSlibKey, signer_from_uri
from haios.errors import EngineKeyError
from haios.models.envelope import PAYLOAD_TYPE, PREDICATE_TYPE, STATEMENT_TYPE
from haios.verify.embedded import signed_bytes

_PROBE = b"haios engine key self-test"

#: what `EngineSigner.link` imports (lazily: in-toto's cost is its imports)
LINK_MODULES: Final = ("in_toto.models.link", "in_toto.models.metadata")


class EngineSigner:
    """Signs engine outputs with the operator's engine key."""

    def __init__(self, signer: Signer, public_key: SSlibKey) -> None:
        self._signer = signer
        self.public_key = public_key

    @classmethod
    def load(cls, uri: str, public_key: SSlibKey) -> EngineSigner:
        """Load the signer from `uri` and prove it matches `public_key`.

        Raises:
            EngineKeyError: unreadable, unsupported, or not the policy's key.

        Side Effects:
            Reads the key file, or contacts Vault for `hv:` URIs.
        """
        scheme = uri.split(":", 1)[0]
        try:
            signer = signer_from_uri(uri, public_key)
            signature = signer.sign(_PROBE)
            public_key.verify_signature(signature, _PROBE)
        except (UnverifiedSignatureError, VerificationError):
            raise EngineKeyError(f"engine key ({scheme}:) does not match the policy's "
                                 "engine public key") from None
        except Exception as exc:  # securesystemslib raises many types; all mean "no key"
            # `from None`: a Vault (hv:) error can carry response bodies; keep none of it.
            raise EngineKeyError(f"engine key ({scheme}:) cannot be loaded: "
                                 f"{type(exc).__name__}") from None
        return cls(signer, public_key)

    @property
    def keyid(self) -> str:
        """The engine key's securesystemslib key id."""
        return str(self.public_key.keyid)

    def sign_bytes(self, data: bytes) -> str:
        """Hex signature over `data`."""
        return str(self._signer.sign(data).signature)

    def embed(self, document: dict[str, Any]) -> dict[str, Any]:
        """`document` with a fresh embedded `signatures` list (contract section 5)."""
        body = {key: value for key, value in document.items() if key != "signatures"}
        body["signatures"] = [{"keyid": self.keyid, "sig": self.sign_bytes(signed_bytes(body))}]
        return body

    def detached(self, name: str, sha256: str) -> bytes:
        """A DSSE envelope over the haios signature Statement for one file."""
        statement = {
            "_type": STATEMENT_TYPE,
            "subject": [{"name": name, "digest": {"sha256": sha256}}],
            "predicateType": PREDICATE_TYPE,
            "predicate": {},
        }
        payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
        envelope = Envelope(payload, PAYLOAD_TYPE, {})
        envelope.sign(self._signer)
        document = envelope.to_dict()
        document["payload"] = base64.b64encode(payload).decode()
        return (json.dumps(document, sort_keys=True, indent=2) + "\n").encode()

    def link(
        self,
        step_id: str,
        command: Sequence[str],
        materials: Mapping[str, str],
        products: Mapping[str, str],
        environment: Mapping[str, Any],
        byproducts: Mapping[str, Any],
    ) -> bytes:
        """A classic in-toto link for one executed step, signed by the engine.

        Floats in `environment` and `byproducts` become integers when whole,
        decimal strings otherwise (in-toto's canonical JSON refuses floats).
        """
        from in_toto.models.link import Link  # lazy: in-toto's cost is its imports
        from in_toto.models.metadata import Metablock

        link = Link(
            name=step_id,
            command=list(command),
            materials={name: {"sha256": digest} for name, digest in materials.items()},
            products={name: {"sha256": digest} for name, digest in products.items()},
            byproducts=_canonical_safe(dict(byproducts)),
            environment=_canonical_safe(dict(environment)),
        )
        metablock = Metablock(signed=link)
        metablock.create_signature(self._signer)
        return (json.dumps(metablock.to_dict(), sort_keys=True, indent=1) + "\n").encode()


def _canonical_safe(value: Any) -> Any:
    """`value` with every float made encodable by OLPC canonical JSON."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else repr(value)
    if isinstance(value, dict):
        return {key: _canonical_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical_safe(item) for item in value]
    return value
