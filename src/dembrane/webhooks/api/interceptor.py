"""The server interceptor: authenticates every call and turns domain errors into statuses.

Authentication happens inside the wrapped handler, in the call's own task, so the principal
put in a context variable here is the one the servicer reads. Health checks and reflection
are open; EventService and DirectoryService also need their service scope.

The interceptor also admits the calls: once the server begins to shut down, a call that
reaches it is answered UNAVAILABLE (reason ``SHUTTING_DOWN``) before any work is done, and
``Admission`` tells the server when the calls it took have all finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc
from google.protobuf.message import DecodeError

from dembrane.webhooks.api.errors import internal_status, to_status
from dembrane.webhooks.auth import (
    INVALID_SESSION,
    SCOPE_DIRECTORY,
    SCOPE_PUBLISH,
    Principal,
    TokenVerifier,
)
from dembrane.webhooks.domain.errors import (
    InvalidArgument,
    Unauthenticated,
    Unavailable,
    WebhooksError,
)
from dembrane.webhooks.store.database import OutageLog, store_unavailable

log = logging.getLogger(__name__)

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")

_STORE_UNAVAILABLE = Unavailable("The webhook store is unavailable; try again shortly.")
_SHUTTING_DOWN = Unavailable(
    "The webhook service is shutting down; try again shortly.", reason="SHUTTING_DOWN"
)

#: How long a shutdown waits for calls to stop arriving once those taken are answered, and
#: how: ``QUIET_LOOKS`` looks in a row, ``LOOK_SECONDS`` apart, that find no new call.
SETTLE_SECONDS = 1.0
QUIET_LOOKS = 5
LOOK_SECONDS = 0.01

_SEVERAL_AUTHORIZATIONS = (
    f"{INVALID_SESSION}: the call carries more than one authorization entry; send exactly one."
)

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
SERVICE_SCOPES = {
    "/dembrane.webhooks.v1.EventService/": SCOPE_PUBLISH,
    "/dembrane.webhooks.v1.DirectoryService/": SCOPE_DIRECTORY,
}


def current_principal() -> Principal:
    """The authenticated caller of the RPC being served."""
    return _principal.get()


Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


class Admission:
    """Whether the server still takes API calls, and how many it has taken and not answered.

    gRPC's own shutdown cuts off, with CANCELLED, every call it has received but not yet
    handed to the application (under load, a queue of them) and every call arriving while it
    stops. CANCELLED is not one clients retry. So the server first closes admission and keeps
    handing calls over: those it took finish, the rest are answered UNAVAILABLE; only once
    nothing is in hand and no call has come for a moment does gRPC stop.
    """

    def __init__(self) -> None:
        self.open = True
        #: Calls taken and not yet answered.
        self.in_flight = 0
        #: Every call that reached the interceptor, taken or refused.
        self.arrivals = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def take(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def done(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def close(self, deadline: float) -> None:
        """Take no more calls; return once every call taken has been answered and gRPC has
        handed over what it had queued, or at ``deadline`` (the loop's clock) at the latest.

        gRPC's queue counts as handed over once no call has arrived for a few looks in a
        row; while calls keep arriving, that is given at most ``SETTLE_SECONDS``: until
        gRPC stops, clients stay on this server's connection, and each of their calls is
        refused.
        """
        self.open = False
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), remaining)
        settled_by = min(deadline, loop.time() + SETTLE_SECONDS)
        # Counted in looks, not only in time: after the loop was held up, the calls gRPC
        # handed over meanwhile are seen a turn later.
        seen, quiet = self.arrivals, 0
        while quiet < QUIET_LOOKS and loop.time() + LOOK_SECONDS <= settled_by:
            await asyncio.sleep(LOOK_SECONDS)
            quiet = quiet + 1 if self.arrivals == seen else 0
            seen = self.arrivals


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Verifies the bearer token and the service scope, and maps errors to rich statuses."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier
        self.admission = Admission()
        # One outage of the store fails every call: logged once, not once per call.
        self._outage = OutageLog(log, "handling calls")
        #: The handler served for each method found so far. The server's handlers are fixed
        #: once it starts, so a method's is looked up and wrapped once, not on every call.
        self._handlers: dict[str, Any] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method: str = handler_call_details.method
        known = self._handlers.get(method)
        if known is not None:
            return known
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: not remembered, whatever its name
            return None
        served = self._serve(handler, method)
        self._handlers[method] = served
        return served

    def _serve(self, handler: Any, method: str) -> Any:
        """The handler to serve ``method`` with: ``handler`` itself for the open services,
        else wrapped with authentication."""
        if method.startswith(OPEN_SERVICES):
            return handler
        if handler.unary_unary is None:  # every RPC of the API is unary
            return handler
        scope = next((s for prefix, s in SERVICE_SCOPES.items() if method.startswith(prefix)), None)
        behavior = self._wrap(
            cast(Behavior, handler.unary_unary), handler.request_deserializer, scope, method
        )
        # The request arrives as bytes and is decoded inside the wrapped handler, so that a
        # malformed one is answered INVALID_ARGUMENT rather than an UNKNOWN with a traceback.
        return grpc.unary_unary_rpc_method_handler(
            behavior, response_serializer=handler.response_serializer
        )

    def _wrap(
        self,
        behavior: Behavior,
        deserialize: Callable[[bytes], Any] | None,
        scope: str | None,
        method: str,
    ) -> Behavior:
        verifier = self._verifier
        outage = self._outage
        admission = self.admission

        async def wrapped(raw: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            admission.arrivals += 1
            if not admission.open:
                await cast(Any, context).abort_with_status(to_status(_SHUTTING_DOWN))
            admission.take()
            try:
                principal = verifier.verify_header(_authorization(context))
                if scope is not None:
                    principal.require_scope(scope)
                _principal.set(principal)
                request = raw if deserialize is None else _decode(deserialize, raw, method)
                response = await behavior(request, context)
                outage.succeeded()
                return response
            except WebhooksError as error:
                await cast(Any, context).abort_with_status(to_status(error))
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                if store_unavailable(error):
                    outage.failed(error)
                    await cast(Any, context).abort_with_status(to_status(_STORE_UNAVAILABLE))
                log.exception("unexpected failure in %s", method)
                await cast(Any, context).abort_with_status(internal_status())
            finally:
                admission.done()

        return wrapped


def _authorization(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The call's one ``authorization`` entry, if any.

    Several entries are refused rather than one picked: a proxy or client library that adds
    its own would otherwise decide, unseen, whose call this is.
    """
    values = [
        value if isinstance(value, str) else value.decode()
        for key, value in context.invocation_metadata() or ()
        if key == "authorization"
    ]
    if len(values) > 1:
        raise Unauthenticated(_SEVERAL_AUTHORIZATIONS)
    return values[0] if values else None


def _decode(deserialize: Callable[[bytes], Any], raw: bytes, method: str) -> Any:
    try:
        return deserialize(raw)
    except DecodeError:
        raise InvalidArgument(
            f"The request is not a valid message for {method.rsplit('/', 1)[-1]}: its bytes "
            "could not be decoded (broken wire format or a string that is not UTF-8)."
        ) from None
