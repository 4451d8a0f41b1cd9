"""One running service: the gRPC server, the REST gateway and the dispatcher, together or apart.

``serve`` runs all three in one process; ``serve --no-dispatcher``, ``worker`` and
``gateway`` split them for scale. Start-up migrates the database first, so a new SQLite file
is ready on first start.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO
from wsgiref.simple_server import WSGIServer

from aiohttp import web
from sqlalchemy.engine import make_url

from dembrane.webhooks import metrics
from dembrane.webhooks.api.server import GrpcServer, start_grpc_server
from dembrane.webhooks.auth import TokenVerifier
from dembrane.webhooks.config import LISTEN_PROBLEMS, Settings, url_host
from dembrane.webhooks.delivery.dispatcher import Dispatcher, most_in_flight
from dembrane.webhooks.delivery.pool import SenderPool, default_processes
from dembrane.webhooks.delivery.sender import RequestSender, Sender
from dembrane.webhooks.delivery.targets import TargetPolicy
from dembrane.webhooks.gateway.app import create_app, run_gateway
from dembrane.webhooks.metrics import serve_metrics
from dembrane.webhooks.resources import Resources
from dembrane.webhooks.store.database import Database, SchemaError, open_lock_file

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 10.0


@dataclass
class Parts:
    """Which parts a process runs."""

    grpc: bool = True
    gateway: bool = True
    dispatcher: bool = True


class Service:
    """Starts and stops the parts of the service in the right order."""

    def __init__(self, settings: Settings, parts: Parts | None = None) -> None:
        self.settings = settings
        self.parts = parts or Parts()
        self.resources: Resources | None = None
        self.grpc: GrpcServer | None = None
        self.dispatcher: Dispatcher | None = None
        self._gateway: web.AppRunner | None = None
        self._database: Database | None = None
        self._sender: RequestSender | None = None
        self._lock: IO[bytes] | None = None
        self._journal_lock: IO[bytes] | None = None
        self._metrics: WSGIServer | None = None
        #: Whether every part has started, and whether stopping has begun (see ``problem``).
        self._started = False
        self._stopping = False
        self.grpc_port = 0
        self.http_port = 0

    @property
    def grpc_target(self) -> str:
        return f"{url_host(self.settings.bind)}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{url_host(self.settings.bind)}:{self.http_port}"

    async def start(self) -> None:
        """Start the parts; if one cannot start, stop those already started and raise."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        self._started = True

    def problem(self) -> str | None:
        """What keeps this process from doing its work now, in a sentence; None when nothing
        does. ``/healthz`` on the metrics port answers with it (read from that port's thread).
        """
        if self._stopping:
            return "The service is shutting down."
        if not self._started:
            return "The service is starting."
        if self.grpc is not None and not self.grpc.store_available:
            return "The store is unavailable."
        if self.dispatcher is not None:
            return self.dispatcher.problem()
        return None

    async def _start(self) -> None:
        settings = self.settings
        try:
            database = self._database = Database(
                settings.database_url, sqlite_synchronous=settings.sqlite_synchronous
            )
            log.info("database: %s", database.describe())
            await _on_own_thread(database.migrate, "migrate")
        except SchemaError as error:
            raise StartupError(f"cannot use the database: {error}") from None
        except OSError as error:  # the SQLite file's folder or lock files
            raise StartupError(file_problem(error)) from None
        if self.parts.dispatcher and database.is_sqlite:
            self._lock = _own_sqlite_delivery(database.url)
        policy = TargetPolicy(settings.allowed_targets)
        sender = self._sender = _sender(settings, policy, delivering=self.parts.dispatcher)
        await sender.start()
        self.resources = Resources(
            settings=settings, database=database, policy=policy, sender=sender
        )
        if self.parts.grpc:
            self.grpc = await start_grpc_server(self.resources, settings.bind, settings.grpc_port)
            self.grpc_port = self.grpc.port
            log.info("gRPC listening on %s", self.grpc_target)
        # Every port is bound before the dispatcher starts: a port that is taken stops the
        # start-up before anything is sent.
        self._metrics = start_metrics(settings, self.problem)
        if self.parts.gateway and self.parts.grpc:
            app = create_app(
                grpc_target=self.grpc_target,
                cors_origins=settings.cors_origins,
                verifier=TokenVerifier(settings),
            )
            self._gateway = await run_gateway(app, settings.bind, settings.http_port)
            self.http_port = _bound_port(self._gateway)
            log.info("REST gateway listening on %s", self.http_url)
        if self.parts.dispatcher:
            journal = self._outcome_journal(settings, database)
            self.dispatcher = Dispatcher(self.resources, journal=journal)
            await self.dispatcher.start()
            log.info("dispatcher started")

    def _outcome_journal(self, settings: Settings, database: Database) -> str | None:
        """Where this process's dispatcher journals its outcomes (``store/journal.py``).

        Beside a SQLite file by default: the file's delivery lock makes that journal this
        process's alone. A path given in ``WEBHOOKS_OUTCOME_JOURNAL`` (a replica's own, on
        PostgreSQL) gets a lock of its own, so no two processes ever share a journal.
        """
        if settings.outcome_journal is None:
            if self._lock is None:
                return None
            return f"{make_url(database.url).database}-outcomes"
        try:
            self._journal_lock = _own_journal(settings.outcome_journal)
        except OSError as error:
            raise StartupError(file_problem(error)) from None
        return settings.outcome_journal

    async def stop(self) -> None:
        """Stop taking calls, let in-flight ones finish, then release the dispatcher's work.

        With ``shutdown_delay``, a started service first reports NOT_SERVING (gRPC health,
        ``/healthz``) for that long while it goes on taking calls and delivering, so that
        load balancers that poll health move callers elsewhere before calls are refused.
        """
        first_stop = not self._stopping
        self._stopping = True
        delay = self.settings.shutdown_delay
        if delay > 0 and self._started and first_stop:
            log.info("shutting down in %g s: health reports NOT_SERVING meanwhile", delay)
            if self.grpc is not None:
                await self.grpc.announce_stop()
            await asyncio.sleep(delay)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_GRACE_SECONDS
        if self.grpc is not None:
            # The gateway stays up meanwhile: its new calls are refused by gRPC and answered
            # 503 (reason SHUTTING_DOWN), rather than finding the port closed.
            await self.grpc.drain(deadline)
        if self._gateway is not None:
            await self._gateway.cleanup()
        if self.grpc is not None:
            await self.grpc.stop(max(deadline - loop.time(), 0.0))
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        if self._sender is not None:
            await self._sender.close()
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()
            self._metrics = None
        if self._database is not None:
            self._database.close()
        if self._lock is not None:
            self._lock.close()
        if self._journal_lock is not None:
            self._journal_lock.close()
        self._sender = self._database = self._lock = self._journal_lock = None


