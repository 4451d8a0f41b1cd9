"""Managing webhooks over gRPC: create, read, list with pagination, update by mask, delete,
copy, export, secrets and the event catalog."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2, json_format

from dembrane.webhooks.api.convert import seconds, timestamp
from dembrane.webhooks.config import Settings
from dembrane.webhooks.v1 import webhook_pb2
from dembrane.webhooks.v1 import webhook_service_pb2 as pb

from grpc_helpers import rich_error
from harness import Stubs, Tokens, World, make_settings

URL = "http://127.0.0.1:9/hook"


def admin(tokens: Tokens) -> tuple[tuple[str, str]]:
    return tokens.bearer(tokens.user("u-admin"))


async def create(
    stubs: Stubs,
    tokens: Tokens,
    *,
    project: str = "p-paid",
    name: str = "Hook",
    events: tuple[str, ...] = ("conversation.started",),
    secret: str | None = None,
    status: int = webhook_pb2.WEBHOOK_STATUS_UNSPECIFIED,
) -> pb.CreateWebhookResponse:
    request = pb.CreateWebhookRequest(
        project_id=project, name=name, url=URL, events=list(events), status=status
    )
    if secret is not None:
        request.secret = secret
    response: pb.CreateWebhookResponse = await stubs.webhooks.CreateWebhook(
        request, metadata=admin(tokens)
    )
    return response


async def test_create_generates_a_secret_shown_once(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """Without a secret the service makes a whsec_ one and returns it only in the create answer."""
    created = await create(stubs, tokens, events=("conversation.started", "report.generated"))
    assert created.secret.startswith("whsec_")
    assert len(base64.b64decode(created.secret.removeprefix("whsec_"))) == 24
    webhook = created.webhook
    assert webhook.id.startswith("wh_")
    assert webhook.status == webhook_pb2.WEBHOOK_STATUS_PUBLISHED
    assert list(webhook.events) == ["conversation.started", "report.generated"]
    assert webhook.create_time.seconds > 0
    fetched = await stubs.webhooks.GetWebhook(
        pb.GetWebhookRequest(project_id="p-paid", webhook_id=webhook.id), metadata=admin(tokens)
    )
    listed = await stubs.webhooks.ListWebhooks(
        pb.ListWebhooksRequest(project_id="p-paid"), metadata=admin(tokens)
    )
    for message in (fetched, listed):
        assert created.secret not in json_format.MessageToJson(message)
        assert created.secret.encode() not in message.SerializeToString()
    secret = await stubs.webhooks.GetWebhookSecret(
        pb.GetWebhookSecretRequest(project_id="p-paid", webhook_id=webhook.id),
        metadata=admin(tokens),
    )
    assert secret.secret == created.secret


async def test_create_with_own_secret_does_not_echo_it(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """A caller-supplied secret is stored but not sent back."""
    created = await create(stubs, tokens, secret="my-shared-secret")
    assert created.secret == ""
    secret = await stubs.webhooks.GetWebhookSecret(
        pb.GetWebhookSecretRequest(project_id="p-paid", webhook_id=created.webhook.id),
        metadata=admin(tokens),
    )
    assert secret.secret == "my-shared-secret"


async def test_duplicate_events_are_collapsed(stubs: Stubs, tokens: Tokens, world: World) -> None:
    """Subscribing to the same type twice keeps it once, in first-seen order."""
    created = await create(
        stubs, tokens, events=("report.generated", "conversation.started", "report.generated")
    )
    assert list(created.webhook.events) == ["report.generated", "conversation.started"]


@pytest.mark.parametrize(
    ("field", "request_fields"),
    [
        ("name", {"name": "x" * 201}),
        ("name", {"name": "   "}),
        ("url", {"url": "http://127.0.0.1/" + "a" * 2048}),
        ("url", {"url": "javascript:alert(1)"}),
        ("url", {"url": "http:///no-host"}),
        ("events", {"events": []}),
        ("events", {"events": ["webhook.test"]}),
        ("secret", {"secret": "x" * 257}),
        ("status", {"status": webhook_pb2.WEBHOOK_STATUS_DISABLED}),
        # Control characters: PostgreSQL cannot store a NUL, and none belongs in these.
        ("name", {"name": "Hook\x00one"}),
        ("name", {"name": "Hook\x1b[31m"}),
        ("url", {"url": "http://127.0.0.1:9/n\x00ul"}),
        ("url", {"url": "http://127.0.0.1:9/\x7f"}),
        ("secret", {"secret": "secret\x00value"}),
        # Standard Webhooks libraries decode what follows whsec_, so it must be base64.
        ("secret", {"secret": "whsec_!!!notbase64"}),
        # Its key is what signs: three bytes, though the secret has ten characters.
        ("secret", {"secret": "whsec_QUJD"}),
        # Without its padding, which Go's Standard Webhooks library cannot decode.
        ("secret", {"secret": "whsec_QUJDREVGR0hJSktMTU5PUA"}),
        # Names are shown to other projects' admins: nothing that disguises or hides them.
        ("name", {"name": "\u202eevil"}),
        ("name", {"name": "Hook \u2066one\u2069"}),
        ("name", {"name": "\u200b"}),
        ("name", {"name": "\ufeff \u2060"}),
        ("name", {"name": "\u3164"}),
        ("name", {"name": "\u2800\ufe0f\u034f"}),
    ],
)
async def test_create_validation(
    stubs: Stubs, tokens: Tokens, world: World, field: str, request_fields: dict[str, object]
) -> None:
    """Each invalid field is refused with a violation naming it."""
    request = pb.CreateWebhookRequest(
        project_id="p-paid", name="Hook", url=URL, events=["conversation.started"]
    )
    for key, value in request_fields.items():
        if key == "events":
            del request.events[:]
            request.events.extend(value)  # type: ignore[arg-type]
        else:
            setattr(request, key, value)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.webhooks.CreateWebhook(request, metadata=admin(tokens))
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.violations, error.violations


@pytest.mark.parametrize(
    ("events", "says"),
    [
        (["webhook.test"], "webhook.test cannot be subscribed to: the Test action sends it to"),
        (
            ["webhook.test", "nope"],
            "webhook.test cannot be subscribed to: the Test action sends it to any webhook. "
            "Unknown event type 'nope'; the types to subscribe to are conversation.started",
        ),
        (["nope"], "Unknown event type 'nope'; the types to subscribe to are "),
    ],
)
async def test_subscribing_to_the_test_event_says_why_it_cannot(
    stubs: Stubs, tokens: Tokens, world: World, events: list[str], says: str
) -> None:
    """webhook.test, which ListEventTypes lists as not subscribable, is refused as such rather
    than as an unknown type, and a truly unknown type beside it is still named unknown."""
    request = pb.CreateWebhookRequest(project_id="p-paid", name="Hook", url=URL, events=events)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.webhooks.CreateWebhook(request, metadata=admin(tokens))
    assert rich_error(caught.value).violations["events"].startswith(says)


async def test_private_targets_are_refused_when_not_allowed(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """A URL resolving to a private address outside the allowed ranges is refused on save."""
    for url in ("http://10.1.2.3/hook", "http://169.254.169.254/latest", "http://[::1]:80/"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stubs.webhooks.CreateWebhook(
                pb.CreateWebhookRequest(
                    project_id="p-paid", name="Hook", url=url, events=["conversation.started"]
                ),
                metadata=admin(tokens),
            )
        error = rich_error(caught.value)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "url" in error.violations


async def test_list_is_newest_first_and_paginated(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """Pages follow each other without overlap, newest first, until an empty token."""
    ids = [(await create(stubs, tokens, name=f"Hook {i}")).webhook.id for i in range(5)]
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await stubs.webhooks.ListWebhooks(
            pb.ListWebhooksRequest(project_id="p-paid", page_size=2, page_token=token),
            metadata=admin(tokens),
        )
        pages += 1
        assert len(page.webhooks) <= 2
        seen.extend(w.id for w in page.webhooks)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == list(reversed(ids))
    everything = await stubs.webhooks.ListWebhooks(
        pb.ListWebhooksRequest(project_id="p-paid", page_size=1000), metadata=admin(tokens)
    )
    assert [w.id for w in everything.webhooks] == seen


async def test_bad_page_token_and_size(stubs: Stubs, tokens: Tokens, world: World) -> None:
    """A page token the service did not issue (garbage, or a cursor at a time that is not a
    finite number), or a negative size, is INVALID_ARGUMENT."""
    forged = [
        base64.urlsafe_b64encode(raw).decode().rstrip("=")
        for raw in (b'[NaN,"x"]', b'[1e400,"x"]', b'[Infinity,"x"]')
    ]
    for request in (
        *(pb.ListWebhooksRequest(project_id="p-paid", page_token=token) for token in forged),
        pb.ListWebhooksRequest(project_id="p-paid", page_token="garbage!"),
        pb.ListWebhooksRequest(project_id="p-paid", page_size=-1),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stubs.webhooks.ListWebhooks(request, metadata=admin(tokens))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_ids_and_page_tokens_with_control_characters_are_refused(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """A NUL in a project id, webhook id, delivery id or page token is INVALID_ARGUMENT naming
    the field, on every database (PostgreSQL cannot even look such a value up)."""
    webhook_id = (await create(stubs, tokens)).webhook.id
    forged = base64.urlsafe_b64encode(b'[1.0,"a\\u0000b"]').decode().rstrip("=")
    for field, method, request in [
        ("project_id", stubs.webhooks.ListWebhooks, pb.ListWebhooksRequest(project_id="p\x00x")),
        (
            "page_token",
            stubs.webhooks.ListWebhooks,
            pb.ListWebhooksRequest(project_id="p-paid", page_token=forged),
        ),
        (
            "webhook_id",
            stubs.webhooks.GetWebhook,
            pb.GetWebhookRequest(project_id="p-paid", webhook_id="w\x00"),
        ),
        (
            "delivery_id",
            stubs.webhooks.GetDelivery,
            pb.GetDeliveryRequest(project_id="p-paid", webhook_id=webhook_id, delivery_id="d\x00"),
        ),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await method(request, metadata=admin(tokens))
        error = rich_error(caught.value)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, (field, error)
        assert field in error.violations, (field, error.violations)


async def test_update_changes_only_masked_fields(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """Fields outside the update mask keep their values even when the request sets them."""
    created = await create(stubs, tokens)
    updated = await stubs.webhooks.UpdateWebhook(
        pb.UpdateWebhookRequest(
            project_id="p-paid",
            webhook_id=created.webhook.id,
            name="Renamed",
            url="http://127.0.0.1:10/other",
            events=["report.generated"],
            update_mask=field_mask_pb2.FieldMask(paths=["name", "events"]),
        ),
        metadata=admin(tokens),
    )
    webhook = updated.webhook
    assert webhook.name == "Renamed"
    assert list(webhook.events) == ["report.generated"]
    assert webhook.url == URL
    assert webhook.update_time.ToNanoseconds() >= webhook.create_time.ToNanoseconds()


async def test_update_without_mask_changes_set_fields(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """With an empty mask, every field set to a non-default value changes."""
    created = await create(stubs, tokens)
    updated = await stubs.webhooks.UpdateWebhook(
        pb.UpdateWebhookRequest(
            project_id="p-paid",
            webhook_id=created.webhook.id,
            status=webhook_pb2.WEBHOOK_STATUS_DRAFT,
        ),
        metadata=admin(tokens),
    )
    assert updated.webhook.status == webhook_pb2.WEBHOOK_STATUS_DRAFT
    assert updated.webhook.name == "Hook"


async def test_update_rejects_unknown_mask_paths_and_empty_changes(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """Masks may only name updatable fields, and an update must change something."""
    created = await create(stubs, tokens)
    for request in (
        pb.UpdateWebhookRequest(
            project_id="p-paid",
            webhook_id=created.webhook.id,
            update_mask=field_mask_pb2.FieldMask(paths=["id"]),
        ),
        pb.UpdateWebhookRequest(project_id="p-paid", webhook_id=created.webhook.id),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stubs.webhooks.UpdateWebhook(request, metadata=admin(tokens))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_update_secret_and_validation(stubs: Stubs, tokens: Tokens, world: World) -> None:
    """A masked secret change replaces the secret; a masked bad value is refused."""
    created = await create(stubs, tokens)
    await stubs.webhooks.UpdateWebhook(
        pb.UpdateWebhookRequest(
            project_id="p-paid",
            webhook_id=created.webhook.id,
            secret="a-brand-new-secret",
            update_mask=field_mask_pb2.FieldMask(paths=["secret"]),
        ),
        metadata=admin(tokens),
    )
    secret = await stubs.webhooks.GetWebhookSecret(
        pb.GetWebhookSecretRequest(project_id="p-paid", webhook_id=created.webhook.id),
        metadata=admin(tokens),
    )
    assert secret.secret == "a-brand-new-secret"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.webhooks.UpdateWebhook(
            pb.UpdateWebhookRequest(
                project_id="p-paid",
                webhook_id=created.webhook.id,
                name="",
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            ),
            metadata=admin(tokens),
        )
    assert "name" in rich_error(caught.value).violations


async def test_delete_removes_the_webhook(stubs: Stubs, tokens: Tokens, world: World) -> None:
    """After a delete the webhook is not found and not listed."""
    created = await create(stubs, tokens)
    request = pb.DeleteWebhookRequest(project_id="p-paid", webhook_id=created.webhook.id)
    await stubs.webhooks.DeleteWebhook(request, metadata=admin(tokens))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.webhooks.DeleteWebhook(request, metadata=admin(tokens))
    assert caught.value.details() == "Webhook not found"
    listed = await stubs.webhooks.ListWebhooks(
        pb.ListWebhooksRequest(project_id="p-paid"), metadata=admin(tokens)
    )
    assert list(listed.webhooks) == []


async def test_deletes_at_the_same_time_succeed_once(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """Of several deletes of one webhook at once, one succeeds and the others find no
    webhook, as when they come one after the other."""
    created = await create(stubs, tokens)
    request = pb.DeleteWebhookRequest(project_id="p-paid", webhook_id=created.webhook.id)
    answers = await asyncio.gather(
        *(stubs.webhooks.DeleteWebhook(request, metadata=admin(tokens)) for _ in range(4)),
        return_exceptions=True,
    )
    refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert len(refused) == 3
    assert all(error.code() == grpc.StatusCode.NOT_FOUND for error in refused)


async def test_copyable_lists_published_webhooks_of_other_projects(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """Copyable webhooks come from the caller's other managed projects, published ones only."""
    own = await create(stubs, tokens, project="p-paid", name="Own")
    other = await create(stubs, tokens, project="p-paid-2", name="Other")
    await create(
        stubs, tokens, project="p-paid-2", name="Draft", status=webhook_pb2.WEBHOOK_STATUS_DRAFT
    )
    response = await stubs.webhooks.ListCopyableWebhooks(
        pb.ListCopyableWebhooksRequest(project_id="p-paid"), metadata=admin(tokens)
    )
    assert [w.id for w in response.webhooks] == [other.webhook.id]
    copyable = response.webhooks[0]
    assert copyable.project_name == "Second project"
    assert copyable.project_id == "p-paid-2"
    assert own.webhook.id not in {w.id for w in response.webhooks}
    assert other.secret not in json_format.MessageToJson(response)


