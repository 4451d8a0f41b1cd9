"""The Test action: a signed `webhook.test` request, and the report of how the receiver answered."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from google.protobuf import field_mask_pb2

from dembrane.webhooks.v1 import webhook_pb2
from dembrane.webhooks.v1 import webhook_service_pb2 as pb

from harness import Stubs, Tokens, World
from receiver import Receiver, Reply, unused_port


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as running:
        yield running


async def _webhook(stubs: Stubs, tokens: Tokens, url: str, secret: str | None = None) -> str:
    request = pb.CreateWebhookRequest(
        project_id="p-paid", name="Hook", url=url, events=["conversation.summarized"]
    )
    if secret is not None:
        request.secret = secret
    created = await stubs.webhooks.CreateWebhook(
        request, metadata=tokens.bearer(tokens.user("u-admin"))
    )
    return created.secret or secret or ""


async def _test(stubs: Stubs, tokens: Tokens) -> pb.TestWebhookResponse:
    listed = await stubs.webhooks.ListWebhooks(
        pb.ListWebhooksRequest(project_id="p-paid"), metadata=tokens.bearer(tokens.user("u-admin"))
    )
    response: pb.TestWebhookResponse = await stubs.webhooks.TestWebhook(
        pb.TestWebhookRequest(project_id="p-paid", webhook_id=listed.webhooks[0].id),
        metadata=tokens.bearer(tokens.user("u-admin")),
    )
    return response


@pytest.mark.parametrize("secret", [None, "my-shared-secret"], ids=["generated", "plain"])
async def test_receiver_verifies_the_test_request_three_ways(
    stubs: Stubs, tokens: Tokens, world: World, receiver: Receiver, secret: str | None
) -> None:
    """The test request verifies by body HMAC, by re-serialized HMAC and with standardwebhooks."""
    receiver.secrets = (await _webhook(stubs, tokens, receiver.url, secret),)
    response = await _test(stubs, tokens)
    assert response.success
    assert response.status_code == 200
    assert response.message == "Webhook responded successfully with status 200"
    (request,) = receiver.requests
    assert request.body_signature_ok
    assert request.legacy_signature_ok
    assert request.standard_signature_ok
    assert request.headers["X-Dembrane-Event"] == "webhook.test"
    assert request.headers["X-Webhook-Event"] == "webhook.test"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"].startswith("Dembrane-Webhook/")
    body = request.json()
    assert isinstance(body, dict)
    assert body["event"] == "webhook.test"
    assert body["id"] == request.headers["webhook-id"]
    assert body["project"] == {"id": "p-paid", "language": "en", "name": "Paid project"}
    assert set(body["conversation"]) >= {
        "id",
        "created_at",
        "updated_at",
        "participant_name",
        "duration",
        "source",
        "is_finished",
        "is_all_chunks_transcribed",
        "tags",
        "emails_csv",
    }


async def test_error_status_reports_the_body_start(
    stubs: Stubs, tokens: Tokens, world: World, receiver: Receiver
) -> None:
    """A non-2xx answer is reported with its status and the first 200 characters of its body."""
    await _webhook(stubs, tokens, receiver.url)
    receiver.respond(Reply(500, body=b"E" * 300))
    response = await _test(stubs, tokens)
    assert not response.success
    assert response.status_code == 500
    assert response.message == "Webhook returned error status 500: " + "E" * 200


async def test_connection_failure_has_no_status(stubs: Stubs, tokens: Tokens, world: World) -> None:
    """When nothing listens, the report has no status code and says it failed to connect."""
    await _webhook(stubs, tokens, f"http://127.0.0.1:{unused_port()}/hook")
    response = await _test(stubs, tokens)
    assert not response.success
    assert not response.HasField("status_code")
    assert response.message.startswith("Failed to connect to webhook: ")


async def test_test_is_sent_whatever_the_status(
    stubs: Stubs, tokens: Tokens, world: World, receiver: Receiver
) -> None:
    """A paused (draft) webhook can still be tested."""
    await _webhook(stubs, tokens, receiver.url)
    listed = await stubs.webhooks.ListWebhooks(
        pb.ListWebhooksRequest(project_id="p-paid"), metadata=tokens.bearer(tokens.user("u-admin"))
    )
    await stubs.webhooks.UpdateWebhook(
        pb.UpdateWebhookRequest(
            project_id="p-paid",
            webhook_id=listed.webhooks[0].id,
            status=webhook_pb2.WEBHOOK_STATUS_DRAFT,
            update_mask=field_mask_pb2.FieldMask(paths=["status"]),
        ),
        metadata=tokens.bearer(tokens.user("u-admin")),
    )
    response = await _test(stubs, tokens)
    assert response.success
    assert len(receiver.requests) == 1


async def test_rotation_signs_with_both_secrets(
    stubs: Stubs, tokens: Tokens, world: World, receiver: Receiver
) -> None:
    """During a rotation's grace period the request carries a signature for each secret."""
    old = await _webhook(stubs, tokens, receiver.url, "the-old-secret")
    listed = await stubs.webhooks.ListWebhooks(
        pb.ListWebhooksRequest(project_id="p-paid"), metadata=tokens.bearer(tokens.user("u-admin"))
    )
    rotated = await stubs.webhooks.RotateWebhookSecret(
        pb.RotateWebhookSecretRequest(project_id="p-paid", webhook_id=listed.webhooks[0].id),
        metadata=tokens.bearer(tokens.user("u-admin")),
    )
    for secret in (old, rotated.secret):
        receiver.secrets = (secret,)
        receiver.requests.clear()
        await _test(stubs, tokens)
        assert receiver.requests[0].standard_signature_ok, secret
    assert len(receiver.requests[0].headers["webhook-signature"].split(" ")) == 2
