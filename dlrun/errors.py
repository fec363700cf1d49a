"""Errors meant for users: shown as one short panel with exit code 2, never as a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix by typing something else (bad config, incompatible pair, missing data).

    `hint` says what to type instead; the CLI renders both in one panel and exits with code 2.
    """

    def __init__(self, message: str, hint: str | None = None, title: str = "Invalid configuration"):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.title = title

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class IncompatibleError(UserError):
    """A model that cannot take a data set's input shape (or task)."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message, hint, title="Incompatible model and data set")


class DataError(UserError):
    """Data that cannot be found or read."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message, hint, title="Data not available")
