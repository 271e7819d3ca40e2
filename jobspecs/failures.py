"""The failure vocabulary: the one exception tree of lorajobs and the kind each failure is.

Every layer raises these and the queue stores their kinds, so they belong to the contract that
every layer reads (`lorajobs.jobspecs`, which imports nothing of ours). Subclasses say what went
wrong, not where. Each class carries its `FailureKind`, so classifying an exception is a lookup
(`classify`), not a list of isinstance checks kept somewhere else. `exit_code` is what the CLI
returns: 2 for bad input (nothing was changed), 1 for everything else.
"""

from __future__ import annotations

from enum import Enum


class FailureKind(str, Enum):
    """Why an attempt failed; decides whether a retry can help."""

    #: The job's own inputs are wrong (spec, dataset, base model): retrying cannot help.
    user = "user"
    #: The platform failed under it (node lost, preempted, out of capacity): retry and resume.
    infra = "infra"
    #: A bug in lorajobs itself: reported, not retried automatically.
    internal = "internal"

    def __str__(self) -> str:
        return self.value


class LoraJobsError(Exception):
    """Root of every error lorajobs raises on purpose; the CLI prints it as one line."""

    exit_code = 1
    kind = FailureKind.internal
    #: The node the attempt ran on is at fault (its environment or hardware, not the job): the
    #: controller keeps jobs off that node for a while and retries elsewhere.
    node_fault = False


class InvalidInput(LoraJobsError):
    """The user gave something unusable: a bad spec, file, argument or job id."""

    exit_code = 2
    kind = FailureKind.user


class SpecError(InvalidInput):
    """A job spec failed validation. Carries every problem found, not just the first."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        if len(problems) == 1:
            msg = f"{source}: {problems[0]}"
        else:
            msg = f"{source}: {len(problems)} errors:\n" + "\n".join(f"  {p}" for p in problems)
        super().__init__(msg)


class JobNotFound(InvalidInput):
    """No job matches the id (or prefix) given."""


class NotAuthenticated(InvalidInput):
    """No API token, or one that is unknown or revoked (HTTP 401)."""


class AccessDenied(InvalidInput):
    """The token is valid but its role may not do this (HTTP 403)."""


class InvalidTransition(LoraJobsError):
    """A status change was refused: the job was not in the state the caller expected."""


class StorageError(LoraJobsError):
    """Object storage failed: unreachable, refused, or a transfer broke off (after retries)."""

    kind = FailureKind.infra


class StorageAuthError(StorageError):
    """Object storage rejected the credentials or denied access."""

    exit_code = 2
    kind = FailureKind.user


class MissingCredentials(StorageAuthError):
    """No credentials for the bucket at all (as opposed to wrong ones). On the user's machine
    that is theirs to fix; on a worker node it is the node's environment (`NodeUnfit`)."""


class ObjectNotFound(StorageError):
    """A bucket, prefix or object that should exist does not."""

    kind = FailureKind.user


class IntegrityError(LoraJobsError):
    """Downloaded bytes do not match the digest recorded for them."""


class UserDataError(LoraJobsError):
    """The job's own inputs (dataset, base model) are missing or unusable: not retried."""

    kind = FailureKind.user


class NeedsCuda(UserDataError):
    """The spec asks for what only a CUDA GPU (with bitsandbytes, for its kernels) can run — a
    quantized base, an 8-bit optimizer — and this machine cannot: not retried, and in the CLI
    a usage error (exit 2), since the spec, not the data, has to change."""

    exit_code = 2


class Preempted(LoraJobsError):
    """The attempt stopped before the end (a SIGTERM preemption notice, or the stop test
    hook); its last checkpoint is in the bucket and the next attempt resumes from it."""

    kind = FailureKind.infra


def classify(err: BaseException) -> FailureKind:
    """The kind of failure `err` is: its class says so; anything we did not raise on purpose
    is a bug of ours."""
    return err.kind if isinstance(err, LoraJobsError) else FailureKind.internal


class ClusterUnavailable(LoraJobsError):
    """Ray (or another piece of the platform) could not be reached, after retries."""

    kind = FailureKind.infra


class NodeUnfit(LoraJobsError):
    """The node cannot run this attempt through no fault of the job: no usable GPU where the
    job asked for one, no credentials for the bucket. Retried on another node."""

    kind = FailureKind.infra
    node_fault = True


class GangLost(LoraJobsError):
    """A member of a multi-GPU gang was lost (its process or its node): the whole gang stopped,
    and the job resumes from its last checkpoint as a new attempt."""

    kind = FailureKind.infra
