"""Who may manage which project's webhooks: the authorization rules of the product, once.

The rules read only plain facts (the project's workspace tier and the caller's role), so the
store fetches those and this module decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from dembrane.webhooks.domain.errors import (
    InvalidArgument,
    NotFound,
    RoleRequired,
    TierRequired,
)


class Tier(IntEnum):
    """Workspace tiers, in order; webhooks need changemaker or above."""

    FREE = 0
    INNOVATOR = 1
    CHANGEMAKER = 2
    GUARDIAN = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: str, field: str = "tier") -> Tier:
        try:
            return cls[value.strip().upper()]
        except KeyError:
            names = ", ".join(t.label for t in cls)
            raise InvalidArgument.for_field(
                field, f"The tier must be one of {names}, not {value!r}."
            ) from None


WEBHOOK_TIER = Tier.CHANGEMAKER

ROLES = ("owner", "admin", "member", "observer", "billing", "external")
MANAGING_ROLES = frozenset({"owner", "admin"})
REMOVE_ROLE = "none"

PROJECT_NOT_FOUND = "Project not found"
WEBHOOK_NOT_FOUND = "Webhook not found"
DELIVERY_NOT_FOUND = "Delivery not found"
NOT_ALLOWED = "Not allowed"


def parse_role(value: str) -> str:
    """Normalise a role string, accepting ``none`` (remove); refuse anything else."""
    role = value.strip().lower()
    if role not in ROLES and role != REMOVE_ROLE:
        names = ", ".join((*ROLES, REMOVE_ROLE))
        raise InvalidArgument.for_field("role", f"The role must be one of {names}, not {value!r}.")
    return role


@dataclass(frozen=True)
class ProjectAccess:
    """The facts a decision needs: the project's tier and the caller's role (if any)."""

    project_id: str
    workspace_id: str
    tier: Tier
    role: str | None


def tier_allows_webhooks(tier: Tier) -> bool:
    """Whether a workspace of this tier gets webhooks delivered."""
    return tier >= WEBHOOK_TIER


def tier_required_message(tier: Tier) -> str:
    return f"This action requires the {WEBHOOK_TIER.label} tier (currently {tier.label})."


def check_can_see(access: ProjectAccess | None, *, is_staff: bool) -> ProjectAccess:
    """The caller must be staff or a member of the project's workspace."""
    if access is None or (access.role is None and not is_staff):
        raise NotFound(PROJECT_NOT_FOUND, metadata={"resource": "project"})
    return access


def check_can_manage(access: ProjectAccess | None, *, is_staff: bool) -> ProjectAccess:
    """Managing webhooks needs a visible project, a paid tier and an owner or admin role.

    The order matters: an outsider learns nothing (not found), then the tier (so a member of
    a free workspace sees the upgrade message), then the role. Platform staff pass every
    project check; deliveries to a low-tier workspace stay skipped all the same.
    """
    access = check_can_see(access, is_staff=is_staff)
    if is_staff:
        return access
    if not tier_allows_webhooks(access.tier):
        raise TierRequired(
            tier_required_message(access.tier),
            metadata={"tier": access.tier.label, "required_tier": WEBHOOK_TIER.label},
        )
    if access.role not in MANAGING_ROLES:
        raise RoleRequired(NOT_ALLOWED, metadata={"role": access.role or ""})
    return access
