"""Errors that users see: each names what is wrong and where (file, key path, column, row)."""

from __future__ import annotations


class RecsysError(Exception):
    """Base class of every error that recsys raises on bad input."""


class SpecError(RecsysError):
    """A spec file (or a ``--set`` override) is malformed, incomplete or impossible.

    The message lists one problem per line, each as ``FILE: key.path: what was expected``.
    """

    def __init__(self, file: str, problems: list[str]) -> None:
        self.file = file
        self.problems = problems
        body = "\n".join(f"  {file}: {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"invalid spec ({len(problems)} {noun}):\n{body}")

    def __reduce__(self) -> tuple[type, tuple[str, list[str]]]:  # picklable across processes
        return (type(self), (self.file, self.problems))


class _Located(RecsysError):
    """An error about one place: ``where: message`` (picklable, so it crosses processes)."""

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.where, self.message))


class DataError(_Located):
    """A data file is missing, unreadable, or holds values the schema does not allow."""


class RunError(_Located):
    """A run or export directory cannot be used as asked: missing, busy, holding another run, or
    with a checkpoint that does not fit the model.

    The message is one line: ``PATH: what is wrong (and what to do)``.
    """


class OutputError(_Located):
    """Writing an output failed (no space left, read-only, permission denied); nothing half-written
    was published."""


class UsageError(RecsysError):
    """Command-line options that the command cannot use: a value out of range, or options that
    exclude each other. The message is one line, naming the options."""
