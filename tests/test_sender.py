"""The HTTP sender against a real receiver on 127.0.0.1 that verifies every signature."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from dembrane.webhooks.delivery.sender import (
    RESPONSE_BODY_LIMIT,
    AttemptOutcome,
    OutboundRequest,
    Sender,
    _target,
    describe_test_outcome,
    parse_retry_after,
)
from dembrane.webhooks.delivery.signing import generate_secret
from dembrane.webhooks.delivery.targets import TargetPolicy
from dembrane.webhooks.domain.payload import ProjectInfo, render_body, test_event

from receiver import Receiver, Reply, unused_port

LOOPBACK = TargetPolicy([ipaddress.ip_network("127.0.0.0/8")])
PROJECT = ProjectInfo(id="p1", name="Café Zuid", language="nl")


def _request(url: str, *secrets: str) -> OutboundRequest:
    event = test_event(PROJECT, datetime.now(UTC))
    return OutboundRequest(
        url=url,
        body=render_body(event, PROJECT, "https://dashboard.example.test"),
        event_type=event.type,
        event_id=event.id,
        delivery_id="dlv_1",
        secrets=secrets or ("my-shared-secret",),
    )


@pytest.fixture
async def sender() -> AsyncIterator[Sender]:
    async with Sender(connect_timeout=2.0, request_timeout=5.0, policy=LOOPBACK) as running:
        yield running


@pytest.mark.parametrize("secret", ["my-shared-secret", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"])
async def test_receiver_verifies_all_three_ways(sender: Sender, secret: str) -> None:
    """Body HMAC, legacy re-serialized HMAC and Standard Webhooks all verify on a real receiver."""
    async with Receiver(secret) as receiver:
        request = _request(receiver.url, secret)
        outcome = await sender.send(request)
        assert outcome.success
        assert outcome.status_code == 200
        assert outcome.error == ""
        assert outcome.response_body == "ok"
        [received] = receiver.requests
    assert received.body == request.body
    assert received.body_signature_ok
    assert received.legacy_signature_ok
    assert received.standard_signature_ok
    assert received.verified
    assert received.headers["X-Dembrane-Event"] == "webhook.test"
    assert received.headers["webhook-id"] == request.event_id
    assert received.headers["X-Dembrane-Delivery"] == "dlv_1"
    assert received.headers["content-type"] == "application/json"
    assert received.headers["User-Agent"].startswith("Dembrane-Webhook/")


async def test_the_request_carries_the_contracts_headers_and_no_others(sender: Sender) -> None:
    """Besides ``Host`` and ``Content-Length``, a receiver gets exactly the headers the
    contract lists: no cookies, no compression offers, nothing of the client's own."""
    async with Receiver("s") as receiver:
        request = _request(receiver.url, "s")
        await sender.send(request)
        [received] = receiver.requests
    assert sorted(name.lower() for name in received.headers) == sorted(
        [
            "host",
            "content-length",
            "content-type",
            "user-agent",
            "x-dembrane-event",
            "x-webhook-event",
            "x-dembrane-delivery",
            "x-dembrane-signature",
            "x-webhook-signature",
            "webhook-id",
            "webhook-timestamp",
            "webhook-signature",
        ]
    )
    assert received.headers["Host"] == f"127.0.0.1:{receiver.port}"
    assert received.headers["Content-Length"] == str(len(request.body))
    assert received.method == "POST"


@pytest.mark.parametrize(
    ("url", "start"),
    [
        ("http://example.com/hook", "POST /hook HTTP/1.1\r\nHost: example.com\r\n"),
        ("http://example.com:80/a?b=1", "POST /a?b=1 HTTP/1.1\r\nHost: example.com\r\n"),
        ("https://example.com:443", "POST / HTTP/1.1\r\nHost: example.com\r\n"),
        ("https://example.com:8443/x", "POST /x HTTP/1.1\r\nHost: example.com:8443\r\n"),
        ("http://[2001:db8::1]:8080/x", "POST /x HTTP/1.1\r\nHost: [2001:db8::1]:8080\r\n"),
        ("http://B\u00fccher.example/x", "POST /x HTTP/1.1\r\nHost: xn--bcher-kva.example\r\n"),
    ],
)
def test_the_request_line_and_host_follow_the_url(url: str, start: str) -> None:
    """The request line carries the URL's path and query; ``Host`` names the host as sent
    (IDNA-encoded, IPv6 in brackets) and its port only when it is not the scheme's own."""
    target = _target(url)
    assert not isinstance(target, str)
    assert target.start == start