async def _on_own_thread(fn: Callable[[], None], name: str) -> None:
    """Run ``fn`` on a daemon thread of its own and wait for it.

    Migrating may wait a long time (a database server that takes connections but does not
    answer, another replica's migration holding the lock). Stopped meanwhile, start-up need
    not wait for it, and the process can exit while the thread still waits.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.done():
            return  # the waiter went away
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            fn()
        except BaseException as raised:
            error = raised
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    await done


def file_problem(error: OSError) -> str:
    """A sentence for a SQLite file (or its folder or lock files) the service cannot use."""
    where = f" ({error.filename})" if error.filename else ""
    return (
        f"cannot use the SQLite database WEBHOOKS_DATABASE_URL names: "
        f"{error.strerror or error}{where}."
    )


def start_metrics(
    settings: Settings, health: Callable[[], str | None] | None = None
) -> WSGIServer | None:
    """Serve ``/metrics`` on ``WEBHOOKS_METRICS_PORT`` when it is set, and ``/healthz`` from
    ``health`` when given; stop it with ``shutdown()`` and ``server_close()``."""
    if not settings.metrics_port:
        return None
    try:
        server = serve_metrics(settings.metrics_port, settings.bind, health)
    except OSError as error:
        problem = LISTEN_PROBLEMS.get(error.errno or 0, error.strerror or str(error))
        raise StartupError(
            f"Cannot listen for metrics on {url_host(settings.bind)}:"
            f"{settings.metrics_port} (WEBHOOKS_METRICS_PORT): {problem}."
        ) from None
    base = f"http://{url_host(settings.bind)}:{settings.metrics_port}"
    if health is None:
        log.info("metrics on %s/metrics", base)
    else:
        log.info("metrics on %s/metrics, health on %s/healthz", base, base)
    return server


class StartupError(Exception):
    """A part of the service cannot start; the message says why, in one sentence."""


def _own_sqlite_delivery(url: str) -> IO[bytes] | None:
    """Hold the lock that makes this the one process delivering from a SQLite file.

    A dispatcher on SQLite takes over every lease at start, since the process that held them
    must be gone; a second one beside a running one would send those deliveries again. The
    lock is a file next to the database, held until the process ends or the service stops.
    """
    path = make_url(url).database
    if not path or path == ":memory:":
        return None
    return _hold_lock(
        f"{path}.delivery-lock",
        f"Another process already delivers from {path}: on SQLite only one may. Stop it, "
        "or start this one with --no-dispatcher (serve) to add gRPC and REST beside it.",
    )


def _own_journal(prefix: str) -> IO[bytes]:
    """Hold the lock that makes the outcome journal at ``prefix`` this process's alone."""
    return _hold_lock(
        f"{prefix}.lock",
        f"Another process already keeps its outcome journal at {prefix}: give each "
        "process a WEBHOOKS_OUTCOME_JOURNAL of its own.",
    )


def _hold_lock(path: str, refusal: str) -> IO[bytes]:
    """Take the lock file at ``path`` for as long as the returned file stays open; raise
    ``StartupError`` with ``refusal`` when another process holds it."""
    lock = open_lock_file(path)
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise StartupError(refusal) from None
    return lock


def _sender(settings: Settings, policy: TargetPolicy, *, delivering: bool) -> RequestSender:
    """Worker processes where this process delivers; else (or when told so) in-process."""
    processes = settings.sender_processes
    if processes is None:
        processes = default_processes()
    max_connections = max(most_in_flight(settings.max_concurrency), 16)
    if delivering and processes > 0:
        pool = SenderPool(
            processes,
            connect_timeout=settings.connect_timeout,
            request_timeout=settings.request_timeout,
            allowed_targets=tuple(str(network) for network in policy.allowed),
            max_connections=max_connections,
            log_level=settings.log_level,
            nice=settings.sender_nice,
        )
        metrics.STATS.sender_pids = lambda: pool.pids
        return pool
    return Sender(
        connect_timeout=settings.connect_timeout,
        request_timeout=settings.request_timeout,
        policy=policy,
        max_connections=max_connections,
    )


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise OSError("The REST gateway did not bind a TCP port.")
