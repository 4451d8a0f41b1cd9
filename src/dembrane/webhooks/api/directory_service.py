"""DirectoryService: the platform's backend keeps the service's copy of its directory."""

from __future__ import annotations

import time

import grpc

from dembrane.webhooks.domain.access import REMOVE_ROLE, Tier, parse_role
from dembrane.webhooks.domain.errors import ErrorCollector
from dembrane.webhooks.domain.text import has_control_characters
from dembrane.webhooks.domain.webhooks import require
from dembrane.webhooks.resources import Resources
from dembrane.webhooks.store import directory, webhooks
from dembrane.webhooks.v1 import directory_service_pb2 as pb
from dembrane.webhooks.v1 import directory_service_pb2_grpc

Context = grpc.aio.ServicerContext[object, object]

ID_MAX = 128
NAME_MAX = 200
LANGUAGE_MAX = 16


def _check_text(errors: ErrorCollector, **values: tuple[str, int]) -> None:
    for field, (value, limit) in values.items():
        if len(value) > limit:
            errors.add(field, f"The {field} must be at most {limit} characters long.")
        elif has_control_characters(value):
            errors.add(field, f"The {field} must not contain control characters.")


class DirectoryServicer(directory_service_pb2_grpc.DirectoryServiceServicer):
    """Upserts of workspaces, projects and memberships; project deletion."""

    def __init__(self, resources: Resources) -> None:
        self._db = resources.database

    async def UpsertWorkspace(
        self, request: pb.UpsertWorkspaceRequest, context: Context
    ) -> pb.UpsertWorkspaceResponse:
        workspace_id = require(request.workspace_id, "workspace_id", "workspace id")
        tier = Tier.parse(require(request.tier, "tier", "tier"))
        errors = ErrorCollector()
        _check_text(errors, workspace_id=(workspace_id, ID_MAX), name=(request.name, NAME_MAX))
        errors.raise_if_any()
        created = await self._db.run(
            directory.upsert_workspace, workspace_id, request.name, tier, time.time()
        )
        return pb.UpsertWorkspaceResponse(created=created)

    async def UpsertProject(
        self, request: pb.UpsertProjectRequest, context: Context
    ) -> pb.UpsertProjectResponse:
        project_id = require(request.project_id, "project_id", "project id")
        workspace_id = require(request.workspace_id, "workspace_id", "workspace id")
        errors = ErrorCollector()
        _check_text(
            errors,
            project_id=(project_id, ID_MAX),
            name=(request.name, NAME_MAX),
            language=(request.language, LANGUAGE_MAX),
        )
        errors.raise_if_any()
        created = await self._db.run(
            directory.upsert_project,
            project_id,
            workspace_id,
            request.name,
            request.language,
            time.time(),
        )
        return pb.UpsertProjectResponse(created=created)

    async def SetMembership(
        self, request: pb.SetMembershipRequest, context: Context
    ) -> pb.SetMembershipResponse:
        workspace_id = require(request.workspace_id, "workspace_id", "workspace id")
        user_id = require(request.user_id, "user_id", "user id")
        role = parse_role(require(request.role, "role", "role"))
        errors = ErrorCollector()
        _check_text(errors, user_id=(user_id, ID_MAX))
        errors.raise_if_any()
        await self._db.run(
            directory.set_membership,
            workspace_id,
            user_id,
            None if role == REMOVE_ROLE else role,
            time.time(),
        )
        return pb.SetMembershipResponse()

    async def DeleteProject(
        self, request: pb.DeleteProjectRequest, context: Context
    ) -> pb.DeleteProjectResponse:
        project_id = require(request.project_id, "project_id", "project id")
        webhook_ids = await self._db.run(directory.project_webhook_ids, project_id)
        count = await webhooks.delete_gradually(
            self._db,
            webhook_ids,
            lambda session: directory.delete_project(session, project_id),
        )
        return pb.DeleteProjectResponse(deleted_webhook_count=count)
