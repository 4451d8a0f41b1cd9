"""The one place where domain errors become gRPC statuses.

Every status carries a ``google.rpc.ErrorInfo`` (domain ``webhooks.dembrane.com``) and, for
invalid input, a ``google.rpc.BadRequest`` with one field violation per bad field. The status
message is the sentence the REST gateway shows as ``detail``.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from dembrane.webhooks.domain import errors

ERROR_DOMAIN = "webhooks.dembrane.com"

log = logging.getLogger(__name__)

_CODES: list[tuple[type[errors.WebhooksError], int]] = [
    (errors.Unauthenticated, code_pb2.UNAUTHENTICATED),
    (errors.NotFound, code_pb2.NOT_FOUND),
    (errors.PermissionDenied, code_pb2.PERMISSION_DENIED),
    (errors.InvalidArgument, code_pb2.INVALID_ARGUMENT),
    (errors.FailedPrecondition, code_pb2.FAILED_PRECONDITION),
    (errors.AlreadyExists, code_pb2.ALREADY_EXISTS),
    (errors.Unavailable, code_pb2.UNAVAILABLE),
]


def to_status(error: errors.WebhooksError) -> grpc.Status:
    """Build the rich gRPC status for a domain error."""
    code = next((c for kind, c in _CODES if isinstance(error, kind)), code_pb2.INTERNAL)
    details: list[any_pb2.Any] = []
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
    )
    packed = any_pb2.Any()
    packed.Pack(info)
    details.append(packed)
    if isinstance(error, errors.InvalidArgument) and error.violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in error.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        details.append(packed)
    return rpc_status.to_status(
        status_pb2.Status(code=code, message=error.message, details=details)
    )


def internal_status() -> grpc.Status:
    """The status for an unexpected failure: no internals leak to the caller."""
    return to_status(errors.WebhooksError("Internal error; the failure has been logged."))
