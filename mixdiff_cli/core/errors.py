"""Typed errors. Library code raises these; the CLI prints `message` and `hint` on one line and exits."""

from __future__ import annotations


class MixdiffError(Exception):
    """An error the user can act on: what is wrong (`message`) and what to do (`hint`)."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}. {self.hint[:1].upper()}{self.hint[1:]}" if self.hint else self.message


class UsageError(MixdiffError):
    """Bad command-line usage (exit 2)."""

    exit_code = 2


class CatalogNotFound(MixdiffError):
    pass


class CatalogError(MixdiffError):
    """The catalog file is not valid YAML or does not follow the schema."""


class ReadOnlyCatalog(CatalogError):
    """A write aimed at the packaged demo (mixdiff never modifies its own package data)."""


class ExpertNotFound(MixdiffError):
    pass


class DuplicateExpert(MixdiffError):
    pass


class InvalidName(MixdiffError):
    pass


class HubError(MixdiffError):
    """A hf:// source could not be resolved (offline miss, unknown repo)."""


class VerifyFailed(MixdiffError):
    pass


class OverMemory(MixdiffError):
    """A route's experts alone pass the user's --max-memory budget."""


class OutputError(MixdiffError):
    """The output folder cannot be written."""


class MixdiffWarning(UserWarning):
    """Something the user should know that did not stop the command (the CLI prints it on stderr)."""
