"""WebhookService: managing a project's webhooks, for its workspace's owners and admins.

Each RPC checks access and does its work in one store transaction where it can; URL checks
that need DNS happen between the access check and the write, off the store's threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.struct_pb2 import Struct
from sqlmodel import Session

from dembrane.webhooks.api import delivery_log
from dembrane.webhooks.api.convert import timestamp, webhook_status_from_pb, webhook_to_pb
from dembrane.webhooks.api.interceptor import current_principal
from dembrane.webhooks.delivery.sender import OutboundRequest, describe_test_outcome
from dembrane.webhooks.delivery.signing import generate_secret
from dembrane.webhooks.delivery.targets import check_target, validate_url_syntax
from dembrane.webhooks.domain import access as rules
from dembrane.webhooks.domain.errors import ErrorCollector, InvalidArgument, NotFound
from dembrane.webhooks.domain.ids import new_id
from dembrane.webhooks.domain.paging import Cursor, decode_token, encode_token, page_size
from dembrane.webhooks.domain.payload import (
    EVENT_TYPES,
    SUBSCRIBABLE_EVENT_TYPES,
    ProjectInfo,
    render_body,
    test_event,
)
from dembrane.webhooks.domain.webhooks import (
    DEFAULT_GRACE_SECONDS,
    MAX_GRACE_SECONDS,
    URL_MAX,
    WebhookStatus,
    check_events,
    check_name,
    check_secret,
    check_status,
    require,
    signing_secrets,
)
from dembrane.webhooks.resources import Resources
from dembrane.webhooks.store import directory, outbox, webhooks
from dembrane.webhooks.store.tables import ProjectRow, WebhookRow
from dembrane.webhooks.v1 import webhook_pb2, webhook_service_pb2_grpc
from dembrane.webhooks.v1 import webhook_service_pb2 as pb

T = TypeVar("T")

UPDATABLE_FIELDS = ("name", "url", "events", "secret", "status")

Context = grpc.aio.ServicerContext[object, object]


class WebhookServicer(webhook_service_pb2_grpc.WebhookServiceServicer):
    """The admin API of webhooks."""

    def __init__(self, resources: Resources) -> None:
        self._r = resources
        self._db = resources.database

    # -- access -------------------------------------------------------------------------

    async def _managed(
        self, project_id: str, work: Callable[[Session, rules.ProjectAccess], T]
    ) -> T:
        """Check that the caller manages the project, then run ``work`` in that transaction."""
        principal = current_principal()
        pid = require(project_id, "project_id", "project id")

        def job(session: Session) -> T:
            found = directory.project_access(session, pid, principal.user_id)
            granted = rules.check_can_manage(found, is_staff=principal.is_staff)
            return work(session, granted)

        return await self._db.run(job)

    async def _webhook(
        self,
        project_id: str,
        webhook_id: str,
        work: Callable[[Session, WebhookRow], T],
    ) -> T:
        """Check access, find the project's webhook, and run ``work`` on it."""
        wid = require(webhook_id, "webhook_id", "webhook id")

        def job(session: Session, _access: rules.ProjectAccess) -> T:
            row = webhooks.get_webhook(session, _access.project_id, wid)
            if row is None:
                raise NotFound(rules.WEBHOOK_NOT_FOUND, metadata={"resource": "webhook"})
            return work(session, row)

        return await self._managed(project_id, job)

    async def _check_url(self, url: str, errors: ErrorCollector) -> str:
        cleaned = url.strip()
        problem = validate_url_syntax(cleaned)
        if problem:
            errors.add("url", problem)
            return cleaned
        errors.raise_if_any()
        await check_target(cleaned, self._r.policy)
        return cleaned

    # -- CRUD -----------------------------------------------------------------------------

    async def ListWebhooks(
        self, request: pb.ListWebhooksRequest, context: Context
    ) -> pb.ListWebhooksResponse:
        limit = page_size(request.page_size)
        listing = f"ListWebhooks {request.project_id}"
        after = decode_token(request.page_token, listing)

        def work(session: Session, granted: rules.ProjectAccess) -> pb.ListWebhooksResponse:
            rows = webhooks.list_webhooks(session, granted.project_id, limit, after)
            token = ""
            if len(rows) > limit:
                rows = rows[:limit]
                token = encode_token(Cursor(rows[-1].created_at, rows[-1].id), listing)
            return pb.ListWebhooksResponse(
                webhooks=[webhook_to_pb(r) for r in rows], next_page_token=token
            )

        return await self._managed(request.project_id, work)

    async def GetWebhook(
        self, request: pb.GetWebhookRequest, context: Context
    ) -> pb.GetWebhookResponse:
        row = await self._webhook(request.project_id, request.webhook_id, lambda _s, r: r)
        return pb.GetWebhookResponse(webhook=webhook_to_pb(row))

    async def CreateWebhook(
        self, request: pb.CreateWebhookRequest, context: Context
    ) -> pb.CreateWebhookResponse:
        granted = await self._managed(request.project_id, lambda _s, a: a)
        errors = ErrorCollector()
        name = check_name(request.name, errors)
        events = check_events(request.events, SUBSCRIBABLE_EVENT_TYPES, errors)
        generated = not request.HasField("secret")
        secret = generate_secret() if generated else check_secret(request.secret, errors)
        status = WebhookStatus.PUBLISHED
        if request.status != webhook_pb2.WEBHOOK_STATUS_UNSPECIFIED:
            status = check_status(webhook_status_from_pb(request.status), errors) or status
        url = await self._check_url(request.url, errors)
        errors.raise_if_any()
        now = time.time()
        row = WebhookRow(
            id=new_id("wh"),
            project_id=granted.project_id,
            name=name,
            url=url,
            events=webhooks.encode_events(events),
            status=status.value,
            secret=secret,
            created_at=now,
            updated_at=now,
        )
        await self._db.run(webhooks.add_webhook, row, self._r.settings.max_webhooks_per_project)
        return pb.CreateWebhookResponse(
            webhook=webhook_to_pb(row), secret=secret if generated else ""
        )

    async def UpdateWebhook(
        self, request: pb.UpdateWebhookRequest, context: Context
    ) -> pb.UpdateWebhookResponse:
        # Who may see the webhook is settled first: a stranger learns nothing from a check.
        await self._webhook(request.project_id, request.webhook_id, lambda _s, r: r)
        paths = _update_paths(request)
        errors = ErrorCollector()
        changes: dict[str, object] = {}
        if "name" in paths:
            changes["name"] = check_name(request.name, errors)
        if "events" in paths:
            changes["events"] = webhooks.encode_events(
                check_events(request.events, SUBSCRIBABLE_EVENT_TYPES, errors)
            )
        if "secret" in paths:
            changes["secret"] = check_secret(request.secret, errors)
            changes["previous_secret"] = None
            changes["previous_secret_expires_at"] = None
        if "status" in paths:
            status = check_status(webhook_status_from_pb(request.status), errors)
            if status is not None:
                changes["status"] = status.value
                # The reason says why a webhook is disabled; a change of status (never to
                # disabled, which only the service sets) ends that.
                changes["disabled_reason"] = ""
                if status is WebhookStatus.PUBLISHED:
                    # Re-enabling starts a fresh record: old failures no longer count.
                    changes["failing_since"] = None
        if "url" in paths:
            changes["url"] = await self._check_url(request.url, errors)
        errors.raise_if_any()

        def work(session: Session, row: WebhookRow) -> tuple[WebhookRow, int]:
            if row.status == "archived" and changes.get("status", "archived") != "archived":
                webhooks.check_room(
                    session, row.project_id, self._r.settings.max_webhooks_per_project
                )
            moved = any(
                key in changes and changes[key] != getattr(row, key) for key in ("url", "status")
            )
            for key, value in changes.items():
                setattr(row, key, value)
            row.updated_at = time.time()
            session.add(row)
            resumed = webhooks.resume_pending(session, row.id, row.updated_at) if moved else 0
            if resumed:
                outbox.announce_due(session)
            return row, resumed

        row, resumed = await self._webhook(request.project_id, request.webhook_id, work)
        if resumed:
            self._r.wake_dispatcher()
        return pb.UpdateWebhookResponse(webhook=webhook_to_pb(row))

    async def DeleteWebhook(
        self, request: pb.DeleteWebhookRequest, context: Context
    ) -> pb.DeleteWebhookResponse:
        webhook_id = await self._webhook(
            request.project_id, request.webhook_id, lambda _session, row: row.id
        )
        deleted = await webhooks.delete_gradually(
            self._r.database,
            [webhook_id],
            lambda session: webhooks.delete_webhook(session, webhook_id),
        )
        if not deleted:
            # Deleted by a call that ran at the same time: one of them did it, as when they
            # come one after the other.
            raise NotFound(rules.WEBHOOK_NOT_FOUND, metadata={"resource": "webhook"})
        return pb.DeleteWebhookResponse()

    # -- test, copy, export -------------------------------------------------------------

    async def TestWebhook(
        self, request: pb.TestWebhookRequest, context: Context
    ) -> pb.TestWebhookResponse:
        def work(session: Session, row: WebhookRow) -> tuple[WebhookRow, ProjectInfo]:
            project = session.get(ProjectRow, row.project_id)
            assert project is not None  # the access check found it in this transaction
            return row, ProjectInfo(id=project.id, name=project.name, language=project.language)

        row, project = await self._webhook(request.project_id, request.webhook_id, work)
        now = time.time()
        event = test_event(project, _utc(now))
        body = render_body(event, project, self._r.settings.dashboard_base_url)
        outcome = await self._r.sender.send(
            OutboundRequest(
                url=row.url,
                body=body,
                event_type=event.type,
                event_id=event.id,
                delivery_id=new_id("dlv"),
                secrets=_signing_secrets(row, now),
            )
        )
        response = pb.TestWebhookResponse(
            success=outcome.success,
            message=describe_test_outcome(outcome),
            latency=_duration(outcome.latency),
        )
        if outcome.status_code is not None:
            response.status_code = outcome.status_code
        return response

    async def ListCopyableWebhooks(
        self, request: pb.ListCopyableWebhooksRequest, context: Context
    ) -> pb.ListCopyableWebhooksResponse:
        principal = current_principal()
        limit = page_size(request.page_size)
        listing = f"ListCopyableWebhooks {request.project_id} {principal.user_id}"
        after = decode_token(request.page_token, listing)

        def work(session: Session, granted: rules.ProjectAccess) -> pb.ListCopyableWebhooksResponse:
            names = directory.managed_project_names(session, principal.user_id)
            names.pop(granted.project_id, None)
            rows = webhooks.copyable_webhooks(session, sorted(names), limit, after)
            token = ""
            if len(rows) > limit:
                rows = rows[:limit]
                token = encode_token(Cursor(rows[-1].created_at, rows[-1].id), listing)
            return pb.ListCopyableWebhooksResponse(
                next_page_token=token,
                webhooks=[
                    webhook_pb2.CopyableWebhook(
                        id=r.id,
                        name=r.name,
                        url=r.url,
                        events=webhooks.events_of(r),
                        project_id=r.project_id,
                        project_name=names[r.project_id],
                    )
                    for r in rows
                ],
            )

        return await self._managed(request.project_id, work)

    async def ExportWebhook(
        self, request: pb.ExportWebhookRequest, context: Context
    ) -> pb.ExportWebhookResponse:
        row = await self._webhook(request.project_id, request.webhook_id, lambda _s, r: r)
        return pb.ExportWebhookResponse(name=row.name, url=row.url, events=webhooks.events_of(row))

    # -- secrets --------------------------------------------------------------------------

    async def GetWebhookSecret(
        self, request: pb.GetWebhookSecretRequest, context: Context
    ) -> pb.GetWebhookSecretResponse:
        row = await self._webhook(request.project_id, request.webhook_id, lambda _s, r: r)
        response = pb.GetWebhookSecretResponse(secret=row.secret)
        expires = row.previous_secret_expires_at
        if expires is not None and len(_signing_secrets(row, time.time())) > 1:
            response.previous_secret_expire_time.CopyFrom(timestamp(expires))
        return response

    async def RotateWebhookSecret(
        self, request: pb.RotateWebhookSecretRequest, context: Context
    ) -> pb.RotateWebhookSecretResponse:
        # Who may see the webhook is settled first: a stranger learns nothing from a check.
        await self._webhook(request.project_id, request.webhook_id, lambda _s, r: r)
        errors = ErrorCollector()
        secret = (
            check_secret(request.secret, errors)
            if request.HasField("secret")
            else generate_secret()
        )
        grace = float(DEFAULT_GRACE_SECONDS)
        if request.HasField("grace_period"):
            period = request.grace_period
            grace = period.seconds + period.nanos / 1e9
            if (
                (period.seconds < 0 < period.nanos)
                or (period.nanos < 0 < period.seconds)
                or not -1_000_000_000 < period.nanos < 1_000_000_000
            ):
                # google.protobuf.Duration: seconds and nanos must not differ in sign, and
                # nanos must stay within a second.
                errors.add("grace_period", "The grace period is not a valid duration.")
            elif grace < 0 or grace > MAX_GRACE_SECONDS:
                errors.add("grace_period", "The grace period must be between 0 and 7 days.")
        errors.raise_if_any()

        def work(session: Session, row: WebhookRow) -> float | None:
            now = time.time()
            expires = now + grace if grace > 0 else None
            row.previous_secret = row.secret if expires is not None else None
            row.previous_secret_expires_at = expires
            row.secret = secret
            row.updated_at = now
            session.add(row)
            return expires

        expires = await self._webhook(request.project_id, request.webhook_id, work)
        response = pb.RotateWebhookSecretResponse(secret=secret)
        if expires is not None:
            response.previous_secret_expire_time.CopyFrom(timestamp(expires))
        return response

    # -- catalog ----------------------------------------------------------------------------

    async def ListEventTypes(
        self, request: pb.ListEventTypesRequest, context: Context
    ) -> pb.ListEventTypesResponse:
        if request.project_id:
            principal = current_principal()
            await self._db.run(
                lambda s: rules.check_can_see(
                    directory.project_access(s, request.project_id, principal.user_id),
                    is_staff=principal.is_staff,
                )
            )
        return _CATALOG

    # -- the delivery log lives with the delivery engine ---------------------------------

    async def ListDeliveries(
        self, request: pb.ListDeliveriesRequest, context: Context
    ) -> pb.ListDeliveriesResponse:
        await self._webhook(request.project_id, request.webhook_id, lambda _s, r: r)
        return await delivery_log.list_deliveries(self._r, request)

    async def GetDelivery(
        self, request: pb.GetDeliveryRequest, context: Context
    ) -> pb.GetDeliveryResponse:
        await self._webhook(request.project_id, request.webhook_id, lambda _s, r: r)
        return await delivery_log.get_delivery(self._r, request)

    async def RetryDelivery(
        self, request: pb.RetryDeliveryRequest, context: Context
    ) -> pb.RetryDeliveryResponse:
        await self._webhook(request.project_id, request.webhook_id, lambda _s, r: r)
        return await delivery_log.retry_delivery(self._r, request)

    async def RecoverWebhook(
        self, request: pb.RecoverWebhookRequest, context: Context
    ) -> pb.RecoverWebhookResponse:
        await self._webhook(request.project_id, request.webhook_id, lambda _s, r: r)
        return await delivery_log.recover_webhook(self._r, request)


