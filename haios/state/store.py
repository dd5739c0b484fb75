# SPDX-License-Identifier: Apache-2.0
"""Reading and publishing the engine-signed state.json and registry_map.json.

Writes are atomic (SafeDir.write_atomic) and each file carries its engine
signature inside, so a crash leaves the previous or the next valid file.
Reads verify the signature before the content is trusted. Does I/O.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

from haios._util.safedir import SafeDir
from haios._util.signer_api import SSlibKey
from haios._util.strict_json import dump_json
from haios.errors import InputError, TamperedError
from haios.load.parse import parse_json_bytes, validate_model
from haios.models.policy import JSON_MAX_DEPTH
from haios.signing import EngineSigner
from haios.verify.embedded import verify_embedded

STATE_MAX_BYTES = 16 << 20
M = TypeVar("M", bound=BaseModel)


def read_signed(directory: SafeDir, name: str, model: type[M], key: SSlibKey) -> M | None:
    """Load `name` if present, verify its embedded engine signature, validate.

    Returns:
        The model, or None when the file does not exist.

    Raises:
        TamperedError: it exists but is unreadable, malformed or not signed by `key`.
    """
    found = read_signed_document(directory, name, model, key)
    return None if found is None else found[0]


def read_signed_document(directory: SafeDir, name: str, model: type[M], key: SSlibKey
                         ) -> tuple[M, dict[str, Any]] | None:
    """As `read_signed`, also returning the verified JSON object itself (read once).

    Raises:
        TamperedError: as `read_signed`.
    """
    if directory.lstat(name) is None:
        return None
    try:
        data = directory.read_bytes(name, max_bytes=STATE_MAX_BYTES)
        document = parse_json_bytes(data, label=name, max_depth=JSON_MAX_DEPTH)
        if not isinstance(document, dict):
            raise TamperedError(f"{name}: not a JSON object")
        verify_embedded(document, key, label=name)
        return validate_model(model, document, label=name), document
    except TamperedError:
        raise
    except InputError as exc:
        raise TamperedError(f"{name}: {exc}") from exc


def write_signed(directory: SafeDir, name: str, model: BaseModel, signer: EngineSigner
                 ) -> dict[str, Any]:
    """Sign `model` (embedded) and publish it atomically as `name`; return what was written.

    Side Effects:
        Atomic replace of `name` in `directory` (temp, fsync, rename, fsync dir).
    """
    document = signer.embed(model.model_dump(mode="json", by_alias=True))
    directory.write_atomic(name, dump_json(document))
    return document
