"""What the live service refuses with, shared by its calls, their dialogue checks and the HTTP layer."""

from __future__ import annotations


class LiveError(Exception):
    """A request the service refuses: an HTTP status, a stable code and a message for people."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry_after_s = retry_after_s  # 429 / 503: when asking again may succeed (Retry-After)


class CapacityError(RuntimeError):
    """The engine has no room for another session."""
