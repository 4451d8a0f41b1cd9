"""The sender's HTTP/1.1 client against raw loopback servers that answer byte by byte."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dembrane.webhooks.delivery.http import Answer, Failure, HttpClient, HttpFailure
from dembrane.webhooks.delivery.sender import OutboundRequest, Sender
from dembrane.webhooks.delivery.targets import PolicyResolver, TargetPolicy

LOOPBACK = TargetPolicy([ipaddress.ip_network("127.0.0.0/8")])
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# What a connection handler gets: the reader and writer, and how many requests came
# on this connection before the current one.
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


class RawServer:
    """A loopback server that reads whole requests and lets ``handler`` answer each; the
    connection ends when the handler returns False or the client closes it."""

    def __init__(
        self, handler: Handler, *, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1"
    ) -> None:
        self._handler = handler
        self._tls = tls
        self._host = host
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.requests = 0
        #: The request line and headers of every request, in order.
        self.heads: list[bytes] = []
        self.closed_by_client = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, self._host, 0, ssl=self._tls)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        served = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.closed_by_client += 1
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.requests += 1
                self.heads.append(head)
                keep = await self._handler(reader, writer, served)
                served += 1
                if not keep:
                    return
        finally:
            self.open -= 1
            writer.close()


def answer(data: bytes, *, keep: bool = True, delay: float = 0.0) -> Handler:
    """A handler that writes ``data`` to every request, after ``delay`` seconds."""

    async def handle(_: asyncio.StreamReader, writer: asyncio.StreamWriter, __: int) -> bool:
        if delay:
            await asyncio.sleep(delay)
        writer.write(data)
        await writer.drain()
        return keep

    return handle


def _head(port: int, body: bytes) -> bytes:
    return (
        f"POST /hook HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()


async def _post(
    client: HttpClient, port: int, *, limit: int = 20_000, scheme: str = "http"
) -> Answer:
    body = b'{"event":"test"}'
    return await client.post((scheme, "127.0.0.1", port), _head(port, body), body, limit=limit)


def _outbound(url: str) -> OutboundRequest:
    """A small signed request to ``url``, for tests that go through the ``Sender``."""
    return OutboundRequest(
        url=url,
        body=b"{}",
        event_type="conversation.started",
        event_id="evt_1",
        delivery_id="dlv_1",
        secrets=("s",),
    )


@contextlib.asynccontextmanager
async def _client(**options: Any) -> AsyncIterator[HttpClient]:
    """A client allowed to reach loopback, with short timeouts unless ``options`` say."""
    settings: dict[str, Any] = {
        "connect_timeout": 2.0,
        "request_timeout": 5.0,
        "max_connections": 8,
    }
    resolver = PolicyResolver(LOOPBACK)
    made = HttpClient(resolver=resolver, **(settings | options))
    try:
        yield made
    finally:
        await made.close()
        await resolver.close()


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    async with _client() as made:
        yield made


async def test_consecutive_requests_share_one_connection(client: HttpClient) -> None:
    """Requests one after another to one receiver go over a single kept-alive connection."""
    async with RawServer(answer(OK)) as server:
        answers = [await _post(client, server.port) for _ in range(3)]
    assert [a.status for a in answers] == [200, 200, 200]
    assert [a.body for a in answers] == [b"ok"] * 3
    assert server.connections == 1


async def test_an_ipv6_literal_is_connected_to_as_written() -> None:
    """A URL whose host is an IPv6 literal reaches the receiver on that address, with the
    literal in brackets in ``Host``, when the policy allows it."""
    policy = TargetPolicy([ipaddress.ip_network("::1/128")])
    async with (
        RawServer(answer(OK), host="::1") as server,
        Sender(connect_timeout=2.0, request_timeout=5.0, policy=policy) as sender,
    ):
        outcome = await sender.send(_outbound(f"http://[::1]:{server.port}/hook"))
        port = server.port
    assert outcome.success, outcome.error
    assert f"\r\nHost: [::1]:{port}\r\n".encode() in server.heads[0]


async def test_a_kept_connection_the_receiver_dropped_is_replaced(client: HttpClient) -> None:
    """When the receiver closes a kept connection just as a request goes out on it (no
    answer, not a byte), the request is sent once more on a fresh connection."""

    async def first_only(_: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        if n > 0:
            return False  # as if an idle timeout closed it just now
        writer.write(OK)
        await writer.drain()
        return True

    async with RawServer(first_only) as server:
        first = await _post(client, server.port)
        second = await _post(client, server.port)
    assert (first.status, second.status) == (200, 200)
    assert server.connections == 2
    assert server.requests == 3


async def test_a_fresh_connection_that_fails_is_not_sent_again(client: HttpClient) -> None:
    """A request whose new connection closes without an answer fails, and is not resent."""
    async with RawServer(answer(b"", keep=False)) as server:
        with pytest.raises(HttpFailure) as failure:
            await _post(client, server.port)
    assert failure.value.kind is Failure.CLOSED
    assert server.requests == 1


async def test_a_partial_answer_on_a_kept_connection_is_not_sent_again(
    client: HttpClient,
) -> None:
    """Once any byte of an answer came, a connection ending early fails the request even on
    a kept connection: the receiver has it."""

    async def half(_: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(OK if n == 0 else b"HTTP/1.1 20")
        await writer.drain()
        return n == 0

    async with RawServer(half) as server:
        await _post(client, server.port)
        with pytest.raises(HttpFailure) as failure:
            await _post(client, server.port)
    assert failure.value.kind is Failure.CLOSED
    assert server.requests == 2


async def test_an_answer_saying_close_is_not_kept(client: HttpClient) -> None:
    """An answer with ``Connection: close`` ends the connection's use, even if the receiver
    leaves it open."""
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with RawServer(answer(closing)) as server:
        await _post(client, server.port)
        await _post(client, server.port)
    assert server.connections == 2


async def test_bytes_after_the_answer_end_the_connections_use(client: HttpClient) -> None:
    """A receiver that sends more than its answer (the start of another) gets its answer
    read, and the next request a new connection, not the stray bytes as its answer."""
    async with RawServer(answer(OK + b"HTTP/1.1 500 Stray\r\n")) as server:
        first = await _post(client, server.port)
        second = await _post(client, server.port)
    assert (first.status, second.status) == (200, 200)
    assert server.connections == 2


async def test_an_answer_without_a_length_ends_with_the_connection(client: HttpClient) -> None:
    """An answer with neither length nor chunks is the bytes that came before the close."""
    async with RawServer(answer(b"HTTP/1.1 500 Oops\r\n\r\nall of it", keep=False)) as server:
        got = await _post(client, server.port)
    assert (got.status, got.body, got.broken) == (500, b"all of it", None)


async def test_a_chunked_answer_is_joined(client: HttpClient) -> None:
    """A chunked body arrives as the bytes of its chunks, and the connection is kept."""
    chunked = (
        b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    async with RawServer(answer(chunked)) as server:
        got = await _post(client, server.port)
        await _post(client, server.port)
    assert (got.status, got.body) == (202, b"abcde")
    assert server.connections == 1


async def test_interim_answers_are_passed_over(client: HttpClient) -> None:
    """``100 Continue`` and ``103 Early Hints`` before the answer do not count as the answer."""
    interim = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n"
        b"HTTP/1.1 429 Too Many\r\nRetry-After: 7\r\nContent-Length: 4\r\n\r\nslow"
    )
    async with RawServer(answer(interim)) as server:
        got = await _post(client, server.port)
    assert (got.status, got.retry_after, got.body) == (429, "7", b"slow")


async def test_a_long_answer_is_cut_and_its_connection_dropped(client: HttpClient) -> None:
    """Only ``limit`` bytes of a body are kept; the connection, with the rest still coming
    on it, is not used again."""
    long = b"HTTP/1.1 500 Oops\r\nContent-Length: 100\r\n\r\n" + b"x" * 100
    async with RawServer(answer(long)) as server:
        got = await _post(client, server.port, limit=10)
        await _post(client, server.port, limit=10)
    assert got.body == b"x" * 10
    assert server.connections == 2


async def test_unused_connections_close_after_the_keepalive() -> None:
    """A connection left unused for ``keepalive`` seconds is closed by the client."""
    async with _client(keepalive=0.2) as client, RawServer(answer(OK)) as server:
        await _post(client, server.port)
        assert server.open == 1
        for _ in range(50):
            if server.closed_by_client:
                break
            await asyncio.sleep(0.05)
        assert server.closed_by_client == 1
        assert server.open == 0


async def test_no_more_connections_than_the_limit() -> None:
    """With a limit of 2, six requests at once open at most two connections, and all are
    answered."""
    async with _client(max_connections=2) as client, RawServer(answer(OK, delay=0.05)) as server:
        answers = await asyncio.gather(*(_post(client, server.port) for _ in range(6)))
    assert [a.status for a in answers] == [200] * 6
    assert server.most_open == 2


async def test_a_cancelled_request_closes_its_connection(client: HttpClient) -> None:
    """Cancelling a request in flight closes its connection, so no late answer is read as
    the next request's."""
    arrived = asyncio.Event()

    async def never(reader: asyncio.StreamReader, _: asyncio.StreamWriter, __: int) -> bool:
        arrived.set()
        assert await asyncio.wait_for(reader.read(1), 10) == b""
        return False

    async with RawServer(never) as server:
        task = asyncio.ensure_future(_post(client, server.port))
        await asyncio.wait_for(arrived.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(50):
            if server.open == 0:
                break
            await asyncio.sleep(0.05)
        assert server.open == 0


async def test_the_answer_timeout_fails_the_request() -> None:
    """A receiver that takes longer than the request timeout gives a timeout failure."""
    async with _client(request_timeout=0.3) as client, RawServer(answer(OK, delay=2.0)) as server:
        with pytest.raises(HttpFailure) as failure:
            await _post(client, server.port)
    assert failure.value.kind is Failure.TIMEOUT


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key: (certificate, key) files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "receiver.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_https_verifies_the_receivers_certificate(tmp_path: Path) -> None:
    """Over https the answer is read when the certificate is trusted, and a certificate the
    trust store does not know is refused with the sentence for it."""
    cert_file, key_file = _self_signed(tmp_path)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert_file, key_file)
    trusting = ssl.create_default_context(cafile=str(cert_file))
    async with (
        _client(ssl_context=trusting) as client,
        Sender(connect_timeout=2.0, request_timeout=5.0, policy=LOOPBACK) as sender,
        RawServer(answer(OK), tls=served) as server,
    ):
        got = await _post(client, server.port, scheme="https")
        refused = await sender.send(_outbound(f"https://127.0.0.1:{server.port}/hook"))
        port = server.port
    assert (got.status, got.body) == (200, b"ok")
    assert server.requests == 1
    assert refused.status_code is None
    assert refused.error == f"The TLS certificate of 127.0.0.1:{port} could not be verified."
