"""A delivery worker process: sends the requests its parent hands it and reports the answers.

Started by ``SenderPool`` as ``python -m dembrane.webhooks.delivery.worker FD`` with one end
of a socket pair on ``FD``. The first frame holds the ``SenderOptions``; the worker answers
it once its ``Sender`` is up, then reads batches of requests and writes back batches of
outcomes. It ignores SIGINT and SIGTERM: its parent decides when sending stops (it drains
first), and closes the socket, at which point the worker exits. It also exits when its
parent dies, since the socket then ends.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from dembrane.webhooks import heap
from dembrane.webhooks.delivery.pool import FrameBatch, read_frame, write_frame
from dembrane.webhooks.delivery.sender import OutboundRequest, Sender
from dembrane.webhooks.delivery.targets import TargetPolicy

log = logging.getLogger("dembrane.webhooks.delivery.worker")


async def _send_one(sender: Sender, answers: FrameBatch, item: Sequence[Any]) -> None:
    token, url, body, event_type, event_id, delivery_id, secrets, timestamp = item
    request = OutboundRequest(
        url=url,
        body=body,
        event_type=event_type,
        event_id=event_id,
        delivery_id=delivery_id,
        secrets=tuple(secrets),
    )
    attempted_at = time.time()
    try:
        outcome = await sender.send(request, timestamp=timestamp)
    except Exception:
        log.exception("sending delivery %s failed unexpectedly", delivery_id)
        answers.add((token, None, 0.0, "", "The request failed unexpectedly.", None, attempted_at))
        return
    answers.add(
        (
            token,
            outcome.status_code,
            outcome.latency,
            outcome.response_body,
            outcome.error,
            outcome.retry_after,
            outcome.attempted_at.timestamp(),
        )
    )


class _Crew:
    """Long-lived sending coroutines that take requests from one queue.

    A request goes to an idle member, or to a new one while there are fewer than ``size``;
    a member that finishes takes the next request waiting, without a new task. Under load
    that saves a task per request, a measurable share of a worker's CPU. The parent never
    has more requests in flight than the connection limit, which is ``size``, so none waits
    for a member.
    """

    def __init__(self, sender: Sender, answers: FrameBatch, size: int) -> None:
        self._sender = sender
        self._answers = answers
        self._size = max(1, size)
        self._queue: deque[Sequence[Any]] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()
        self._members: set[asyncio.Task[None]] = set()

    def add(self, batch: Sequence[Sequence[Any]]) -> None:
        self._queue.extend(batch)
        waiting = len(self._queue)
        while waiting and self._idle:
            idle = self._idle.popleft()
            if not idle.done():
                idle.set_result(None)
                waiting -= 1
        while waiting and len(self._members) < self._size:
            member = asyncio.create_task(self._work())
            self._members.add(member)
            member.add_done_callback(self._members.discard)
            waiting -= 1

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        while True:
            while not queue:
                idle = loop.create_future()
                self._idle.append(idle)
                await idle
            await _send_one(self._sender, self._answers, queue.popleft())

    async def stop(self) -> None:
        """Cancel every member, and the requests they are sending."""
        members = list(self._members)
        for member in members:
            member.cancel()
        await asyncio.gather(*members, return_exceptions=True)


def _lower_priority(increment: int) -> None:
    """Give this process ``increment`` less CPU priority than its parent (``nice``).

    Under load the service's own process is the one everything waits on: its one store
    thread writes every publication and outcome, and its event loop answers publishers. A
    worker's requests can wait a few milliseconds for a core; a publisher's answer, and the
    next batch of work, should not. Called before the worker starts any thread, so every
    thread it starts later has the same priority (Linux sets it per thread).
    """
    if increment <= 0:
        return
    try:
        os.nice(increment)
    except OSError as exc:  # pragma: no cover - raising one's own niceness is always allowed
        log.warning("could not lower the sender process's priority: %s", exc)


async def serve(fd: int) -> None:
    """Serve the parent on socket ``fd`` until it closes its end."""
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    options = await read_frame(reader)
    logging.basicConfig(
        level=options.get("log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _lower_priority(int(options.get("nice", 0)))
    policy = TargetPolicy(
        tuple(ipaddress.ip_network(cidr, strict=False) for cidr in options["allowed_targets"])
    )
    async with Sender(
        connect_timeout=options["connect_timeout"],
        request_timeout=options["request_timeout"],
        policy=policy,
        max_connections=options["max_connections"],
    ) as sender:
        crew = _Crew(sender, FrameBatch(writer), options["max_connections"])
        heap.settle()
        write_frame(writer, "ready")
        while True:
            try:
                batch = await read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            crew.add(batch)
        await crew.stop()
    writer.close()


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not args[0].isdigit():
        sys.exit("usage: python -m dembrane.webhooks.delivery.worker FD")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(int(args[0])))
    else:
        uvloop.run(serve(int(args[0])))


if __name__ == "__main__":
    main()
