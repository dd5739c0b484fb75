# SPDX-License-Identifier: Apache-2.0
"""Stock in-toto verification of the engine's links under a generated layout.

The report writes the layout an auditor would write by hand: one step per
plan step that succeeded (the engine writes links for those only, ADR 0002),
the engine key as the only functionary (threshold 1), the plan's command,
and artifact rules from the plan: a material made by another step must
MATCH that step's product, a plan input is allowed (its digest, signature
and functionary link are checked separately), nothing else; each product is
CREATEd, nothing else. The layout is signed with a throwaway key made for
this one verification, and `in_toto.verifylib.in_toto_verify` checks it
against the link files' exact bytes, copied into a private temporary
directory (in-toto opens links by path and would follow a symlink planted
in os_root). Does I/O in a temporary directory it removes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from haios._util.signer_api import CryptoSigner, SSlibKey
from haios.errors import VerificationError
from haios.models.plan import PlanStep
from haios.report.verify import key_dict


def build_layout(steps: Sequence[PlanStep], inputs: set[str], producer: Mapping[str, str],
                 engine_key: SSlibKey) -> Any:
    """The in-toto Layout for `steps` (succeeded steps of the plan, in plan order)."""
    from in_toto.models.layout import Layout, Step

    layout = Layout()
    layout.set_relative_expiration(days=1)
    layout.keys = {engine_key.keyid: key_dict(engine_key)}
    layout.steps = []
    for step in steps:
        materials: list[list[str]] = []
        for name in step.materials:
            if name in inputs:
                materials.append(["ALLOW", name])
            else:
                materials.append(["MATCH", name, "WITH", "PRODUCTS", "FROM", producer[name]])
        materials.append(["DISALLOW", "*"])
        products = [["CREATE", name] for name in step.products] + [["DISALLOW", "*"]]
        layout.steps.append(Step(name=step.id, pubkeys=[engine_key.keyid], threshold=1,
                                 expected_command=list(step.run),
                                 expected_materials=materials, expected_products=products))
    layout.validate()
    return layout


def verify_with_layout(steps: Sequence[PlanStep], inputs: set[str],
                       producer: Mapping[str, str], engine_key: SSlibKey,
                       links: Mapping[str, bytes]) -> None:
    """Run `in_toto_verify` for `steps` over the given link bytes.

    Args:
        steps: the plan steps to lay out (each must have a link).
        inputs: the plan's input names.
        producer: product name -> id of the step that makes it.
        engine_key: the functionary key of every step.
        links: step id -> the exact bytes of its engine link (when it could be read).

    Raises:
        VerificationError: in-toto refused (any of its errors: missing link,
            bad signature, a rule violated), with in-toto's message.

    Side Effects:
        Writes the link bytes into a temporary directory and removes it.
    """
    from in_toto.models.metadata import Metablock
    from in_toto.verifylib import in_toto_verify

    private = ed25519.Ed25519PrivateKey.generate()
    owner = SSlibKey.from_crypto(private.public_key())
    try:
        layout = build_layout(steps, inputs, producer, engine_key)
        metablock = Metablock(signed=layout)
        metablock.create_signature(CryptoSigner(private, owner))
    except Exception as exc:  # in-toto raises many types; all mean "could not verify"
        raise VerificationError(f"layout: cannot be built ({type(exc).__name__}: "
                                f"{str(exc)[:200]})") from exc
    with tempfile.TemporaryDirectory(prefix="haios-report-") as directory:
        for step in steps:
            if step.id not in links:
                continue  # in-toto reports the missing link
            name = f"{step.id}.{engine_key.keyid[:8]}.link"
            fd = os.open(os.path.join(directory, name),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(links[step.id])
        try:
            in_toto_verify(metablock, {owner.keyid: key_dict(owner)}, link_dir_path=directory,
                           persist_inspection_links=False)
        except Exception as exc:  # in-toto raises many types; every one is a failure
            message = " ".join(str(exc).split())[:300]
            raise VerificationError(f"in-toto: {type(exc).__name__}: {message}") from exc
