# SPDX-License-Identifier: Apache-2.0
"""Read and verify the client's inputs: the plan, inbox artefacts, links.

The plan is read once; its signature is verified over those exact bytes
and only then is the same buffer parsed (no TOCTOU on the plan). Each
input is copied once into the engine's private store and the *copy* is
hashed and checked three ways (plan digest, functionary `.sig`, functionary
link), so what a step later receives is exactly what was verified. Does I/O
on os_root; publishes a `verification` event per check.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import datetime as dt
import hashlib
import os
from collections.abc import Iterator

from haios import events as ev
from haios._util.safedir import SafeDir, copy_chunk, sha256_fd
from haios.errors import (
    CopyError,
    DigestError,
    ExpiredError,
    HaiosError,
    InputError,
    VerificationError,
)
from haios.load.parse import parse_model
from haios.load.policy import Policy
from haios.models.common import parse_rfc3339
from haios.models.plan import ExecPlan, PlanInput
from haios.osroot import PLAN_FILE, PLAN_SIG, OsRoot
from haios.verify.dsse import verify_detached
from haios.verify.links import collect_vouched, require_vouched

HASH_THREADS = max(1, min(4, os.cpu_count() or 1))
PARALLEL_INPUTS = 16


@dataclasses.dataclass(frozen=True)
class VerifiedPlan:
    """A plan whose signature verified over exactly `raw`."""

    plan: ExecPlan
    sha256: str


@dataclasses.dataclass(frozen=True)
class StoredArtefact:
    """A verified artefact held in the engine's private store."""

    name: str
    sha256: str
    size: int
    origin: str
    signers: tuple[str, ...]


def _publish(bus: ev.EventBus, kind: str, ok: bool, subject: str) -> None:
    bus.publish(ev.Verification(kind=kind, result="ok" if ok else "fail", subject=subject))


def read_plan_bytes(osr: OsRoot, policy: Policy) -> bytes:
    """The plan file's bytes, capped by the policy."""
    return osr.root.read_bytes(PLAN_FILE, max_bytes=policy.file.limits.plan_max_bytes)


def verify_plan(osr: OsRoot, policy: Policy, raw: bytes, now: dt.datetime,
                bus: ev.EventBus) -> VerifiedPlan:
    """Verify the planner's signature over `raw`, then parse and check expiry.

    Raises:
        VerificationError subclasses, InputError, SchemaError: exit 3.
    """
    limits = policy.file.limits
    digest = hashlib.sha256(raw).hexdigest()
    try:
        sig = osr.root.read_bytes(PLAN_SIG, max_bytes=limits.sig_max_bytes)
        verify_detached(sig, policy.planner, name=PLAN_FILE, sha256=digest,
                        max_depth=limits.json_max_depth)
    except HaiosError:
        _publish(bus, "plan", False, PLAN_FILE)
        raise
    _publish(bus, "plan", True, PLAN_FILE)
    plan = parse_model(ExecPlan, raw, label=PLAN_FILE, max_depth=limits.json_max_depth)
    expires = parse_rfc3339(plan.expires)
    if expires <= now:
        raise ExpiredError(f"{PLAN_FILE}: expired at {plan.expires}")
    if expires - now > dt.timedelta(days=limits.expires_max_days):
        raise InputError(f"{PLAN_FILE}: expires more than {limits.expires_max_days} days ahead")
    return VerifiedPlan(plan, digest)


def copy_into(source: SafeDir, name: str, store: SafeDir, *, max_bytes: int) -> tuple[str, int]:
    """Copy `source/name` into `store/name` once; return (sha256, size) of the copy.

    The copy is made in-kernel and then hashed from the copy itself, so
    the engine never trusts bytes it did not hash.

    Raises:
        CopyError: the destination refused the bytes (full, out of inodes).

    Side Effects:
        Replaces `store/name`.
    """
    fd, size = source.open_regular(name, max_bytes=max_bytes)
    try:
        store.unlink(name)
        try:
            out = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o444, dir_fd=store.fd)
        except OSError as exc:
            raise CopyError(f"{store.label}/{name}: cannot create the copy ({exc.strerror})"
                            ) from exc
        try:
            copied = 0
            while copied < size:
                try:
                    n = copy_chunk(fd, out, size - copied)
                except OSError as exc:
                    raise CopyError(f"{store.label}/{name}: cannot write the copy "
                                    f"({exc.strerror})") from exc
                if n == 0:
                    break
                copied += n
            if os.read(fd, 1):
                raise InputError(f"{source.label}/{name}: grew while being copied")
            if copied != size:
                raise InputError(f"{source.label}/{name}: shrank while being copied")
            return sha256_fd(out, copied), copied
        finally:
            os.close(out)
    finally:
        os.close(fd)


def _link_files(osr: OsRoot, policy: Policy, engine_keyid: str) -> Iterator[tuple[str, bytes]]:
    links = osr.optional_sub("links")
    if links is None:
        return
    names = [n for n in links.names() if n.endswith(".link")]
    if len(names) > policy.file.limits.links_max_files:
        raise InputError(f"links/: more than {policy.file.limits.links_max_files} link files")
    suffix = f".{engine_keyid[:8]}.link"
    for name in names:
        if name.endswith(suffix):
            continue  # the engine's own links are checked with the engine outputs
        yield f"links/{name}", links.read_bytes(name, max_bytes=policy.file.limits.link_max_bytes)


def verify_inputs(osr: OsRoot, policy: Policy, plan: ExecPlan, store: SafeDir,
                  engine_keyid: str, bus: ev.EventBus) -> dict[str, StoredArtefact]:
    """Copy every plan input into `store` and verify it three ways.

    Raises:
        DigestError, SignatureError, LinkError, PathError, InputError: exit 3.
    """
    if not plan.inputs:
        return {}
    limits = policy.file.limits
    inbox = osr.sub("inbox")
    try:
        vouched = collect_vouched(_link_files(osr, policy, engine_keyid), policy.functionary,
                                  max_depth=limits.json_max_depth)
    except HaiosError:
        _publish(bus, "link", False, "links/")
        raise
    verified: dict[str, StoredArtefact] = {}
    def copy(item: PlanInput) -> tuple[str, int]:
        return copy_into(inbox, item.name, store, max_bytes=limits.product_max_bytes)

    # Copy and hash in parallel when there are many inputs (hashlib releases
    # the GIL); a pool costs more than it saves for a handful. Check in plan order.
    if len(plan.inputs) >= PARALLEL_INPUTS:
        with cf.ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
            copies = list(pool.map(copy, plan.inputs))
    else:
        copies = [copy(item) for item in plan.inputs]
    for item, (digest, size) in zip(plan.inputs, copies, strict=True):
        if digest != item.sha256:
            _publish(bus, "digest", False, item.name)
            raise DigestError(f"inbox/{item.name}: SHA-256 differs from the plan's digest")
        _publish(bus, "digest", True, item.name)
        try:
            sig = inbox.read_bytes(f"{item.name}.sig", max_bytes=limits.sig_max_bytes)
            signature = verify_detached(sig, policy.functionary, name=item.name, sha256=digest,
                                        max_depth=limits.json_max_depth)
        except HaiosError:
            _publish(bus, "artefact", False, item.name)
            raise
        _publish(bus, "artefact", True, item.name)
        try:
            require_vouched(vouched, item.name, digest)
        except VerificationError:
            _publish(bus, "link", False, item.name)
            raise
        _publish(bus, "link", True, item.name)
        verified[item.name] = StoredArtefact(item.name, digest, size, "input",
                                             tuple(sorted(signature.signers)))
    return verified

