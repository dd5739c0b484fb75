# SPDX-License-Identifier: Apache-2.0
"""securesystemslib's signer and DSSE API, without the cloud signers' SDKs.

`securesystemslib.signer` imports every signer it ships, and each of those
imports its vendor SDK whenever that SDK happens to be installed: boto3 and
botocore (AWS KMS), hvac (Vault transit), google-cloud-kms, azure, python-pkcs11,
keylet. On a host with boto3 that is over 100 ms of every `haios` start,
and code haios never calls loaded into a root process. haios signs with
local keys (`CryptoSigner`) and verifies `SSlibKey` signatures only.

So the signer package is imported once, here, with those SDK roots marked
absent in `sys.modules` (Python's documented way to make an import raise
ImportError). Each signer module catches that ImportError and records its
signer as unavailable, exactly as on a host without the SDK. The marks are
removed right after, so haios's own Vault client imports hvac normally.
If the package was imported before this module (a test process, a tool),
nothing is blocked and nothing changes. Every haios module takes the signer
and DSSE names from here (tests/unit/_util/test_signer_api.py holds to it).
"""

from __future__ import annotations

import sys
from typing import Final

#: the SDK roots securesystemslib.signer's provider modules try to import
PROVIDER_SDKS: Final = ("boto3", "botocore", "hvac", "google.cloud", "azure", "pkcs11", "keylet")


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

__all__ = ["CryptoSigner", "Envelope", "Key", "Signature", "Signer", "SSlibKey"]
