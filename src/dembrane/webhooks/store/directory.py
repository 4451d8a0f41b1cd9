"""Queries on the directory: workspaces, projects, memberships, and access facts."""

from __future__ import annotations

from sqlalchemy import delete
from sqlmodel import Session, col, select

from dembrane.webhooks.domain.access import MANAGING_ROLES, WEBHOOK_TIER, ProjectAccess, Tier
from dembrane.webhooks.domain.errors import FailedPrecondition
from dembrane.webhooks.domain.payload import ProjectInfo
from dembrane.webhooks.store import webhooks
from dembrane.webhooks.store.tables import MembershipRow, ProjectRow, WebhookRow, WorkspaceRow


def upsert_workspace(
    session: Session, workspace_id: str, name: str, tier: Tier, now: float
) -> bool:
    """Create or update a workspace; return whether it was new."""
    row = session.get(WorkspaceRow, workspace_id)
    if row is None:
        session.add(
            WorkspaceRow(id=workspace_id, name=name, tier=int(tier), created_at=now, updated_at=now)
        )
        return True
    row.name, row.tier, row.updated_at = name, int(tier), now
    return False


def project_info(session: Session, project_id: str) -> ProjectInfo | None:
    """What an event's body says of its project, or ``None`` for an unknown project."""
    row = session.get(ProjectRow, project_id)
    return None if row is None else ProjectInfo(row.id, row.name, row.language)


def upsert_project(
    session: Session, project_id: str, workspace_id: str, name: str, language: str, now: float
) -> bool:
    """Create or update a project; its workspace must be known."""
    if session.get(WorkspaceRow, workspace_id) is None:
        raise FailedPrecondition(
            f"Workspace {workspace_id!r} is unknown; upsert the workspace first.",
            reason="WORKSPACE_UNKNOWN",
        )
    row = session.get(ProjectRow, project_id)
    if row is None:
        session.add(
            ProjectRow(
                id=project_id,
                workspace_id=workspace_id,
                name=name,
                language=language,
                created_at=now,
                updated_at=now,
            )
        )
        return True
    row.workspace_id, row.name, row.language, row.updated_at = workspace_id, name, language, now
    return False


def set_membership(
    session: Session, workspace_id: str, user_id: str, role: str | None, now: float
) -> None:
    """Give ``user_id`` a role in the workspace, or remove the membership when role is None."""
    if session.get(WorkspaceRow, workspace_id) is None:
        raise FailedPrecondition(
            f"Workspace {workspace_id!r} is unknown; upsert the workspace first.",
            reason="WORKSPACE_UNKNOWN",
        )
    row = session.get(MembershipRow, (workspace_id, user_id))
    if role is None:
        if row is not None:
            session.delete(row)
        return
    if row is None:
        session.add(
            MembershipRow(workspace_id=workspace_id, user_id=user_id, role=role, updated_at=now)
        )
    else:
        row.role, row.updated_at = role, now


def project_webhook_ids(session: Session, project_id: str) -> list[str]:
    """The ids of the project's webhooks."""
    return list(session.exec(select(WebhookRow.id).where(col(WebhookRow.project_id) == project_id)))


def delete_project(session: Session, project_id: str) -> int:
    """Delete a project, its webhooks and their deliveries."""
    ids = project_webhook_ids(session, project_id)
    webhooks.delete_all_deliveries(session, ids)
    session.execute(delete(WebhookRow).where(col(WebhookRow.project_id) == project_id))
    session.execute(delete(ProjectRow).where(col(ProjectRow.id) == project_id))
    return len(ids)


def project_access(session: Session, project_id: str, user_id: str) -> ProjectAccess | None:
    """The facts to authorize ``user_id`` on a project: tier and role (None: not a member)."""
    row = session.exec(
        select(ProjectRow.workspace_id, WorkspaceRow.tier, MembershipRow.role)
        .join(WorkspaceRow, col(WorkspaceRow.id) == col(ProjectRow.workspace_id))
        .outerjoin(
            MembershipRow,
            (col(MembershipRow.workspace_id) == col(ProjectRow.workspace_id))
            & (col(MembershipRow.user_id) == user_id),
        )
        .where(col(ProjectRow.id) == project_id)
    ).first()
    if row is None:
        return None
    workspace_id, tier, role = row
    return ProjectAccess(
        project_id=project_id, workspace_id=workspace_id, tier=Tier(tier), role=role
    )


def managed_project_names(session: Session, user_id: str) -> dict[str, str]:
    """Projects whose webhooks ``user_id`` manages (owner/admin on a paid tier): id -> name."""
    rows = session.exec(
        select(ProjectRow.id, ProjectRow.name)
        .join(WorkspaceRow, col(WorkspaceRow.id) == col(ProjectRow.workspace_id))
        .join(MembershipRow, col(MembershipRow.workspace_id) == col(ProjectRow.workspace_id))
        .where(
            col(MembershipRow.user_id) == user_id,
            col(MembershipRow.role).in_(sorted(MANAGING_ROLES)),
            col(WorkspaceRow.tier) >= int(WEBHOOK_TIER),
        )
    ).all()
    return {project_id: name for project_id, name in rows}