def _catalog() -> pb.ListEventTypesResponse:
    response = pb.ListEventTypesResponse()
    for info in EVENT_TYPES:
        example = Struct()
        example.update(info.example)
        response.event_types.append(
            webhook_pb2.EventType(
                name=info.name,
                description=info.description,
                example=example,
                subscribable=info.subscribable,
            )
        )
    return response


_CATALOG = _catalog()


def _update_paths(request: pb.UpdateWebhookRequest) -> set[str]:
    """The fields to change: the mask's paths, or every non-default field without a mask."""
    paths = set(request.update_mask.paths)
    unknown = paths - set(UPDATABLE_FIELDS)
    if unknown:
        raise InvalidArgument.for_field(
            "update_mask",
            f"The update mask names {', '.join(sorted(unknown))}; only "
            f"{', '.join(UPDATABLE_FIELDS)} can be changed.",
        )
    if not paths:
        paths = {
            name
            for name, present in (
                ("name", bool(request.name)),
                ("url", bool(request.url)),
                ("events", bool(request.events)),
                ("secret", bool(request.secret)),
                ("status", request.status != webhook_pb2.WEBHOOK_STATUS_UNSPECIFIED),
            )
            if present
        }
    if request.status == webhook_pb2.WEBHOOK_STATUS_UNSPECIFIED:
        # Unspecified means "leave as is", also where the mask names the field.
        paths.discard("status")
    if not paths:
        raise InvalidArgument.for_field("update_mask", "The request changes nothing.")
    if "url" in paths and len(request.url) > URL_MAX:
        raise InvalidArgument.for_field(
            "url", f"The URL must be at most {URL_MAX} characters long."
        )
    return paths


def _signing_secrets(row: WebhookRow, now: float) -> tuple[str, ...]:
    """The current secret, plus the previous one while its grace period lasts."""
    return signing_secrets(row.secret, row.previous_secret, row.previous_secret_expires_at, now)


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)
