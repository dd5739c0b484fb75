# SPDX-License-Identifier: Apache-2.0
"""The signer API is imported without the cloud signers' SDKs, and only through one module."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import haios
from haios._util import signer_api

HAIOS = Path(haios.__file__).parent


def _fresh(code: str) -> dict[str, object]:
    """Run `code` in a fresh interpreter; it prints one JSON document."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=120)
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_the_engine_loads_no_provider_sdk() -> None:
    loaded = _fresh(
        "import json, sys\n"
        "import haios.app, haios.engine, haios.signing, haios.verify.dsse\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{sorted({n.split('.')[0] for n in signer_api.PROVIDER_SDKS})!r})))\n"
    )
    assert loaded == []


def test_no_absence_mark_is_left_behind_and_the_vault_signer_loads_on_demand() -> None:
    result = _fresh(
        "import json, sys\n"
        "import haios._util.signer_api as api, haios.signing\n"
        "from securesystemslib.signer import SIGNER_FOR_URI_SCHEME, _vault_signer\n"
        "before = {'marks': [n for n in api.PROVIDER_SDKS if n in sys.modules],"
        " 'unavailable': _vault_signer.VAULT_IMPORT_ERROR is not None}\n"
        "cls = api.vault_signer()\n"
        "fresh = sys.modules[cls.__module__]\n"
        "after = {'hvac': 'hvac' in sys.modules, 'error': fresh.VAULT_IMPORT_ERROR,"
        " 'registered': SIGNER_FOR_URI_SCHEME['hv'] is cls, 'again': api.vault_signer() is cls}\n"
        "print(json.dumps({'before': before, 'after': after}))\n"
    )
    assert result == {
        "before": {"marks": [], "unavailable": True},
        "after": {"hvac": True, "error": None, "registered": True, "again": True},
    }


def test_an_sdk_imported_earlier_is_restored_as_it_was() -> None:
    result = _fresh(
        "import json, sys\n"
        "import botocore\n"
        "before = id(sys.modules['botocore'])\n"
        "import haios._util.signer_api\n"
        "print(json.dumps({'same': id(sys.modules['botocore']) == before}))\n"
    )
    assert result == {"same": True}


def test_local_keys_still_sign_and_verify() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    signer = signer_api.CryptoSigner(Ed25519PrivateKey.generate())
    signature = signer.sign(b"payload")
    signer.public_key.verify_signature(signature, b"payload")
    assert isinstance(signer.public_key, signer_api.SSlibKey)


def _direct_signer_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        found += [f"{path.relative_to(HAIOS)}: {n}" for n in names
                  if n.startswith(("securesystemslib.signer", "securesystemslib.dsse"))]
    return found


def test_only_the_signer_api_module_imports_the_signer_package() -> None:
    offenders = [hit for path in sorted(HAIOS.rglob("*.py"))
                 if path.name != "signer_api.py" for hit in _direct_signer_imports(path)]
    assert offenders == []
