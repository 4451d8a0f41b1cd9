"""The authorization rules and error statuses of the contract's table, over real gRPC."""

from __future__ import annotations

import grpc
import jwt
import pytest

from dembrane.webhooks.auth import SCOPE_DIRECTORY, SCOPE_PUBLISH
from dembrane.webhooks.v1 import (
    directory_service_pb2 as dpb,
)
from dembrane.webhooks.v1 import (
    event_pb2,
)
from dembrane.webhooks.v1 import (
    event_service_pb2 as epb,
)
from dembrane.webhooks.v1 import (
    webhook_service_pb2 as pb,
)

from grpc_helpers import ERROR_DOMAIN, rich_error
from harness import JWT_SECRET, Stubs, Tokens, World


async def _fails(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def _create(stubs: Stubs, tokens: Tokens, project: str, user: str = "u-admin") -> str:
    response = await stubs.webhooks.CreateWebhook(
        pb.CreateWebhookRequest(
            project_id=project,
            name="Hook",
            url="http://127.0.0.1:9/hook",
            events=["conversation.started"],
        ),
        metadata=tokens.bearer(tokens.user(user)),
    )
    return response.webhook.id


async def test_missing_token_is_unauthenticated(stubs: Stubs, world: World) -> None:
    """A call without a token fails UNAUTHENTICATED with "Invalid session" and an ErrorInfo."""
    error = rich_error(
        await _fails(stubs.webhooks.ListWebhooks(pb.ListWebhooksRequest(project_id="p-paid")))
    )
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.message == "Invalid session"
    assert (error.reason, error.domain) == ("UNAUTHENTICATED", ERROR_DOMAIN)


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        jwt.encode(
            {"sub": "u-admin"}, "some-other-secret-that-is-long-enough-too", algorithm="HS256"
        ),
        jwt.encode({"scope": "webhooks:publish"}, JWT_SECRET, algorithm="HS256"),
    ],
    ids=["garbage", "wrong-key", "no-subject"],
)
async def test_invalid_tokens_are_unauthenticated(stubs: Stubs, world: World, token: str) -> None:
    """Malformed tokens, tokens signed with another key and tokens without a user are refused."""
    error = rich_error(
        await _fails(
            stubs.webhooks.ListWebhooks(
                pb.ListWebhooksRequest(project_id="p-paid"),
                metadata=(("authorization", f"Bearer {token}"),),
            )
        )
    )
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.message == "Invalid session"


async def test_expired_token_is_unauthenticated(stubs: Stubs, tokens: Tokens, world: World) -> None:
    """An expired token is refused even when its signature is good."""
    error = rich_error(
        await _fails(
            stubs.webhooks.ListWebhooks(
                pb.ListWebhooksRequest(project_id="p-paid"),
                metadata=tokens.bearer(tokens.expired("u-admin")),
            )
        )
    )
    assert error.code == grpc.StatusCode.UNAUTHENTICATED


async def test_id_claim_names_the_user_when_sub_is_absent(stubs: Stubs, world: World) -> None:
    """Tokens of the platform's existing auth server carry the user in `id`, not `sub`."""
    token = jwt.encode({"id": "u-admin"}, JWT_SECRET, algorithm="HS256")
    response = await stubs.webhooks.ListWebhooks(
        pb.ListWebhooksRequest(project_id="p-paid"),
        metadata=(("authorization", f"Bearer {token}"),),
    )
    assert list(response.webhooks) == []


async def test_unknown_project_is_not_found(stubs: Stubs, tokens: Tokens, world: World) -> None:
    """A project the service has never heard of is NOT_FOUND "Project not found"."""
    error = rich_error(
        await _fails(
            stubs.webhooks.ListWebhooks(
                pb.ListWebhooksRequest(project_id="p-nowhere"),
                metadata=tokens.bearer(tokens.user("u-admin")),
            )
        )
    )
    assert (error.code, error.message) == (grpc.StatusCode.NOT_FOUND, "Project not found")
    assert error.domain == ERROR_DOMAIN


async def test_non_member_sees_not_found(stubs: Stubs, tokens: Tokens, world: World) -> None:
    """A user outside the project's workspace cannot tell the project exists."""
    error = rich_error(
        await _fails(
            stubs.webhooks.ListWebhooks(
                pb.ListWebhooksRequest(project_id="p-paid"),
                metadata=tokens.bearer(tokens.user("u-outsider")),
            )
        )
    )
    assert (error.code, error.message) == (grpc.StatusCode.NOT_FOUND, "Project not found")


