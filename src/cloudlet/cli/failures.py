"""The CLI's own failures, in a module light enough for `main` to import before any command
group (command groups load lazily; see ``main.LazyGroup``)."""

from __future__ import annotations


class ApiError(Exception):
    """An error answer from the control API, or no answer at all."""

    def __init__(self, message: str, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.reason = reason

    @property
    def user_fault(self) -> bool:
        return 400 <= self.status < 500


class DeployFailed(Exception):
    """The new revision did not become ready; the message says why."""


class BuildFailed(Exception):
    """The build ran and failed (the message is the failing step and its output)."""
