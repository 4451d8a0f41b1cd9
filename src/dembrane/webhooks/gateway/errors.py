"""Turning failures into HTTP answers: the gateway's own refusals and the server's statuses.

The server's status messages are already the ``detail`` sentences of the contract's error
table, so they pass through unchanged; this module only picks the HTTP status, adds the
``reason`` of the status's ``google.rpc.ErrorInfo`` and any ``google.rpc.BadRequest`` field
violations, and replaces messages that would leak internals (connection errors, unexpected
codes) with a generic sentence.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "INVALID_SESSION",
    "ErrorAnswer",
    "RestError",
    "answer_for_rpc_error",
    "local_answer",
]

_log = logging.getLogger(__name__)

#: The one ``detail`` of every 401, whatever made the token unusable (contract, section 3).
INVALID_SESSION = "Invalid session"

_STATUS_DETAILS_KEY = "grpc-status-details-bin"

# Codes whose message is written for the caller and passes through as the detail.
_CALLER_FACING: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
}

# Codes whose message describes the plumbing (addresses, sockets, stack frames): the caller
# gets a fixed sentence instead.
_PLUMBING: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.UNAVAILABLE: (503, "The webhook service is unavailable; try again shortly."),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "The webhook service did not answer in time."),
}
_UPSTREAM_FAILURE = (502, "The webhook service failed to handle the request.")
_PLUMBING_REASONS = {502: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


class RestError(Exception):
    """An HTTP error the gateway answers on its own, without calling the server.

    Raised while reading a request (malformed JSON, wrong JSON types, an unknown enum value)
    and turned into ``{"detail": ...}`` with ``status`` by the application; ``field_name``, the
    REST key of a value the gateway refuses, becomes the answer's field violation.
    """

    def __init__(self, status: int, detail: str, field_name: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field_name = field_name


@dataclass(frozen=True)
class ErrorAnswer:
    """An HTTP error answer: its status and its JSON body (``detail`` plus optional keys)."""

    status: int
    detail: str
    reason: str | None = None
    field_violations: tuple[tuple[str, str], ...] = field(default=())

    def body(self) -> dict[str, Any]:
        """The JSON body: ``detail`` always, ``reason`` and ``field_violations`` when known."""
        body: dict[str, Any] = {"detail": self.detail}
        if self.reason:
            body["reason"] = self.reason
        if self.field_violations:
            body["field_violations"] = [
                {"field": name, "description": description}
                for name, description in self.field_violations
            ]
        return body


# The ErrorInfo-style reason of the answers the gateway gives on its own, so a client can key
# on ``reason`` whichever side refused the request.
_LOCAL_REASONS: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "INVALID_ARGUMENT",
    500: "INTERNAL",
}


def local_answer(status: int, detail: str, field_name: str | None = None) -> ErrorAnswer:
    """The answer to a request the gateway refuses itself, with the reason for its status and,
    when one field is to blame, that field as a violation described by ``detail``."""
    violations = ((field_name, detail),) if field_name else ()
    return ErrorAnswer(status, detail, _LOCAL_REASONS.get(status), violations)


def answer_for_rpc_error(
    error: grpc.aio.AioRpcError, rest_name: Callable[[str], str] | None = None
) -> ErrorAnswer:
    """The HTTP answer for a failed call, following the error table of the contract.

    ``rest_name`` turns the field of each BadRequest violation, a path in the request's proto
    field names, into the REST key the caller sent.
    """
    code = error.code()
    reason, violations = _status_details(error.trailing_metadata())
    if rest_name is not None:
        violations = tuple((rest_name(name), description) for name, description in violations)
    if code in _CALLER_FACING:
        status = _CALLER_FACING[code]
        # Every 401 carries the same sentence, so a caller cannot tell a missing token from a
        # forged one (and the front end's session handling keys on it).
        detail = INVALID_SESSION if status == 401 else (error.details() or "").strip()
        if not detail:
            detail = "The request was refused."
        return ErrorAnswer(status, detail, reason, violations)
    status, detail = _PLUMBING.get(code, _UPSTREAM_FAILURE)
    # Logged without the request: the code is what an operator needs to start looking.
    _upstream_failures.note(code.name, status)
    return ErrorAnswer(status, detail, reason or _PLUMBING_REASONS.get(status))


class _FailureLog:
    """Logs failed calls to the server without flooding while it is down: the first of each
    code at once, then at most one line a minute with how many came meanwhile."""

    def __init__(self, every: float = 60.0) -> None:
        self._every = every
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def note(self, code: str, status: int) -> None:
        now = time.monotonic()
        last = self._last.get(code)
        if last is not None and now - last < self._every:
            self._since[code] = self._since.get(code, 0) + 1
            return
        more = self._since.pop(code, 0)
        self._last[code] = now
        _log.warning(
            "webhook service call failed with %s; answering %d%s",
            code,
            status,
            f" ({more} more such calls since the last line)" if more else "",
        )


_upstream_failures = _FailureLog()


def _status_details(
    metadata: Iterable[Any] | None,
) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """The ErrorInfo reason and BadRequest violations in a call's trailing metadata."""
    raw = None
    for key, value in metadata or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            raw = value
            break
    if raw is None:
        return None, ()
    status = status_pb2.Status()
    try:
        status.ParseFromString(raw)
    except Exception:  # a garbled trailer must not turn a clear 4xx into a 500
        return None, ()
    reason: str | None = None
    violations: list[tuple[str, str]] = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
            reason = reason or info.reason or None
            continue
        bad_request = error_details_pb2.BadRequest()
        if detail.Is(bad_request.DESCRIPTOR) and detail.Unpack(bad_request):
            violations.extend((v.field, v.description) for v in bad_request.field_violations)
    return reason, tuple(violations)
