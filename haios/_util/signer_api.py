# SPDX-License-Identifier: Apache-2.0
"""securesystemslib's signer and DSSE API, without the cloud signers' SDKs.

`securesystemslib.signer` imports every signer it ships, and each of those
imports its vendor SDK whenever that SDK happens to be installed: boto3 and
botocore (AWS KMS), hvac (Vault transit), google-cloud-kms, azure,
python-pkcs11, keylet. On a host with boto3 that is about 140 ms of every
`haios` start, and code haios never calls loaded into a root process. haios
signs with a local key (`CryptoSigner`, `file2:`) or, when the policy says
so, a Vault transit key (`VaultSigner`, `hv:`), and verifies `SSlibKey`
signatures.

So the signer package is imported once, here, with those SDK roots marked
absent in `sys.modules` (Python's documented way to make an import raise
ImportError). Each signer module catches that ImportError and records its
signer as unavailable, exactly as on a host without the SDK. The marks are
removed right after. `signer_from_uri` loads the engine key; for an `hv:`
key it first re-runs the Vault signer's module, now with hvac importable,
and registers that fresh `VaultSigner` for the scheme. If the package was
imported before this module (a test process, a tool), nothing is blocked
and nothing changes. Every haios module takes the signer and DSSE names
from here (tests/unit/_util/test_signer_api.py holds to it).
"""

from __future__ import annotations

import importlib
import sys
from typing import Final

#: the SDK roots securesystemslib.signer's provider modules try to import
PROVIDER_SDKS: Final = ("boto3", "botocore", "hvac", "google.cloud", "azure", "pkcs11", "keylet")
VAULT_SCHEME: Final = "hv"


def _import_without_provider_sdks() -> None:
    if "securesystemslib.signer" in sys.modules:
        return
    present = {name: sys.modules[name] for name in PROVIDER_SDKS if name in sys.modules}
    for name in PROVIDER_SDKS:
        sys.modules[name] = None  # type: ignore[assignment]  # blocks the import
    try:
        import securesystemslib.signer  # noqa: F401  # the import being shaped
    finally:
        for name in PROVIDER_SDKS:
            if name in present:
                sys.modules[name] = present[name]
            elif sys.modules.get(name, 0) is None:
                del sys.modules[name]


_import_without_provider_sdks()

# Only after the import above: these would import the signer package themselves.
from securesystemslib.dsse import Envelope  # noqa: E402
from securesystemslib.signer import (  # noqa: E402
    CryptoSigner,
    Key,
    Signature,
    Signer,
    SSlibKey,
)

__all__ = ["CryptoSigner", "Envelope", "Key", "Signature", "Signer", "SSlibKey",
           "signer_from_uri", "vault_signer"]


def signer_from_uri(uri: str, public_key: Key) -> Signer:
    """`Signer.from_priv_key_uri`, with the Vault signer made usable first for `hv:`.

    Raises:
        Whatever securesystemslib raises for the URI (the caller maps it).

    Side Effects:
        For `hv:`, see `vault_signer`.
    """
    if uri.split(":", 1)[0] == VAULT_SCHEME:
        vault_signer()
    signer: Signer = Signer.from_priv_key_uri(uri, public_key)
    return signer


def vault_signer() -> type[Signer]:
    """securesystemslib's `VaultSigner`, with hvac, registered for `hv:`.

    Its module first ran with hvac marked absent and recorded the signer as
    unavailable; it is run again (importlib.reload, once) now that hvac
    imports, and the fresh class replaces the old one for the scheme. On a
    host without hvac the fresh class still says so when used.

    Side Effects:
        Imports hvac; re-runs securesystemslib.signer._vault_signer once.
    """
    from securesystemslib.signer import SIGNER_FOR_URI_SCHEME, _vault_signer

    if _vault_signer.VAULT_IMPORT_ERROR is not None:
        fresh = importlib.reload(_vault_signer)
        SIGNER_FOR_URI_SCHEME[VAULT_SCHEME] = fresh.VaultSigner
    signer_class: type[Signer] = SIGNER_FOR_URI_SCHEME[VAULT_SCHEME]
    return signer_class
