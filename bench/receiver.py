"""A lean webhook receiver in its own process, and the handle the benchmark drives it with.

The receiver answers ``POST /hook/<n>`` with 200 at once and records, per request, the
delivery (``X-Dembrane-Delivery``) and the first arrival time of each event (``webhook-id``).
``POST /hang/<n>`` never answers: it waits until the sender gives up and closes the
connection. It verifies nothing, so its cost per request stays as small as a receiver's can be,
and it runs in a separate process so it never shares an event loop or a GIL with the service or
with the load generator.

Control endpoints, for the benchmark only:

* ``GET /stats``: ``{"delivered", "requests", "events", "hanging"}``, where ``delivered`` counts
  distinct deliveries answered with 200;
* ``GET /arrivals``: ``{webhook-id: first arrival, Unix seconds}``;
* ``POST /reset``: forget everything.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from types import TracebackType

import aiohttp
from aiohttp import web

# How long a hanging request waits at most: far beyond any sender timeout the bench sets.
_HANG_SECONDS = 600.0


@dataclass
class _Record:
    """What the receiver has seen since the last reset."""

    deliveries: set[str] = field(default_factory=set)
    first_arrival: dict[str, float] = field(default_factory=dict)
    requests: int = 0
    hanging: int = 0

    def reset(self) -> None:
        self.deliveries = set()
        self.first_arrival = {}
        self.requests = 0
        self.hanging = 0


def _build_app(record: _Record) -> web.Application:
    async def hook(request: web.Request) -> web.Response:
        arrived = time.time()
        headers = request.headers
        await request.read()
        record.requests += 1
        record.deliveries.add(headers.get("X-Dembrane-Delivery", ""))
        event_id = headers.get("webhook-id", "")
        if event_id not in record.first_arrival:
            record.first_arrival[event_id] = arrived
        return web.Response(text="ok")

    async def hang(request: web.Request) -> web.Response:
        await request.read()
        record.hanging += 1
        # Cancelled when the sender times out and drops the connection.
        await asyncio.sleep(_HANG_SECONDS)
        return web.Response(text="late")

    async def stats(_request: web.Request) -> web.Response:
        return web.json_response(
            {
                "delivered": len(record.deliveries),
                "requests": record.requests,
                "events": len(record.first_arrival),
                "hanging": record.hanging,
            }
        )

    async def arrivals(_request: web.Request) -> web.Response:
        return web.json_response(record.first_arrival)

    async def reset(_request: web.Request) -> web.Response:
        record.reset()
        return web.json_response({"reset": True})

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/hook/{n}", hook)
    app.router.add_post("/hang/{n}", hang)
    app.router.add_get("/stats", stats)
    app.router.add_get("/arrivals", arrivals)
    app.router.add_post("/reset", reset)
    return app


async def _serve(conn: Connection) -> None:
    record = _Record()
    runner = web.AppRunner(
        _build_app(record), access_log=None, handler_cancellation=True, shutdown_timeout=0.2
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    address = runner.addresses[0]
    # Set what start-up built aside from the collector, so that its full collections during
    # a run walk only the records of deliveries and stay short (arrival times are stamped
    # here, and a long pause would show in the service's publish-to-receiver figures).
    gc.collect()
    gc.freeze()
    conn.send(int(address[1]))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _process_main(conn: Connection) -> None:
    """The receiver process: serve on uvloop when it is installed, as the service does."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(conn))
    else:
        uvloop.run(_serve(conn))


class ReceiverProcess:
    """Starts the receiver in a child process and talks to its control endpoints."""

    def __init__(self) -> None:
        # Spawn, never fork: the parent holds gRPC and event-loop state a fork must not copy.
        self._context = multiprocessing.get_context("spawn")
        self._process: multiprocessing.process.BaseProcess | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, index: int, *, hanging: bool = False) -> str:
        """A webhook URL on the receiver; ``hanging`` ones never answer."""
        return f"{self.base_url}/{'hang' if hanging else 'hook'}/{index}"

    async def start(self) -> ReceiverProcess:
        parent, child = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_process_main, args=(child,), name="bench-receiver", daemon=True
        )
        process.start()
        child.close()
        self._process = process
        loop = asyncio.get_running_loop()
        ready = await loop.run_in_executor(None, parent.poll, 30.0)
        if not ready:
            raise RuntimeError("The benchmark receiver did not start within 30 seconds.")
        try:
            self.port = int(parent.recv())
        except EOFError:
            raise RuntimeError(
                f"The benchmark receiver exited at start (status {process.exitcode})."
            ) from None
        finally:
            parent.close()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=30),
            connector=aiohttp.TCPConnector(limit=4),
        )
        return self

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        process, self._process = self._process, None
        if process is not None and process.is_alive():
            process.terminate()
            await asyncio.get_running_loop().run_in_executor(None, process.join, 5.0)
            if process.is_alive():
                process.kill()

    async def __aenter__(self) -> ReceiverProcess:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("The receiver is not started.")
        return self._session

    async def reset(self) -> None:
        async with self._http().post(f"{self.base_url}/reset") as response:
            response.raise_for_status()

    async def stats(self) -> dict[str, int]:
        async with self._http().get(f"{self.base_url}/stats") as response:
            response.raise_for_status()
            data: dict[str, int] = await response.json()
            return data

    async def arrivals(self) -> dict[str, float]:
        async with self._http().get(f"{self.base_url}/arrivals") as response:
            response.raise_for_status()
            data: dict[str, float] = await response.json()
            return data

    async def wait_delivered(
        self, count: int, *, deadline: float, interval: float = 0.01
    ) -> tuple[float | None, int]:
        """Poll until ``count`` distinct deliveries arrived or ``deadline`` (monotonic) passed.

        Returns the monotonic time the count was first seen reached (None on a timeout) and
        the count last seen.
        """
        seen = 0
        while True:
            stats = await self.stats()
            seen = stats["delivered"]
            now = time.monotonic()
            if seen >= count:
                return now, seen
            if now >= deadline:
                return None, seen
            await asyncio.sleep(interval)
