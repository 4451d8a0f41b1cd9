"""Sending from worker processes, so HTTP work runs on other cores than the store and gRPC.

Python runs one thread of Python code at a time in a process, and signing, sending and
reading an HTTP request is a large share of the CPU a delivery needs; in the service's own
process it would hold the interpreter's lock against publishing, claiming and recording.
``SenderPool`` hands each signed request to one of a few worker
processes (``delivery/worker.py``) that each run a ``Sender`` of their own: the same SSRF
policy, the same timeouts, their own keep-alive connections. The dispatcher keeps every
decision (leases, lanes, caps, the breaker, retries, what is recorded); a worker only sends
and reports what the receiver answered.

Requests and answers travel over a private socket pair as length-prefixed pickles, many
per write: whatever the event loop gathered in one turn goes out in one frame.

A worker that dies loses only its in-flight attempts: they come back as ``lost`` outcomes,
which the dispatcher records and sends again soon without blaming the receiver (at-least-once
holds), and the worker is started again; a worker whose parent dies reads the end of its
socket and exits, so none outlives the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from dembrane.webhooks.delivery.sender import AttemptOutcome, OutboundRequest

__all__ = ["FrameBatch", "SenderOptions", "SenderPool", "read_frame", "write_frame"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
#: A worker that dies this soon after its start is started again only after this pause.
_RESTART_PAUSE_SECONDS = 1.0
_STOP_TIMEOUT_SECONDS = 5.0
_START_TIMEOUT_SECONDS = 60.0
#: Requests a worker may have out before the next worker is given work (see ``_pick``).
SPILL_AT = 16


@dataclass(frozen=True)
class SenderOptions:
    """What a worker's ``Sender`` is built from; sent to the worker as its first frame."""

    connect_timeout: float
    request_timeout: float
    #: The networks opened on top of the public internet, as CIDR strings.
    allowed_targets: tuple[str, ...]
    max_connections: int
    log_level: str = "INFO"
    #: How much lower than the service's the worker's CPU priority is (``nice``).
    nice: int = 0


def write_frame(writer: asyncio.StreamWriter, message: Any) -> None:
    """Queue one length-prefixed pickle on ``writer``."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_HEADER.pack(len(payload)) + payload)


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """Read one frame; raises ``asyncio.IncompleteReadError`` at the end of the stream."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    # Frames come only from the other end of a private socket pair, written by this module.
    return pickle.loads(await reader.readexactly(size))  # noqa: S301


class FrameBatch:
    """Messages added during one turn of the event loop, written to ``writer`` as one frame.

    If the writer is closed by then, the batch goes to ``undelivered`` instead (or is dropped).
    """

    def __init__(
        self,
        writer: asyncio.StreamWriter,
        undelivered: Callable[[list[tuple[Any, ...]]], None] = lambda _batch: None,
    ) -> None:
        self._writer = writer
        self._undelivered = undelivered
        self._batch: list[tuple[Any, ...]] = []
        self._scheduled = False

    def add(self, message: tuple[Any, ...]) -> None:
        self._batch.append(message)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._batch = self._batch, []
        if not batch:
            return
        if self._writer.is_closing():
            self._undelivered(batch)
        else:
            write_frame(self._writer, batch)


#: What an attempt cut short by its worker's end says.
_WORKER_LOST = (
    "The delivery worker process stopped during the attempt; "
    "the receiver may or may not have the request."
)


