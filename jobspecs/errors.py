"""The one exception tree of lorajobs.

It lives in `jobspecs` because every other package imports `jobspecs` and `jobspecs` imports
neither of them. Subclasses say what went wrong, not where. `exit_code` is what the CLI returns:
2 for bad input (nothing was changed), 1 for everything else.
"""

from __future__ import annotations


class LoraJobsError(Exception):
    """Root of every error lorajobs raises on purpose; the CLI prints it as one line."""

    exit_code = 1


class InvalidInput(LoraJobsError):
    """The user gave something unusable: a bad spec, file, argument or job id."""

    exit_code = 2


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


class InvalidTransition(LoraJobsError):
    """A status change was refused: the job was not in the state the caller expected."""


class StorageError(LoraJobsError):
    """Object storage failed: unreachable, refused, or a transfer broke off."""


class StorageAuthError(StorageError):
    """Object storage rejected the credentials or denied access."""

    exit_code = 2


class ObjectNotFound(StorageError):
    """A bucket, prefix or object that should exist does not."""


class IntegrityError(LoraJobsError):
    """Downloaded bytes do not match the digest recorded for them."""


class UserDataError(LoraJobsError):
    """The job's own inputs (dataset, base model) are missing or unusable: not retried."""
