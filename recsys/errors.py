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


class DataError(RecsysError):
    """A data file is missing, unreadable, or holds values the schema does not allow."""

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        super().__init__(f"{where}: {message}")
