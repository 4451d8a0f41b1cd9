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
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

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


async def serve(fd: int) -> None:
    """Serve the parent on socket ``fd`` until it closes its end."""
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    options = await read_frame(reader)
    logging.basicConfig(
        level=options.get("log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    policy = TargetPolicy(
        tuple(ipaddress.ip_network(cidr, strict=False) for cidr in options["allowed_targets"])
    )
    tasks: set[asyncio.Task[None]] = set()
    async with Sender(
        connect_timeout=options["connect_timeout"],
        request_timeout=options["request_timeout"],
        policy=policy,
        max_connections=options["max_connections"],
    ) as sender:
        answers = FrameBatch(writer)
        write_frame(writer, "ready")
        while True:
            try:
                batch = await read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            for item in batch:
                task = asyncio.create_task(_send_one(sender, answers, item))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
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
