"""Errors a request can meet at the router, each with its HTTP status and gRPC code.

The HTTP and gRPC front ends both map an `ApiError` through the attributes of its class,
so a pipeline (or the request translation) raises one exception and each protocol answers
with its own status: an OpenAI-shaped JSON error, or a gRPC status with the message.
"""

from __future__ import annotations

import grpc


def remote_cause(error: BaseException) -> BaseException:
    """What a pool raised, without the remote call's wrapper: Ray's RayTaskError carries
    it as `cause`, and its own text is the whole remote traceback (paths, pids, colours),
    which is no message for a client."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


class ApiError(Exception):
    """A request the router answers with an error; `param` names the offending field."""

    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL
    error_type = "internal_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def as_api_error(error: Exception) -> ApiError:
    """How a client hears of `error`: an ApiError as it is; anything else, a pipeline's
    failure rather than the request's fault, as an internal error naming its cause."""
    if isinstance(error, ApiError):
        return error
    return ApiError(f"generation failed: {remote_cause(error)!r}")


class InvalidRequestError(ApiError):
    """Input the client must fix: a malformed field, or a prompt the model cannot take."""

    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    error_type = "invalid_request_error"


class AuthenticationError(ApiError):
    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    error_type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFoundError(ApiError):
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND
    error_type = "invalid_request_error"
    code = "model_not_found"


class RequestTooLargeError(ApiError):
    """A body or message over the router's size limit (router.max_request_bytes)."""

    http_status = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    error_type = "invalid_request_error"
    code = "request_too_large"


class OverloadedError(ApiError):
    """Raised by a pipeline whose queues are full; the client may retry after `retry_after_s`."""

    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    error_type = "rate_limit_error"
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReadyError(ApiError):
    """No replica can take a request now (starting up, draining, or the engine failed)."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    error_type = "service_unavailable_error"


class DeadlineExceededError(ApiError):
    """The request outlived its deadline; a stream that has started ends with this event."""

    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    error_type = "timeout_error"
    code = "deadline_exceeded"
