"""The one exception type dgemma raises for anything a user or client can get wrong."""
from __future__ import annotations


class DgemmaError(Exception):
    """A failure with a stable machine-readable ``code`` and a one-sentence ``message``.

    Codes are part of the wire protocol (docs/protocol.md), so clients can branch on them:
    ``invalid_request``, ``invalid_params``, ``model_missing``, ``too_large``, ``cancelled``,
    ``superseded``, ``deadline``, ``out_of_memory``, ``file_changed``, ``internal``; and, on the client
    side only, ``unavailable`` (no daemon answers), ``empty`` (an edit's answer is empty, so nothing is
    written) and ``io_error`` (a file or folder that cannot be written).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message
