"""Errors of the serving client and dev server, named after TF Serving's status codes.

Codes are the canonical gRPC / TF status names ("INVALID_ARGUMENT", ...); the
REST API carries them as HTTP statuses (`HTTP_STATUS`, `code_from_http`).
"""

from __future__ import annotations

from delf_tf.errors import DelfError, FingerprintMismatchError
from delf_tf.images import ImageError

# TF Serving's mapping of status codes to HTTP (http_server.cc, ToHTTPStatusCode).
HTTP_STATUS = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}
_FROM_HTTP = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    409: "ABORTED",
    411: "INVALID_ARGUMENT",
    413: "RESOURCE_EXHAUSTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def code_from_http(status: int) -> str:
    return _FROM_HTTP.get(status, "UNKNOWN" if status >= 500 else "INVALID_ARGUMENT")


class ServingError(DelfError, RuntimeError):
    """A request to TF Serving (or `delf serve`) failed; `code` is the status name."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ServerUnavailableError(ServingError):
    """The server could not be reached (UNAVAILABLE after the allowed retries)."""


class ModelNotFoundError(ServingError):
    """The server does not serve this model name or version (NOT_FOUND)."""


class SignatureError(ServingError):
    """The model lacks the signature, or it does not have the expected inputs/outputs."""


class DeadlineExceededError(ServingError):
    """No answer within the timeout (DEADLINE_EXCEEDED)."""


class ImageTooLargeError(ServingError, ValueError):
    """An image or a request is over a size limit of the client or the server."""


class InvalidImageError(ServingError, ImageError):
    """The server could not decode an image of the request (its `valid` output is False)."""


class ServedModelChangedError(ServingError, FingerprintMismatchError):
    """The served model changed: its features live in another descriptor space."""


def error_for(code: str, message: str) -> ServingError:
    """The most specific ServingError for a status code and message."""
    lowered = message.lower()
    if code == "NOT_FOUND" and "signature" not in lowered:
        return ModelNotFoundError(code, message)
    if "signature" in lowered and code in ("FAILED_PRECONDITION", "NOT_FOUND", "INVALID_ARGUMENT"):
        return SignatureError(code, message)
    if code == "UNAVAILABLE":
        return ServerUnavailableError(code, message)
    if code == "DEADLINE_EXCEEDED":
        return DeadlineExceededError(code, message)
    if code == "RESOURCE_EXHAUSTED" and ("size" in lowered or "larger" in lowered):
        return ImageTooLargeError(code, message)
    return ServingError(code, message)