async def test_rotation_verifies_with_either_secret(sender: Sender) -> None:
    """A receiver on the old secret still verifies the standard signature during a rotation."""
    new, old = generate_secret(), generate_secret()
    async with Receiver(old) as receiver:
        await sender.send(_request(receiver.url, new, old))
        [received] = receiver.requests
    assert received.standard_signature_ok
    # The body HMAC is made with the current secret only.
    assert not received.body_signature_ok


async def test_given_timestamp_is_signed(sender: Sender) -> None:
    """The timestamp passed to send() is the one in webhook-timestamp."""
    now = int(time.time())
    async with Receiver("s") as receiver:
        await sender.send(_request(receiver.url, "s"), timestamp=now)
        [received] = receiver.requests
    assert received.headers["webhook-timestamp"] == str(now)
    assert received.standard_signature_ok


async def test_keep_alive_reuses_the_connection(sender: Sender) -> None:
    """Consecutive requests to one receiver all arrive and succeed over the shared session."""
    async with Receiver("s") as receiver:
        outcomes = [await sender.send(_request(receiver.url, "s")) for _ in range(5)]
        assert len(receiver.requests) == 5
    assert all(outcome.success for outcome in outcomes)


async def test_error_status_keeps_exactly_the_first_20_kb(sender: Sender) -> None:
    """A 500 with a 50 kB body is a failure that keeps exactly the first 20,000 bytes."""
    body = b"".join(str(i % 10).encode() for i in range(50_000))
    async with Receiver("s", replies=[Reply(500, body=body)]) as receiver:
        outcome = await sender.send(_request(receiver.url, "s"))
    assert outcome.status_code == 500
    assert not outcome.success
    assert len(outcome.response_body) == RESPONSE_BODY_LIMIT == 20_000
    assert outcome.response_body.encode() == body[:20_000]
    assert outcome.error == "The receiver answered with status 500."


async def test_a_character_cut_by_the_20_kb_limit_is_left_out(sender: Sender) -> None:
    """An answer of three-byte characters cut at 20,000 bytes keeps the whole characters
    before the cut, without a replacement character for the one it split; invalid bytes
    elsewhere are still replaced."""
    body = b"\xff" + "\u20ac".encode() * 10_000
    async with Receiver("s", replies=[Reply(500, body=body)]) as receiver:
        outcome = await sender.send(_request(receiver.url, "s"))
    # 1 invalid byte, then 6,666 whole euro signs (19,998 bytes); the 6,667th is cut.
    assert outcome.response_body == "\ufffd" + "\u20ac" * 6_666


async def test_the_url_goes_out_as_its_owner_wrote_it(sender: Sender) -> None:
    """Escapes in a webhook URL's path and query reach the receiver as written (``%3B`` is
    not turned into ``;``, nor ``a%2Fb`` into ``a/b``); only what a URL cannot carry is
    escaped, and the fragment stays behind."""
    async with Receiver("s") as receiver:
        written = "/enc/at%40/%3B/x?k1=a%2Fb&k2=a%3Fb&k3=%2C%3A%21%2A&plain=1"
        outcome = await sender.send(_request(f"{receiver.base_url}{written}#fragment", "s"))
        odd = await sender.send(_request(f"{receiver.base_url}/caf\u00e9/50%?q=\u00e9", "s"))
    assert outcome.success
    assert odd.success
    assert [r.path for r in receiver.requests] == [written, "/caf%C3%A9/50%25?q=%C3%A9"]


