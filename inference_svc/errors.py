"""Domain errors. The transport maps each to one precise gRPC status."""

from __future__ import annotations

from autoglm_common.bounds import clip


class ServiceError(Exception):
    """Base of every error a client can be told about."""

    reason = "INTERNAL"

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidRequest(ServiceError):
    """The request is malformed or names impossible parameters."""

    reason = "INVALID_REQUEST"


class InvalidMedia(InvalidRequest):
    """An image or audio part cannot be decoded or is of an unsupported kind."""

    reason = "INVALID_MEDIA"


class ContextTooLong(InvalidRequest):
    """Prompt plus requested tokens exceed the model's context length."""

    reason = "CONTEXT_TOO_LONG"


class UnknownSession(ServiceError):
    """A session id that the service does not hold."""

    reason = "UNKNOWN_SESSION"


class ModalityUnavailable(ServiceError):
    """The model has no encoder for a modality the request uses."""

    reason = "MODALITY_UNAVAILABLE"


class NotReady(ServiceError):
    """The model is still loading or the service is shutting down."""

    reason = "NOT_READY"


class ResourceExhausted(ServiceError):
    """A memory resource ran out; the client may retry after `retry_after_s`."""

    reason = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, resource: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.resource = resource
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServiceError):
    """The client's deadline passed before generation finished."""

    reason = "DEADLINE_EXCEEDED"


class GenerationFailed(ServiceError):
    """The model could not continue this request (its other requests are unaffected)."""

    reason = "GENERATION_FAILED"


def brief(error: BaseException) -> str:
    """An exception for the log: its message, cut short (never request content)."""
    return clip(str(error), 300)