async def test_export_has_no_secret(stubs: Stubs, tokens: Tokens, world: World) -> None:
    """Exporting gives name, URL and events, and nothing secret."""
    created = await create(stubs, tokens, secret="export-secret-123")
    exported = await stubs.webhooks.ExportWebhook(
        pb.ExportWebhookRequest(project_id="p-paid", webhook_id=created.webhook.id),
        metadata=admin(tokens),
    )
    assert (exported.name, exported.url, list(exported.events)) == (
        "Hook",
        URL,
        ["conversation.started"],
    )
    assert "export-secret-123" not in json_format.MessageToJson(exported)


async def test_rotation_keeps_the_previous_secret_for_the_grace_period(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """Rotating sets a new secret and reports when the previous one stops signing."""
    created = await create(stubs, tokens, secret="first-secret-value")
    rotated = await stubs.webhooks.RotateWebhookSecret(
        pb.RotateWebhookSecretRequest(
            project_id="p-paid",
            webhook_id=created.webhook.id,
            grace_period=duration_pb2.Duration(seconds=3600),
        ),
        metadata=admin(tokens),
    )
    assert rotated.secret.startswith("whsec_")
    assert rotated.HasField("previous_secret_expire_time")
    shown = await stubs.webhooks.GetWebhookSecret(
        pb.GetWebhookSecretRequest(project_id="p-paid", webhook_id=created.webhook.id),
        metadata=admin(tokens),
    )
    assert shown.secret == rotated.secret
    assert shown.previous_secret_expire_time == rotated.previous_secret_expire_time
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.webhooks.RotateWebhookSecret(
            pb.RotateWebhookSecretRequest(
                project_id="p-paid",
                webhook_id=created.webhook.id,
                grace_period=duration_pb2.Duration(seconds=8 * 86400),
            ),
            metadata=admin(tokens),
        )
    assert "grace_period" in rich_error(caught.value).violations


async def test_a_grace_period_of_exactly_seven_days_is_taken(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """The longest grace period (7 days, the OpenAPI schema's maximum) is allowed, a second
    more is not: the schema and the server draw the line in the same place."""
    created = await create(stubs, tokens, secret="first-secret-value")

    def rotate(seconds: int) -> pb.RotateWebhookSecretRequest:
        return pb.RotateWebhookSecretRequest(
            project_id="p-paid",
            webhook_id=created.webhook.id,
            grace_period=duration_pb2.Duration(seconds=seconds),
        )

    before = time.time()
    rotated = await stubs.webhooks.RotateWebhookSecret(rotate(7 * 86400), metadata=admin(tokens))
    expires = rotated.previous_secret_expire_time.seconds
    assert int(before) + 7 * 86400 - 1 <= expires <= time.time() + 7 * 86400 + 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.webhooks.RotateWebhookSecret(rotate(7 * 86400 + 1), metadata=admin(tokens))
    assert "grace_period" in rich_error(caught.value).violations


async def test_event_catalog_describes_every_type(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """The catalog lists the contract's five types with a description and an example body."""
    response = await stubs.webhooks.ListEventTypes(
        pb.ListEventTypesRequest(project_id="p-paid"), metadata=admin(tokens)
    )
    by_name = {t.name: t for t in response.event_types}
    assert set(by_name) == {
        "conversation.started",
        "conversation.transcribed",
        "conversation.summarized",
        "report.generated",
        "webhook.test",
    }
    assert not by_name["webhook.test"].subscribable
    for name, event_type in by_name.items():
        assert event_type.description.endswith(".")
        example = json_format.MessageToDict(event_type.example)
        assert example["event"] == name
    assert (
        "summary"
        in json_format.MessageToDict(by_name["conversation.summarized"].example)["conversation"]
    )
    assert "report" in json_format.MessageToDict(by_name["report.generated"].example)


class TestPaging:
    """Pages of a project allowed more webhooks than the largest page."""

    @pytest.fixture
    def settings(self, tmp_path: Path) -> Settings:
        return make_settings(tmp_path, max_webhooks_per_project=1000)

    async def test_page_size_defaults_to_50_and_stops_at_200(
        self, stubs: Stubs, tokens: Tokens, world: World
    ) -> None:
        """Without a size a page holds 50 webhooks; asking for more than 200 gives 200."""
        await asyncio.gather(*(create(stubs, tokens, name=f"Hook {i}") for i in range(205)))
        default = await stubs.webhooks.ListWebhooks(
            pb.ListWebhooksRequest(project_id="p-paid"), metadata=admin(tokens)
        )
        assert len(default.webhooks) == 50
        assert default.next_page_token
        largest = await stubs.webhooks.ListWebhooks(
            pb.ListWebhooksRequest(project_id="p-paid", page_size=1000), metadata=admin(tokens)
        )
        assert len(largest.webhooks) == 200
        rest = await stubs.webhooks.ListWebhooks(
            pb.ListWebhooksRequest(
                project_id="p-paid", page_size=1000, page_token=largest.next_page_token
            ),
            metadata=admin(tokens),
        )
        assert len(rest.webhooks) == 5
        assert rest.next_page_token == ""


class TestWebhookLimit:
    """A project holds at most WEBHOOKS_MAX_WEBHOOKS_PER_PROJECT webhooks, archived aside."""

    @pytest.fixture
    def settings(self, tmp_path: Path) -> Settings:
        return make_settings(tmp_path, max_webhooks_per_project=2)

    @staticmethod
    async def _set_status(stubs: Stubs, tokens: Tokens, webhook_id: str, status: int) -> None:
        await stubs.webhooks.UpdateWebhook(
            pb.UpdateWebhookRequest(
                project_id="p-paid",
                webhook_id=webhook_id,
                status=status,
                update_mask=field_mask_pb2.FieldMask(paths=["status"]),
            ),
            metadata=admin(tokens),
        )

    async def test_the_limit_refuses_one_more_until_one_is_archived_or_deleted(
        self, stubs: Stubs, tokens: Tokens, world: World
    ) -> None:
        """The third webhook of a project limited to two is refused with FAILED_PRECONDITION
        and reason WEBHOOK_LIMIT_REACHED; archiving one makes room, bringing it back from the
        archive is refused while the project is full, and a delete makes room again."""
        first = await create(stubs, tokens)
        await create(stubs, tokens)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await create(stubs, tokens)
        error = rich_error(caught.value)
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert error.reason == "WEBHOOK_LIMIT_REACHED"
        assert error.metadata == {"limit": "2"}
        assert "already has 2 webhooks" in error.message
        await create(stubs, tokens, project="p-paid-2")  # other projects keep their room

        await self._set_status(stubs, tokens, first.webhook.id, webhook_pb2.WEBHOOK_STATUS_ARCHIVED)
        third = await create(stubs, tokens)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await self._set_status(
                stubs, tokens, first.webhook.id, webhook_pb2.WEBHOOK_STATUS_PUBLISHED
            )
        assert rich_error(caught.value).reason == "WEBHOOK_LIMIT_REACHED"
        await stubs.webhooks.DeleteWebhook(
            pb.DeleteWebhookRequest(project_id="p-paid", webhook_id=third.webhook.id),
            metadata=admin(tokens),
        )
        await self._set_status(
            stubs, tokens, first.webhook.id, webhook_pb2.WEBHOOK_STATUS_PUBLISHED
        )


async def test_an_unspecified_status_named_in_the_mask_leaves_the_status_as_is(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """WEBHOOK_STATUS_UNSPECIFIED means 'leave as is' even where the mask names status: the
    other masked fields change and the status stays; alone it changes nothing."""
    created = await create(stubs, tokens)
    updated = await stubs.webhooks.UpdateWebhook(
        pb.UpdateWebhookRequest(
            project_id="p-paid",
            webhook_id=created.webhook.id,
            name="Renamed",
            update_mask=field_mask_pb2.FieldMask(paths=["name", "status"]),
        ),
        metadata=admin(tokens),
    )
    assert (updated.webhook.name, updated.webhook.status) == (
        "Renamed",
        webhook_pb2.WEBHOOK_STATUS_PUBLISHED,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.webhooks.UpdateWebhook(
            pb.UpdateWebhookRequest(
                project_id="p-paid",
                webhook_id=created.webhook.id,
                update_mask=field_mask_pb2.FieldMask(paths=["status"]),
            ),
            metadata=admin(tokens),
        )
    assert rich_error(caught.value).violations == {"update_mask": "The request changes nothing."}


async def test_an_unknown_status_value_is_named_as_unknown(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """A status number the API does not define is refused with the statuses one may set,
    not with the sentence about 'disabled'."""
    request = pb.CreateWebhookRequest(
        project_id="p-paid", name="Hook", url=URL, events=["conversation.started"]
    )
    request.status = 99  # type: ignore[assignment]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.webhooks.CreateWebhook(request, metadata=admin(tokens))
    assert rich_error(caught.value).violations == {
        "status": "The status must be published, draft or archived."
    }


async def test_a_stranger_learns_nothing_from_a_bad_update_or_rotation(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """A caller outside the project's workspace gets NOT_FOUND for an update or a rotation,
    however malformed, never the validation of the request."""
    created = await create(stubs, tokens)
    stranger = tokens.bearer(tokens.user("u-outsider"))
    calls = [
        stubs.webhooks.UpdateWebhook(
            pb.UpdateWebhookRequest(
                project_id="p-paid",
                webhook_id=created.webhook.id,
                update_mask=field_mask_pb2.FieldMask(paths=["bogus"]),
            ),
            metadata=stranger,
        ),
        stubs.webhooks.RotateWebhookSecret(
            pb.RotateWebhookSecretRequest(
                project_id="p-paid", webhook_id=created.webhook.id, secret="x"
            ),
            metadata=stranger,
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("seconds", "nanos"), [(10, -500), (0, 1_500_000_000), (0, 2_147_483_647), (0, -1_000_000_000)]
)
async def test_a_grace_period_that_is_no_valid_duration_is_refused(
    stubs: Stubs, tokens: Tokens, world: World, seconds: int, nanos: int
) -> None:
    """A Duration whose seconds and nanos differ in sign, or whose nanos make a second or
    more, is not a valid duration (rather than read as some other length)."""
    created = await create(stubs, tokens)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.webhooks.RotateWebhookSecret(
            pb.RotateWebhookSecretRequest(
                project_id="p-paid",
                webhook_id=created.webhook.id,
                grace_period=duration_pb2.Duration(seconds=seconds, nanos=nanos),
            ),
            metadata=admin(tokens),
        )
    assert rich_error(caught.value).violations == {
        "grace_period": "The grace period is not a valid duration."
    }


async def test_times_are_given_to_the_microsecond_the_store_keeps(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """A stored time reads the same over gRPC as over REST (whole microseconds, no float
    noise in the nanos), and never later than stored, so it may start a range that
    includes what it was read from."""
    created = await create(stubs, tokens)
    assert created.webhook.create_time.nanos % 1000 == 0
    stored = 1764418612.928662
    assert timestamp(stored).ToMicroseconds() == 1764418612928662
    assert seconds(timestamp(stored)) <= stored
    assert timestamp(-0.5).ToMicroseconds() == -500_000
