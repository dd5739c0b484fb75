# SPDX-License-Identifier: Apache-2.0
"""The whole haios exception tree and the contract's exit codes.

Every exception that leaves a haios module subclasses `HaiosError`, and each
class carries the process exit code it maps to (contract section 2). Messages
are one line, name the file or field at fault, and never carry secret values.
No I/O.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_STEP_FAILED = 1
EXIT_USAGE = 2
EXIT_REJECTED = 3
EXIT_KILLED = 4
EXIT_BUDGET = 5
EXIT_ENVIRONMENT = 6
EXIT_BUSY = 7
EXIT_INTERNAL = 70


class HaiosError(Exception):
    """Base of every haios error; `exit_code` is the contract's exit code."""

    exit_code: int = EXIT_INTERNAL
    #: a short, stable, low-cardinality reason label (metrics and audit)
    reason: str = "internal"


# -- 1: a step ran and failed -------------------------------------------------


class StepFailedError(HaiosError):
    """A step ran and failed (or timed out); the plan halted."""

    exit_code = EXIT_STEP_FAILED
    reason = "step_failed"


# -- 3: rejected, nothing ran --------------------------------------------------


class InputError(HaiosError):
    """An input from os_root breaks the contract (type, size, path, encoding)."""

    exit_code = EXIT_REJECTED
    reason = "input"


class SchemaError(InputError):
    """A file parsed but does not match its model (unknown field, bad value)."""

    reason = "schema"


class PathError(InputError):
    """A path in os_root is a symlink, special file, or otherwise unsafe."""

    reason = "path"


class VerificationError(HaiosError):
    """An attestation did not verify (signature, threshold, digest, link).

    Anything that prevents verification from running is also this error:
    an unknown failure counts as a denial.
    """

    exit_code = EXIT_REJECTED
    reason = "verification"


class SignatureError(VerificationError):
    """A signature is missing, malformed, or does not verify."""

    reason = "signature"


class ThresholdError(SignatureError):
    """Fewer distinct trusted keys signed than the role's threshold."""

    reason = "threshold"


class DigestError(VerificationError):
    """A file's SHA-256 differs from the digest it is bound to."""

    reason = "digest"


class LinkError(VerificationError):
    """No trusted in-toto link vouches for an input."""

    reason = "link"


class ExpiredError(VerificationError):
    """The plan's `expires` time has passed."""

    reason = "expired"


class ReplayError(VerificationError):
    """A plan or state does not belong to the history held in os_root."""

    reason = "replay"


class TamperedError(VerificationError):
    """An engine-written file does not verify against the engine key."""

    reason = "tampered"


class PolicyDeniedError(HaiosError):
    """The plan asks for something the policy does not allow."""

    exit_code = EXIT_REJECTED
    reason = "policy_denied"


# -- 4: kill switch -------------------------------------------------------------


class KilledError(HaiosError):
    """A kill switch engaged, or was set before the run started."""

    exit_code = EXIT_KILLED
    reason = "killed"


# -- 5: budget ------------------------------------------------------------------


class BudgetExhaustedError(HaiosError):
    """A budget dimension was consumed; the plan halted."""

    exit_code = EXIT_BUDGET
    reason = "budget_exhausted"


# -- 6: environment unavailable, nothing ran ------------------------------------


class EnvironmentUnavailableError(HaiosError):
    """The engine cannot build a safe environment to run in."""

    exit_code = EXIT_ENVIRONMENT
    reason = "environment"


class PolicyLoadError(EnvironmentUnavailableError):
    """The policy folder is missing, unreadable or invalid."""

    reason = "policy"


class SandboxSetupError(EnvironmentUnavailableError):
    """The sandbox a profile asks for cannot be built here."""

    reason = "sandbox"


class CopyError(EnvironmentUnavailableError):
    """A copy could not be written (the destination is full or out of inodes)."""

    reason = "copy_failed"


class VaultUnavailableError(EnvironmentUnavailableError):
    """Vault/OpenBao is unreachable or the engine token cannot issue tokens."""

    reason = "vault"


class EngineKeyError(EnvironmentUnavailableError):
    """The engine's signing key cannot be loaded or does not match the policy."""

    reason = "engine_key"


class WatchdogLostError(EnvironmentUnavailableError):
    """The watchdog process died; the engine killed every step and stopped."""

    reason = "watchdog_lost"


# -- 7: busy --------------------------------------------------------------------


class BusyError(HaiosError):
    """Another `haios run` holds the os_root lock."""

    exit_code = EXIT_BUSY
    reason = "busy"


# -- 70: a bug ------------------------------------------------------------------


class InternalError(HaiosError):
    """A bug or an unexpected exception."""

    exit_code = EXIT_INTERNAL
    reason = "internal"
