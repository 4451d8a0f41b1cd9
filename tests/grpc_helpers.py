"""Helpers to read rich gRPC errors in tests."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "webhooks.dembrane.com"


@dataclass
class RichError:
    """A failed call's code, message, ErrorInfo and BadRequest field violations."""

    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    metadata: dict[str, str]
    violations: dict[str, str]


def rich_error(error: grpc.aio.AioRpcError) -> RichError:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    reason, domain, metadata, violations = "", "", {}, {}
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = {v.field: v.description for v in bad.field_violations}
    return RichError(
        code=error.code(),
        message=error.details() or "",
        reason=reason,
        domain=domain,
        metadata=metadata,
        violations=violations,
    )
