"""The one exception tree of the service.

Domain, store and delivery code raise these; ``api/`` alone turns them into gRPC statuses
(with a ``google.rpc.ErrorInfo``), and ``gateway/`` alone turns statuses into HTTP answers.
Messages are full sentences meant for the caller and never contain a secret.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field of a request: its name and what is wrong with it."""

    field: str
    description: str


class WebhooksError(Exception):
    """Base of every error the service reports to a caller."""

    #: The ``ErrorInfo.reason``: an UPPER_SNAKE_CASE constant callers may branch on.
    reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})


class Unauthenticated(WebhooksError):
    """No token, or one that is malformed, badly signed or expired."""

    reason = "UNAUTHENTICATED"


class NotFound(WebhooksError):
    """The thing does not exist, or the caller may not know it exists."""

    reason = "NOT_FOUND"


class PermissionDenied(WebhooksError):
    """The caller is known and may see the project, but may not do this."""

    reason = "PERMISSION_DENIED"


class TierRequired(PermissionDenied):
    """The project's workspace is on a tier below the one the action needs."""

    reason = "TIER_REQUIRED"


class RoleRequired(PermissionDenied):
    """The caller's role in the workspace does not allow the action."""

    reason = "ROLE_REQUIRED"


class ScopeRequired(PermissionDenied):
    """The token lacks the service scope the RPC needs."""

    reason = "SCOPE_REQUIRED"


class InvalidArgument(WebhooksError):
    """One or more fields of the request are invalid."""

    reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        *,
        violations: Sequence[FieldViolation] = (),
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations: tuple[FieldViolation, ...] = tuple(violations)

    @classmethod
    def for_field(cls, name: str, description: str) -> InvalidArgument:
        """One bad field, described by one sentence that also serves as the message."""
        return cls(description, violations=[FieldViolation(name, description)])


class AlreadyExists(WebhooksError):
    """The request would create something whose identifier is taken by something else."""

    reason = "ALREADY_EXISTS"


class Unavailable(WebhooksError):
    """The service cannot do this right now (its store is unreachable, or it is shutting
    down); trying again later may work."""

    reason = "STORE_UNAVAILABLE"


class FailedPrecondition(WebhooksError):
    """The request is well formed but the system is not in a state that allows it."""

    reason = "FAILED_PRECONDITION"


@dataclass
class ErrorCollector:
    """Gathers field violations so that a caller hears of every bad field at once."""

    violations: list[FieldViolation] = field(default_factory=list)

    def add(self, name: str, description: str) -> None:
        self.violations.append(FieldViolation(name, description))

    def raise_if_any(self) -> None:
        if self.violations:
            first = self.violations[0].description
            raise InvalidArgument(first, violations=self.violations)