class _Worker:
    """One worker process and the requests it has not answered yet."""

    def __init__(
        self, slot: int, options: SenderOptions, on_lost: Callable[[], None] = lambda: None
    ) -> None:
        self.slot = slot
        self._options = options
        self._on_lost = on_lost
        self.process: subprocess.Popen[bytes] | None = None
        #: Requests out, by token: the future of each outcome and when it was handed over.
        self.pending: dict[int, tuple[asyncio.Future[AttemptOutcome], float]] = {}
        self.started_at = 0.0
        self.alive = False
        self._writer: asyncio.StreamWriter | None = None
        self._outbox: FrameBatch | None = None
        self._reader_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            # ``subprocess`` starts the worker with vfork and exec, so no fork handlers run.
            # uvloop's subprocesses fork: in this process full of threads, gRPC's handler
            # then printed a line on stderr each time a worker was started again. The call
            # returns as soon as the worker has exec'd (our own interpreter and module).
            self.process = subprocess.Popen(  # noqa: S603, ASYNC220
                [sys.executable, "-m", "dembrane.webhooks.delivery.worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, self._writer = await asyncio.open_connection(sock=ours)
        self._outbox = FrameBatch(self._writer, self._fail_all)
        write_frame(self._writer, asdict(self._options))
        # The worker says it is ready once its sender is up, so the first requests after
        # start never wait for an interpreter to boot.
        await asyncio.wait_for(read_frame(reader), _START_TIMEOUT_SECONDS)
        self.started_at = time.monotonic()
        self.alive = True
        self._reader_task = asyncio.create_task(
            self._read_answers(reader), name=f"webhooks-sender-worker-{self.slot}"
        )

    def submit(self, token: int, request: OutboundRequest, timestamp: int | None) -> None:
        message = (
            token,
            request.url,
            request.body,
            request.event_type,
            request.event_id,
            request.delivery_id,
            request.secrets,
            timestamp,
        )
        if self._outbox is None:
            self._fail(token)
        else:
            self._outbox.add(message)

    def _fail_all(self, batch: list[tuple[Any, ...]]) -> None:
        for message in batch:
            self._fail(message[0])

    def _fail(self, token: int) -> None:
        """The request ``token`` has no answer coming: it is a lost attempt."""
        entry = self.pending.pop(token, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(_lost(entry[1], _WORKER_LOST))
        self._on_lost()

    async def _read_answers(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                answers = await read_frame(reader)
                for token, status, latency, body, error, retry_after, sent_at in answers:
                    entry = self.pending.pop(token, None)
                    if entry is None or entry[0].done():
                        continue  # given up on (cancelled) meanwhile
                    entry[0].set_result(
                        AttemptOutcome(
                            status_code=status,
                            latency=latency,
                            response_body=body,
                            error=error,
                            retry_after=retry_after,
                            attempted_at=datetime.fromtimestamp(sent_at, UTC),
                        )
                    )
        except (asyncio.IncompleteReadError, ConnectionError, pickle.UnpicklingError):
            pass
        finally:
            was_alive, self.alive = self.alive, False
            for token in list(self.pending):
                self._fail(token)
            if self._writer is not None:
                self._writer.close()
            if was_alive:
                self._on_lost()

    async def stop(self) -> None:
        """Close the socket (the worker exits when it reads its end), then reap the process."""
        self.alive = False
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        process = self.process
        if process is None:
            return
        try:
            await asyncio.to_thread(process.wait, _STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)


class SenderPool:
    """Sends requests through ``processes`` worker processes; the same calls as ``Sender``."""

    def __init__(
        self,
        processes: int,
        *,
        connect_timeout: float,
        request_timeout: float,
        allowed_targets: tuple[str, ...],
        max_connections: int,
        log_level: str = "INFO",
        nice: int = 0,
    ) -> None:
        if processes < 1:
            raise ValueError("A sender pool needs at least one process.")
        self._options = SenderOptions(
            connect_timeout=connect_timeout,
            request_timeout=request_timeout,
            allowed_targets=allowed_targets,
            max_connections=max_connections,
            log_level=log_level,
            nice=nice,
        )
        self._workers = [self._new_worker(slot) for slot in range(processes)]
        self._tokens = itertools.count(1)
        self._restarts: dict[int, asyncio.Task[None]] = {}
        self._running = False

    @property
    def pids(self) -> list[int]:
        """The process ids of the running workers."""
        return [w.process.pid for w in self._workers if w.alive and w.process is not None]

    @property
    def in_flight(self) -> list[int]:
        """How many requests each worker has out, by slot."""
        return [len(w.pending) for w in self._workers]

    async def start(self) -> None:
        """Start every worker and wait until each is ready; idempotent."""
        if self._running:
            return
        self._running = True
        try:
            await asyncio.gather(*(worker.start() for worker in self._workers))
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop the workers; requests still in flight come back as failed attempts."""
        self._running = False
        restarts = list(self._restarts.values())
        for task in restarts:
            task.cancel()
        await asyncio.gather(*restarts, return_exceptions=True)
        self._restarts.clear()
        await asyncio.gather(*(worker.stop() for worker in self._workers))

    def _new_worker(self, slot: int) -> _Worker:
        return _Worker(slot, self._options, on_lost=self._restart_lost)

    async def __aenter__(self) -> SenderPool:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    def _pick(self) -> _Worker | None:
        """The first live worker with fewer than ``SPILL_AT`` requests out, else the least busy.

        Filling the first worker before the next keeps a light load on one process, whose
        event loop then gathers requests and answers into shared frames and stays warm; the
        others take work only when it falls behind, which is when more cores pay off.
        """
        best: _Worker | None = None
        for worker in self._workers:
            if not worker.alive:
                continue
            if len(worker.pending) < SPILL_AT:
                return worker
            if best is None or len(worker.pending) < len(best.pending):
                best = worker
        return best

    async def send(self, req: OutboundRequest, *, timestamp: int | None = None) -> AttemptOutcome:
        """POST ``req`` once from a worker; like ``Sender.send``, never raises for the network."""
        return await self.submit(req, timestamp=timestamp)

    def submit(
        self, req: OutboundRequest, *, timestamp: int | None = None
    ) -> asyncio.Future[AttemptOutcome]:
        """Hand ``req`` to a worker at once; the future of its outcome (a lost attempt when
        the worker ends first). Cancelling the future forgets the request, which the worker
        may still send. No task or coroutine per request: the dispatcher's path."""
        if not self._running:
            raise RuntimeError("The sender pool is not started; await SenderPool.start() first.")
        worker = self._pick()
        if worker is None:
            # Every worker is gone: wait for a replacement rather than fail attempts.
            return asyncio.ensure_future(self._send_after_restart(req, timestamp))
        token = next(self._tokens)
        outcome: asyncio.Future[AttemptOutcome] = asyncio.get_running_loop().create_future()
        worker.pending[token] = (outcome, time.time())
        worker.submit(token, req, timestamp)
        return outcome

    async def _send_after_restart(
        self, req: OutboundRequest, timestamp: int | None
    ) -> AttemptOutcome:
        attempted_at = time.time()
        self._restart_lost()
        if self._restarts:
            await asyncio.wait(list(self._restarts.values()), return_when=asyncio.FIRST_COMPLETED)
        if self._pick() is None:
            return _lost(attempted_at, "No delivery worker process is running.")
        return await self.submit(req, timestamp=timestamp)

    def _restart_lost(self) -> None:
        if not self._running:
            return
        for worker in self._workers:
            if not worker.alive and worker.slot not in self._restarts:
                self._restarts[worker.slot] = asyncio.create_task(self._restart(worker))

    async def _restart(self, old: _Worker) -> None:
        """Replace a worker that ended, trying again until one starts or the pool closes."""
        try:
            await old.stop()
            log.warning(
                "delivery worker process %d (pid %s) exited with status %s; starting another",
                old.slot,
                old.process.pid if old.process is not None else "?",
                old.process.returncode if old.process is not None else None,
            )
            started_at = old.started_at
            while self._running:
                pause = _RESTART_PAUSE_SECONDS - (time.monotonic() - started_at)
                if pause > 0:
                    await asyncio.sleep(pause)
                started_at = time.monotonic()
                fresh = self._new_worker(old.slot)
                try:
                    await fresh.start()
                except BaseException as error:
                    # Never leave a half-started worker behind, cancelled or not.
                    await asyncio.shield(fresh.stop())
                    if not isinstance(error, Exception):
                        raise
                    log.exception("could not start delivery worker process %d", old.slot)
                    continue
                if not self._running:
                    await fresh.stop()
                    return
                self._workers[old.slot] = fresh
                return
        finally:
            self._restarts.pop(old.slot, None)


def _lost(attempted_at: float, error: str) -> AttemptOutcome:
    return AttemptOutcome(
        status_code=None,
        latency=max(0.0, time.time() - attempted_at),
        response_body="",
        error=error,
        retry_after=None,
        attempted_at=datetime.fromtimestamp(attempted_at, UTC),
        lost=True,
    )


def default_processes() -> int:
    """How many worker processes ``WEBHOOKS_SENDER_PROCESSES=auto`` means on this machine.

    One core is left to the process that serves gRPC and runs the store, but two cores get
    two workers: the second takes work only when the first falls behind (``_pick``), so it
    adds throughput at full load and costs nothing at a light one. On a single core the
    workers would only add hand-offs, so requests are sent in-process (0).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    return 0 if cores < 2 else min(max(cores - 1, 2), 4)