async def test_redirect_is_not_followed(sender: Sender) -> None:
    """A 3xx is a failed attempt and the redirect target is never requested."""
    async with Receiver("s") as receiver:
        elsewhere = f"{receiver.base_url}/elsewhere"
        receiver.respond(Reply(302, headers={"Location": elsewhere}))
        outcome = await sender.send(_request(receiver.url, "s"))
        paths = [request.path for request in receiver.requests]
    assert outcome.status_code == 302
    assert not outcome.success
    assert outcome.error == (
        f"The receiver answered with a redirect to {elsewhere}, which is not followed."
    )
    assert paths == ["/hook"]


async def test_connection_refused_is_an_outcome(sender: Sender) -> None:
    """A closed port gives no status and a sentence naming the refused address."""
    port = unused_port()
    outcome = await sender.send(_request(f"http://127.0.0.1:{port}/hook"))
    assert outcome.status_code is None
    assert not outcome.success
    assert outcome.error == f"Connection refused by 127.0.0.1:{port}."
    assert outcome.response_body == ""


async def test_a_connect_timeout_is_an_outcome() -> None:
    """A receiver whose host takes no new connections (its queue of them is full) gives no
    status, within the connect timeout, and the sentence naming host and port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    # Connections nobody accepts fill the queue; the kernel drops the next one's handshake.
    fillers = [socket.socket() for _ in range(4)]
    try:
        for filler in fillers:
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        async with Sender(connect_timeout=0.3, request_timeout=5.0, policy=LOOPBACK) as sender:
            outcome = await sender.send(_request(f"http://127.0.0.1:{port}/hook"))
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
    assert outcome.status_code is None
    assert outcome.error == f"Could not connect to 127.0.0.1:{port} within 0.3 seconds."
    assert outcome.latency < 2.0


async def test_timeout_is_an_outcome() -> None:
    """A receiver slower than request_timeout gives no status and a timeout sentence."""
    async with (
        Sender(connect_timeout=1.0, request_timeout=0.5, policy=LOOPBACK) as sender,
        Receiver("s", default=Reply(200, delay=2.0)) as receiver,
    ):
        outcome = await sender.send(_request(receiver.url, "s"))
    assert outcome.status_code is None
    assert outcome.error == "No answer within 0.5 seconds."
    assert outcome.latency < 2.0


async def test_a_timeout_of_five_seconds_ends_at_five_seconds() -> None:
    """A request timeout of 5 s or more ends the attempt then, not up to a second later at
    the next whole second of the loop's clock, where some clients round it."""
    async with (
        Sender(connect_timeout=1.0, request_timeout=5.0, policy=LOOPBACK) as sender,
        Receiver("s", default=Reply(200, delay=8.0)) as receiver,
    ):
        # Start just after a whole second of the loop's clock, where rounding would add most.
        loop = asyncio.get_running_loop()
        await asyncio.sleep(1.05 - loop.time() % 1)
        outcomes = await asyncio.gather(
            *(sender.send(_request(receiver.url, "s")) for _ in range(3))
        )
    for outcome in outcomes:
        assert outcome.error == "No answer within 5 seconds."
        assert 5.0 <= outcome.latency < 5.4


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n"
        b"INJECTED 2026-11-29 11:00:00,000 CRITICAL dembrane.webhooks: fake\r\n\r\n",
        b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 302 Found\r\nLocation: \xff\xfe\x80http://x/\r\nContent-Length: 0\r\n\r\n",
    ],
)
async def test_an_answer_that_is_not_http_is_described_on_one_line(
    sender: Sender, answer: bytes
) -> None:
    """Parser errors may quote the receiver's bytes, line breaks included, and a header may
    carry undecodable bytes; the attempt's error keeps them on one line of text any database
    takes, so no receiver can add lines to the log or stop it being written."""

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(reply, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        outcome = await sender.send(_request(f"http://127.0.0.1:{port}/hook"))
    finally:
        server.close()
        await server.wait_closed()
    assert not outcome.success
    assert outcome.error.startswith(
        ("The receiver's answer is not valid HTTP", "The receiver answered with a redirect to")
    )
    assert outcome.error.isprintable()
    outcome.error.encode("utf-8")  # no lone surrogates
    assert len(outcome.error) <= 500


async def _answer_with(sender: Sender, answer: bytes, *, reset: bool = False) -> AttemptOutcome:
    """Send to a receiver that reads the request, writes ``answer`` and then ends the
    connection: closed, or reset (RST) when ``reset``."""

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        if reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()

    server = await asyncio.start_server(reply, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await sender.send(_request(f"http://127.0.0.1:{port}/hook"))
    finally:
        server.close()
        await server.wait_closed()


async def test_a_2xx_whose_body_breaks_off_still_accepts_the_event(sender: Sender) -> None:
    """A receiver that answers 200 and then ends the connection before the body it announced
    has accepted the event: the attempt succeeds, with the part of the body that came."""
    outcome = await _answer_with(sender, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
    assert outcome.success
    assert outcome.status_code == 200
    assert outcome.response_body == "short"
    assert outcome.error == ""


async def test_an_error_status_whose_body_breaks_off_keeps_its_status(sender: Sender) -> None:
    """A 500 whose body breaks off is logged as the 500 it was, and says what went wrong after."""
    outcome = await _answer_with(sender, b"HTTP/1.1 500 Oops\r\nContent-Length: 100\r\n\r\nfailed")
    assert not outcome.success
    assert outcome.status_code == 500
    assert outcome.response_body == "failed"
    assert outcome.error.startswith("The receiver answered with status 500, then: ")


async def test_a_reset_connection_is_described_as_such(sender: Sender) -> None:
    """A receiver that resets the connection instead of answering gets the sentence for it,
    not the operating system's error text."""
    outcome = await _answer_with(sender, b"", reset=True)
    assert outcome.status_code is None
    assert outcome.error == "The receiver reset the connection."


async def test_unresolvable_host_is_an_outcome(sender: Sender) -> None:
    """A host that does not resolve gives no status and says so."""
    outcome = await sender.send(_request("https://no-such-host.invalid/hook"))
    assert outcome.status_code is None
    assert "could not be resolved" in outcome.error


async def test_literal_loopback_refused_without_allowance() -> None:
    """With no range opened, a loopback URL is refused and nothing reaches the receiver."""
    async with (
        Sender(connect_timeout=1.0, request_timeout=2.0, policy=TargetPolicy()) as sender,
        Receiver("s") as receiver,
    ):
        outcome = await sender.send(_request(receiver.url, "s"))
        assert receiver.requests == []
    assert outcome.status_code is None
    assert outcome.error == (
        "The URL points to 127.0.0.1, a loopback address; webhooks must target public addresses."
    )


async def test_named_loopback_refused_at_connect_time() -> None:
    """A host name resolving to loopback is refused by the connect-time resolver, without
    naming the address."""
    async with (
        Sender(connect_timeout=1.0, request_timeout=2.0, policy=TargetPolicy()) as sender,
        Receiver("s") as receiver,
    ):
        outcome = await sender.send(_request(f"http://localhost:{receiver.port}/hook", "s"))
        assert receiver.requests == []
    assert outcome.status_code is None
    assert outcome.error == (
        "The target host localhost does not resolve to a public address; "
        "webhooks must target public addresses."
    )


async def test_errors_never_contain_the_secret() -> None:
    """No failure sentence carries the signing secret."""
    secret = generate_secret()
    async with Sender(connect_timeout=1.0, request_timeout=2.0, policy=TargetPolicy()) as sender:
        refused = await sender.send(_request("http://10.0.0.1/hook", secret))
        missing = await sender.send(_request("https://no-such-host.invalid/", secret))
    assert secret not in refused.error
    assert secret not in missing.error


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_seconds_is_parsed(sender: Sender, status: int) -> None:
    """A Retry-After delay in seconds on 429/503 is reported."""
    reply = Reply(status, headers={"Retry-After": "120"})
    async with Receiver("s", replies=[reply]) as receiver:
        outcome = await sender.send(_request(receiver.url, "s"))
    assert outcome.status_code == status
    assert outcome.retry_after == 120.0


async def test_retry_after_http_date_is_parsed(sender: Sender) -> None:
    """A Retry-After HTTP date becomes the seconds until that date."""
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)
    async with Receiver("s", replies=[Reply(503, headers={"Retry-After": when})]) as receiver:
        outcome = await sender.send(_request(receiver.url, "s"))
    assert outcome.retry_after is not None
    assert 80 <= outcome.retry_after <= 91


async def test_retry_after_ignored_elsewhere_and_when_invalid(sender: Sender) -> None:
    """Retry-After counts only on 429/503, and an unreadable value is ignored."""
    async with Receiver(
        "s",
        replies=[
            Reply(500, headers={"Retry-After": "30"}),
            Reply(429, headers={"Retry-After": "soon"}),
        ],
    ) as receiver:
        on_500 = await sender.send(_request(receiver.url, "s"))
        invalid = await sender.send(_request(receiver.url, "s"))
    assert on_500.retry_after is None
    assert invalid.retry_after is None


def test_parse_retry_after_values() -> None:
    """Seconds and HTTP dates parse; past dates give 0; junk, negatives and absence give None."""
    now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    assert parse_retry_after("5", now) == 5.0
    assert parse_retry_after(" 7 ", now) == 7.0
    assert parse_retry_after("Sat, 28 Nov 2026 12:01:00 GMT", now) == 60.0
    assert parse_retry_after("Sat, 28 Nov 2026 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("-3", now) is None
    assert parse_retry_after("nan", now) is None
    assert parse_retry_after("later", now) is None
    assert parse_retry_after("", now) is None
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("2.5", now) == 2.5


@pytest.mark.parametrize("value", ["\u0661\u0662\u0660", "1e3", "1_0", "+5", "\uff15"])
def test_retry_after_seconds_must_be_ascii_digits(value: str) -> None:
    """Retry-After's seconds are ASCII digits: other scripts' digits, exponents, signs and
    underscores (which float() would take) are ignored like any unreadable value."""
    assert parse_retry_after(value, datetime(2026, 11, 28, 12, 0, tzinfo=UTC)) is None


async def test_gone_is_marked_permanent(sender: Sender) -> None:
    """A 410 answer is flagged as permanently gone."""
    async with Receiver("s", replies=[410]) as receiver:
        outcome = await sender.send(_request(receiver.url, "s"))
    assert outcome.permanent_gone
    assert not outcome.success


async def test_send_before_start_is_a_programming_error() -> None:
    """Sending on a sender that was never started raises instead of failing silently."""
    sender = Sender(connect_timeout=1.0, request_timeout=1.0, policy=LOOPBACK)
    with pytest.raises(RuntimeError, match="not started"):
        await sender.send(_request("http://127.0.0.1:9/"))


def _outcome(status: int | None, body: str = "", error: str = "") -> AttemptOutcome:
    return AttemptOutcome(
        status_code=status,
        latency=0.01,
        response_body=body,
        error=error,
        retry_after=None,
        attempted_at=datetime.now(UTC),
    )


def test_describe_test_outcome_messages() -> None:
    """The Test action's three messages are worded exactly as the contract fixes them."""
    assert describe_test_outcome(_outcome(204)) == "Webhook responded successfully with status 204"
    assert describe_test_outcome(_outcome(404, body="x" * 300)) == (
        "Webhook returned error status 404: " + "x" * 200
    )
    assert describe_test_outcome(_outcome(None, error="Connection refused by 127.0.0.1:9.")) == (
        "Failed to connect to webhook: Connection refused by 127.0.0.1:9."
    )


async def test_describe_test_outcome_of_real_attempts(sender: Sender) -> None:
    """Real success, error and refused attempts are described as the Test action reports them."""
    async with Receiver("s", replies=[200, Reply(500, body=b"boom")]) as receiver:
        ok = await sender.send(_request(receiver.url, "s"))
        failed = await sender.send(_request(receiver.url, "s"))
    refused = await sender.send(_request(f"http://127.0.0.1:{unused_port()}/"))
    assert describe_test_outcome(ok) == "Webhook responded successfully with status 200"
    assert describe_test_outcome(failed) == "Webhook returned error status 500: boom"
    assert describe_test_outcome(refused).startswith(
        "Failed to connect to webhook: Connection refused by 127.0.0.1:"
    )
