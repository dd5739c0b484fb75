# SPDX-License-Identifier: Apache-2.0
"""Admission: the one call that turns what the client wrote into a verified run.

`admit` runs every check of contract sections 3 to 5 in the order each
depends on, and returns a `VerifiedRun`: a frozen value that only this
module can build (its constructor refuses any other caller), so code that
holds one knows every check passed, in the spirit of TUF's trusted set.

1. The plan's bytes are read once, capped; everything below reads those bytes.
2. The planner's DSSE signatures over them meet the policy's threshold;
   the plan parses strictly; it has not expired and does not expire
   further ahead than the policy allows.
3. The plan fits the policy (profiles, scopes, limits, step count).
4. History: the signed state (if any) belongs to this plan; no replay of
   an older plan or state.
5. Engine paths: no link or signature under the engine's name that the
   engine did not write; on a first run, no product exists yet.
6. On a resume, the products of succeeded steps are verified again
   (signature, link) and copied into the fresh store.
7. Every input: digest, `.sig` and functionary link, copied once into the
   store and the copy hashed.

Raises a HaiosError with exit 3 for anything that does not verify; the
caller records the refusal. Does I/O (reads os_root, fills the store).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import types
from collections.abc import Mapping
from typing import Final

from haios import events as ev
from haios._util.safedir import SafeDir
from haios.area import RunArea
from haios.decide.plan_policy import decide_plan
from haios.history import History, check_engine_paths, check_fresh_outputs, verify_outputs
from haios.intake import StoredArtefact, verify_inputs, verify_plan
from haios.load.policy import Policy
from haios.models.plan import ExecPlan
from haios.models.state import RunState
from haios.osroot import OsRoot

_MINT: Final = object()


@dataclasses.dataclass(frozen=True)
class VerifiedRun:
    """A plan and its artefacts after every admission check passed.

    Attributes:
        plan: the plan, parsed from the bytes whose signatures verified.
        plan_sha256: the digest of those bytes.
        prior: the signed state of an earlier run of this plan, or None.
        store: the engine's private store holding the verified copies.
        artefacts: name -> the verified copy (inputs, and on a resume the
            products of succeeded steps); read-only.
    """

    plan: ExecPlan
    plan_sha256: str
    prior: RunState | None
    store: SafeDir
    artefacts: Mapping[str, StoredArtefact]
    _mint: object = dataclasses.field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._mint is not _MINT:
            raise TypeError("a VerifiedRun is made only by haios.admission.admit")


def admit(osr: OsRoot, area: RunArea, policy: Policy, history: History, raw: bytes,
          now: dt.datetime, bus: ev.EventBus) -> VerifiedRun:
    """Verify the plan in `raw` and everything it names; see the module docstring.

    Raises:
        HaiosError: exit 3 for what does not verify (the store is dropped).
    """
    verified = verify_plan(osr, policy, raw, now, bus)                  # (2)
    plan = verified.plan
    decide_plan(plan, policy)                                           # (3)
    prior = history.prior_for(verified.sha256)                          # (4)
    engine_keyid = policy.engine_key.keyid
    check_engine_paths(osr, plan, engine_keyid)                         # (5)
    store = area.fresh_store()
    try:
        artefacts: dict[str, StoredArtefact] = {}
        if prior is None:
            check_fresh_outputs(osr, plan, engine_keyid, state_allowed=history.state is not None)
        else:
            artefacts.update(verify_outputs(osr, policy, plan, prior, store))  # (6)
        artefacts.update(verify_inputs(osr, policy, plan, store, engine_keyid, bus))  # (7)
    except BaseException:
        store.close()
        area.drop_store()
        raise
    return VerifiedRun(plan, verified.sha256, prior, store,
                       types.MappingProxyType(artefacts), _MINT)