async def test_low_tier_is_permission_denied_with_tier_required(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """An owner on the innovator tier is told the action needs changemaker, naming the tier."""
    error = rich_error(
        await _fails(
            stubs.webhooks.ListWebhooks(
                pb.ListWebhooksRequest(project_id="p-free"),
                metadata=tokens.bearer(tokens.user("u-outsider")),
            )
        )
    )
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.reason == "TIER_REQUIRED"
    assert error.message == "This action requires the changemaker tier (currently innovator)."
    assert error.metadata["tier"] == "innovator"


async def test_member_role_is_permission_denied_with_role_required(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """A plain member of a paid workspace may not manage webhooks."""
    error = rich_error(
        await _fails(
            stubs.webhooks.ListWebhooks(
                pb.ListWebhooksRequest(project_id="p-paid"),
                metadata=tokens.bearer(tokens.user("u-member")),
            )
        )
    )
    assert (error.code, error.reason, error.message) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "ROLE_REQUIRED",
        "Not allowed",
    )


@pytest.mark.parametrize("role", ["observer", "billing", "external"])
async def test_other_roles_may_not_manage(
    stubs: Stubs, tokens: Tokens, world: World, role: str
) -> None:
    """Only owners and admins manage webhooks; every other role gets ROLE_REQUIRED."""
    await stubs.directory.SetMembership(
        dpb.SetMembershipRequest(workspace_id="ws-paid", user_id="u-other", role=role),
        metadata=tokens.bearer(tokens.service(SCOPE_DIRECTORY)),
    )
    error = rich_error(
        await _fails(
            stubs.webhooks.ListWebhooks(
                pb.ListWebhooksRequest(project_id="p-paid"),
                metadata=tokens.bearer(tokens.user("u-other")),
            )
        )
    )
    assert error.reason == "ROLE_REQUIRED"


async def test_owner_and_admin_may_manage(stubs: Stubs, tokens: Tokens, world: World) -> None:
    """Owners and admins of a changemaker workspace list its projects' webhooks."""
    for user in ("u-owner", "u-admin"):
        response = await stubs.webhooks.ListWebhooks(
            pb.ListWebhooksRequest(project_id="p-paid"), metadata=tokens.bearer(tokens.user(user))
        )
        assert response.next_page_token == ""


async def test_staff_pass_every_project_check(stubs: Stubs, tokens: Tokens, world: World) -> None:
    """Platform staff manage any known project, without membership and whatever the tier."""
    for project in ("p-paid", "p-free"):
        response = await stubs.webhooks.ListWebhooks(
            pb.ListWebhooksRequest(project_id=project), metadata=tokens.bearer(tokens.staff())
        )
        assert list(response.webhooks) == []
    error = rich_error(
        await _fails(
            stubs.webhooks.ListWebhooks(
                pb.ListWebhooksRequest(project_id="p-nowhere"),
                metadata=tokens.bearer(tokens.staff()),
            )
        )
    )
    assert error.code == grpc.StatusCode.NOT_FOUND


async def test_webhook_of_another_project_is_not_found(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """A webhook id is only found under the project it belongs to."""
    webhook_id = await _create(stubs, tokens, "p-paid-2")
    error = rich_error(
        await _fails(
            stubs.webhooks.GetWebhook(
                pb.GetWebhookRequest(project_id="p-paid", webhook_id=webhook_id),
                metadata=tokens.bearer(tokens.user("u-admin")),
            )
        )
    )
    assert (error.code, error.message) == (grpc.StatusCode.NOT_FOUND, "Webhook not found")


async def test_bad_fields_are_invalid_argument_with_violations(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """Every bad field is reported at once as a BadRequest field violation."""
    error = rich_error(
        await _fails(
            stubs.webhooks.CreateWebhook(
                pb.CreateWebhookRequest(
                    project_id="p-paid",
                    name="",
                    url="ftp://example.com/x",
                    events=["conversation.exploded"],
                    secret="short",
                ),
                metadata=tokens.bearer(tokens.user("u-admin")),
            )
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.domain == ERROR_DOMAIN
    assert set(error.violations) == {"name", "url", "events", "secret"}
    assert "conversation.exploded" in error.violations["events"]
    assert error.message == error.violations["name"]


async def test_event_service_needs_publish_scope(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """A user token, even staff's, cannot publish events without the webhooks:publish scope."""
    request = epb.PublishEventRequest(
        event=event_pb2.Event(type="conversation.started", project_id="p-paid")
    )
    for token in (tokens.user("u-admin"), tokens.staff(), tokens.service(SCOPE_DIRECTORY)):
        error = rich_error(
            await _fails(stubs.events.PublishEvent(request, metadata=tokens.bearer(token)))
        )
        assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_REQUIRED")


async def test_directory_service_needs_directory_scope(stubs: Stubs, tokens: Tokens) -> None:
    """The directory cannot be changed with a publish-only token."""
    error = rich_error(
        await _fails(
            stubs.directory.UpsertWorkspace(
                dpb.UpsertWorkspaceRequest(workspace_id="w", tier="free"),
                metadata=tokens.bearer(tokens.service(SCOPE_PUBLISH)),
            )
        )
    )
    assert error.reason == "SCOPE_REQUIRED"


async def test_removed_membership_revokes_access(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """Setting a role to `none` removes the membership: the project disappears for the user."""
    await stubs.directory.SetMembership(
        dpb.SetMembershipRequest(workspace_id="ws-paid", user_id="u-admin", role="none"),
        metadata=tokens.bearer(tokens.service(SCOPE_DIRECTORY)),
    )
    error = rich_error(
        await _fails(
            stubs.webhooks.ListWebhooks(
                pb.ListWebhooksRequest(project_id="p-paid"),
                metadata=tokens.bearer(tokens.user("u-admin")),
            )
        )
    )
    assert error.code == grpc.StatusCode.NOT_FOUND


async def test_directory_rejects_unknown_tier_and_role(stubs: Stubs, tokens: Tokens) -> None:
    """Tier and role strings outside the contract's lists are INVALID_ARGUMENT, naming the field."""
    md = tokens.bearer(tokens.service(SCOPE_DIRECTORY))
    error = rich_error(
        await _fails(
            stubs.directory.UpsertWorkspace(
                dpb.UpsertWorkspaceRequest(workspace_id="w", tier="platinum"), metadata=md
            )
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "tier" in error.violations
    await stubs.directory.UpsertWorkspace(
        dpb.UpsertWorkspaceRequest(workspace_id="w", tier="guardian"), metadata=md
    )
    error = rich_error(
        await _fails(
            stubs.directory.SetMembership(
                dpb.SetMembershipRequest(workspace_id="w", user_id="u", role="king"), metadata=md
            )
        )
    )
    assert "role" in error.violations


async def test_directory_takes_tier_and_role_names_in_any_case(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """A tier or role sent capitalised, with spaces around, counts as its lowercase name:
    ``Admin`` on a `` Changemaker`` workspace manages its webhooks."""
    md = tokens.bearer(tokens.service(SCOPE_DIRECTORY))
    await stubs.directory.UpsertWorkspace(
        dpb.UpsertWorkspaceRequest(workspace_id="ws-cased", name="Cased", tier=" Changemaker"),
        metadata=md,
    )
    await stubs.directory.UpsertProject(
        dpb.UpsertProjectRequest(project_id="p-cased", workspace_id="ws-cased", name="P"),
        metadata=md,
    )
    await stubs.directory.SetMembership(
        dpb.SetMembershipRequest(workspace_id="ws-cased", user_id="u-cased", role="Admin "),
        metadata=md,
    )
    listed = await stubs.webhooks.ListWebhooks(
        pb.ListWebhooksRequest(project_id="p-cased"), metadata=tokens.bearer(tokens.user("u-cased"))
    )
    assert list(listed.webhooks) == []


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("workspace_id", dpb.UpsertWorkspaceRequest(workspace_id="w\x00", tier="guardian")),
        ("name", dpb.UpsertWorkspaceRequest(workspace_id="w", name="A\x00B", tier="guardian")),
        ("name", dpb.UpsertProjectRequest(project_id="p", workspace_id="ws-paid", name="\x07")),
        (
            "language",
            dpb.UpsertProjectRequest(project_id="p", workspace_id="ws-paid", language="e\x00n"),
        ),
        (
            "user_id",
            dpb.SetMembershipRequest(workspace_id="ws-paid", user_id="u\x00x", role="admin"),
        ),
    ],
    ids=["workspace-id", "workspace-name", "project-name", "language", "user-id"],
)
async def test_directory_refuses_control_characters(
    stubs: Stubs, tokens: Tokens, world: World, field: str, message: object
) -> None:
    """Ids, names and languages with control characters are INVALID_ARGUMENT naming the field
    (PostgreSQL could not store a NUL, so both databases refuse the same input)."""
    md = tokens.bearer(tokens.service(SCOPE_DIRECTORY))
    method = {
        dpb.UpsertWorkspaceRequest: stubs.directory.UpsertWorkspace,
        dpb.UpsertProjectRequest: stubs.directory.UpsertProject,
        dpb.SetMembershipRequest: stubs.directory.SetMembership,
    }[type(message)]
    error = rich_error(await _fails(method(message, metadata=md)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "control characters" in error.violations[field]


async def test_project_of_unknown_workspace_is_refused(stubs: Stubs, tokens: Tokens) -> None:
    """A project can only join a workspace the directory knows."""
    error = rich_error(
        await _fails(
            stubs.directory.UpsertProject(
                dpb.UpsertProjectRequest(project_id="p", workspace_id="nowhere"),
                metadata=tokens.bearer(tokens.service(SCOPE_DIRECTORY)),
            )
        )
    )
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "WORKSPACE_UNKNOWN"


async def test_delete_project_removes_its_webhooks(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """Deleting a project deletes its webhooks and makes the project unknown."""
    await _create(stubs, tokens, "p-paid")
    response = await stubs.directory.DeleteProject(
        dpb.DeleteProjectRequest(project_id="p-paid"),
        metadata=tokens.bearer(tokens.service(SCOPE_DIRECTORY)),
    )
    assert response.deleted_webhook_count == 1
    error = rich_error(
        await _fails(
            stubs.webhooks.ListWebhooks(
                pb.ListWebhooksRequest(project_id="p-paid"),
                metadata=tokens.bearer(tokens.user("u-admin")),
            )
        )
    )
    assert error.code == grpc.StatusCode.NOT_FOUND
