"""Domain errors shared by every service.

Library code raises these; one gRPC interceptor (``services.common.grpc_errors``) and the HTTP layer
map them to status codes, so a caller always gets a code it can act on and a reason it can read.
"""

from __future__ import annotations


class MeshError(Exception):
    """Base class. ``code`` names the gRPC status; ``http_status`` the HTTP one."""

    code = "INTERNAL"
    http_status = 500
    reason = "internal"

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class InvalidArgument(MeshError):
    """Bad input: the caller must change the request."""

    code = "INVALID_ARGUMENT"
    http_status = 400
    reason = "invalid_argument"


class ResourceExhausted(MeshError):
    """A limit or a full queue: the caller may retry later (``retry_after`` seconds, if known)."""

    code = "RESOURCE_EXHAUSTED"
    http_status = 429
    reason = "resource_exhausted"

    def __init__(self, message: str, *, reason: str | None = None, retry_after: float | None = None):
        super().__init__(message, reason=reason)
        self.retry_after = retry_after


class NotFound(MeshError):
    code = "NOT_FOUND"
    http_status = 404
    reason = "not_found"


class Unauthenticated(MeshError):
    code = "UNAUTHENTICATED"
    http_status = 401
    reason = "unauthenticated"


class PermissionDenied(MeshError):
    code = "PERMISSION_DENIED"
    http_status = 403
    reason = "permission_denied"


class Unavailable(MeshError):
    """A dependency is down; retrying the same request may succeed."""

    code = "UNAVAILABLE"
    http_status = 503
    reason = "unavailable"


class DeadlineExceeded(MeshError):
    code = "DEADLINE_EXCEEDED"
    http_status = 504
    reason = "deadline_exceeded"


class FailedPrecondition(MeshError):
    """The system is not in a state to serve this (e.g. a checkpoint that cannot be loaded)."""

    code = "FAILED_PRECONDITION"
    http_status = 400
    reason = "failed_precondition"


class EmbeddingUnresolvable(Unavailable):
    """An embedding reference can no longer be read (Ray object owner died, cache entry evicted).

    The gateway answers this by encoding the image again, once.
    """

    reason = "embedding_unresolvable"
