"""The one error type of the server: a user-facing message with the HTTP status it answers with."""

from __future__ import annotations

from deltatune.errors import DeltatuneError


class ServeError(DeltatuneError):
    """What was wrong with a request or an adapter, and how to fix it; `status` is the HTTP answer,
    `code` a short machine-readable name (OpenAI-style error bodies carry both)."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request"):
        super().__init__(message)
        self.status = status
        self.code = code
