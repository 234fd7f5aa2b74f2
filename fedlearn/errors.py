"""Errors users see. Each names the problem and the fix; the CLI prints them without a traceback."""

from __future__ import annotations

from collections.abc import Sequence


class FedlearnError(Exception):
    """Base class for errors caused by input the user can fix."""


class ConfigError(FedlearnError):
    """One or more problems with a run configuration, all reported at once."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__(
            "invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems)
        )


class DataError(FedlearnError):
    """A dataset file is missing, corrupt or in an unexpected format."""


class FederationError(FedlearnError):
    """The federation cannot go on: too few nodes, or a round without any usable update."""


class RoundFailed(FederationError):
    """A round ended with no client update to aggregate; the run stops instead of going on unchanged."""


class AccessDenied(FedlearnError):
    """The access policy refuses a run (no valid operator signature) or a policy change."""


class PathError(FedlearnError):
    """A path given is missing, of the wrong kind (a file where a directory belongs), or cannot
    be written."""
