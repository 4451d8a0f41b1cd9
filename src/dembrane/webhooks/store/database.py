"""Engine and session set-up, migrations, and running store work off the event loop.

The store's functions are plain synchronous SQLAlchemy; ``Database.run`` executes them in a
small thread pool so the asyncio servers never block on I/O. SQLite gets one thread (it
serializes writers anyway, and one connection avoids lock contention); PostgreSQL gets several.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import psycopg
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import QueuePool
from sqlmodel import Session

T = TypeVar("T")

_MIGRATIONS = Path(__file__).with_name("migrations")
log = logging.getLogger(__name__)
#: The PostgreSQL advisory lock that serializes migrations ("webhook" in ASCII).
_MIGRATION_LOCK_KEY = 0x776562686F6F6B


class DriverSession:
    """One SQLite transaction on the driver's own connection, standing in for a ``Session``.

    The hottest transactions (publishing, claiming, recording outcomes) run fixed SQL on the
    driver's cursor; SQLAlchemy's Session around them cost a third of a small publishing
    transaction's CPU, on the thread every other write waits for. ``Database.run_driver``
    hands them this instead on SQLite; PostgreSQL keeps the Session.
    """

    __slots__ = ("connection", "info")

    def __init__(self, connection: sqlite3.Connection, info: dict[Any, Any]) -> None:
        self.connection = connection
        #: What the pool keeps with the connection for its life (``PoolProxiedConnection.info``).
        self.info = info

    def cursor(self) -> sqlite3.Cursor:
        return self.connection.cursor()


#: What the hot store functions run in: a Session, or on SQLite the driver's connection.
Transaction = Session | DriverSession


class SchemaError(RuntimeError):
    """The database's schema cannot be used by this version; the message says why."""


#: How often transactions look whether the SQLite file is still the one opened.
FILE_CHECK_SECONDS = 0.2


class StoreUnavailable(Exception):
    """The store cannot be used, for a reason the service found itself (the message says
    which), rather than one the driver reported."""


#: PostgreSQL's codes for a server that takes no writes: a read-only transaction (a standby,
#: or ``default_transaction_read_only``) and a server in recovery.
_READ_ONLY_SQLSTATES = frozenset({"25006", "57P03"})


def store_unavailable(error: BaseException) -> bool:
    """Whether ``error`` says the database cannot be reached or used right now (a server
    that is down, restarting or read-only, a dropped connection, a locked, full, unreadable
    or vanished file), rather than that a statement is wrong."""
    if isinstance(error, OperationalError | InterfaceError | PoolTimeoutError | StoreUnavailable):
        return True
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    # The hot paths use the driver's cursor, whose errors come unwrapped.
    cause = error.orig if isinstance(error, DBAPIError) else error
    return isinstance(cause, sqlite3.OperationalError | psycopg.OperationalError) or (
        getattr(cause, "sqlstate", None) in _READ_ONLY_SQLSTATES
    )


def describe_store_error(error: BaseException) -> str:
    """The driver's first line about ``error`` (never the statement or its parameters)."""
    if isinstance(error, TimeoutError):
        return "it did not answer in time (a long transaction, or a lock held elsewhere)"
    cause = error.orig if isinstance(error, DBAPIError) and error.orig else error
    text_ = str(cause).strip()
    return text_.splitlines()[0] if text_ else type(cause).__name__


def rows_changed(result: Any) -> int:
    """How many rows a DELETE or UPDATE changed (0 where the driver cannot tell)."""
    count = getattr(result, "rowcount", -1)
    return int(count) if count is not None and count >= 0 else 0


class OutageLog:
    """Logs a store outage without flooding: a line when it starts, one a minute while it
    lasts, one when it ends. Other errors are logged with their traceback, each time."""

    def __init__(self, logger: logging.Logger, what: str, every: float = 60.0) -> None:
        self._log = logger
        self._what = what
        self._every = every
        self._since: float | None = None
        self._last = 0.0

    def failed(self, error: BaseException, *, unavailable: bool | None = None) -> None:
        """Log a failure of the work (call from an ``except`` block); ``unavailable`` says
        whether it means the store is out of reach, when ``store_unavailable`` cannot tell
        (errors of the driver itself)."""
        if not (store_unavailable(error) if unavailable is None else unavailable):
            self._log.exception("%s failed; trying again shortly", self._what)
            return
        now = time.monotonic()
        if self._since is None:
            self._since, self._last = now, now
            self._log.warning(
                "%s failed: the store is unavailable (%s); trying again until it is back",
                self._what,
                describe_store_error(error),
            )
        elif now - self._last >= self._every:
            self._last = now
            self._log.warning(
                "%s: the store has been unavailable for %.0f s (%s)",
                self._what,
                now - self._since,
                describe_store_error(error),
            )

    @property
    def ongoing(self) -> bool:
        """Whether the store has been out of reach since the work last went through."""
        return self._since is not None

    def succeeded(self) -> None:
        """Note that the work went through; ends an outage."""
        if self._since is not None:
            self._log.info(
                "%s works again; the store was unavailable for %.0f s",
                self._what,
                time.monotonic() - self._since,
            )
            self._since = None


def normalize_url(url: str) -> str:
    """Accept ``postgresql://`` (and ``postgresql+psycopg2://``, whose parameters are
    libpq's too) and pick the psycopg 3 driver the service ships with."""
    parsed = make_url(url)
    if parsed.drivername.partition("+")[0] in ("postgresql", "postgres"):
        # Settings refuse the drivers psycopg 3 does not stand in for.
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


#: libpq settings unless the URL gives its own: a server that accepts connections but never
#: answers (a black-holed address, a frozen host) fails a connection attempt after 10 s
#: rather than hanging start-up or a reconnect for good, and a server lost mid-transaction
#: (a network partition) fails the transaction within 30 s rather than the kernel's 15 min.
_PG_CONNECT: dict[str, int] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


class Database:
    """One engine, a thread pool to use it from asyncio, and the schema's migrations.

    Statement parameters are kept out of error messages (``hide_parameters``): they hold
    webhook secrets, and errors end up in logs.
    """

    def __init__(
        self, url: str, *, threads: int | None = None, sqlite_synchronous: str = "FULL"
    ) -> None:
        self.url = normalize_url(url)
        parsed = make_url(self.url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self._synchronous = sqlite_synchronous
        #: The SQLite file (its path and device and inode when opened), watched so that a
        #: file removed or replaced under the running service stops it writing into the void.
        self._file: tuple[str, tuple[int, int]] | None = None
        self._file_checked_at = float("-inf")
        self._file_lost = False
        if self.is_sqlite:
            database = parsed.database or ""
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
                _create_private(database)
                with contextlib.suppress(OSError):
                    opened = os.stat(database)
                    self._file = (database, (opened.st_dev, opened.st_ino))
            self.engine: Engine = create_engine(
                self.url,
                poolclass=QueuePool,
                pool_size=1,
                max_overflow=2,
                # The hot statements come in many shapes (a multi-row statement per row
                # count, a claim per number of webhooks left out): room to keep them compiled.
                connect_args={"check_same_thread": False, "timeout": 30, "cached_statements": 512},
                hide_parameters=True,
            )
            event.listen(
                self.engine, "connect", functools.partial(_sqlite_pragmas, sqlite_synchronous)
            )
            workers = threads or 1
        else:
            workers = threads or 8
            self.engine = create_engine(
                self.url,
                pool_size=workers,
                max_overflow=4,
                pool_pre_ping=True,
                hide_parameters=True,
                connect_args={k: v for k, v in _PG_CONNECT.items() if k not in parsed.query},
            )
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="store")

    def describe(self) -> str:
        """Which database this is, for the log: a SQLite file's full path, or a server's
        address and database without the user or password."""
        parsed = make_url(self.url)
        if self.is_sqlite:
            return f"SQLite file {Path(parsed.database or '').resolve()}"
        # libpq also takes the host and port as query parameters (a Unix socket's folder).
        query = parsed.query
        host = parsed.host or _first(query.get("host")) or "localhost"
        port_value = parsed.port or _first(query.get("port"))
        port = f":{port_value}" if port_value else ""
        return f"PostgreSQL {host}{port}/{parsed.database or ''}"

    def migrate(self, revision: str = "head") -> None:
        """Bring the schema to ``revision``, the newest by default (creates it on first start).

        Processes starting together take turns (on PostgreSQL an advisory lock held for the
        migration's transaction, on SQLite a lock file next to the database): the first
        migrates, the others find the schema current.
        Raises ``SchemaError`` for a schema this version does not know, such as one a newer
        version migrated.
        """
        from alembic import command
        from alembic.config import Config
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory
        from alembic.util.exc import CommandError

        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        config.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        with self._sqlite_migration_lock(), self._migration_transaction() as connection:
            if not self.is_sqlite:
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
                )
            current = MigrationContext.configure(connection).get_current_revision()
            script = ScriptDirectory.from_config(config)
            try:
                known = current is None or script.get_revision(current) is not None
            except CommandError:
                known = False
            if not known:
                raise SchemaError(
                    f"the database's schema is at revision {current}, which this version does "
                    f"not know (its newest is {script.get_current_head()}): run the version "
                    "that migrated it, or a newer one."
                )
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
            now = MigrationContext.configure(connection).get_current_revision()
            if now != current and self.is_sqlite:
                _report_broken_keys(connection)
            if now != current:
                if current is None:
                    log.info("database: created the schema (revision %s)", now)
                else:
                    log.info("database: migrated the schema from revision %s to %s", current, now)

    @contextlib.contextmanager
    def _migration_transaction(self) -> Iterator[Connection]:
        """The transaction migrations run in; on SQLite with foreign keys off.

        A migration that rebuilds a table (copies it, drops the old one, renames the copy)
        would otherwise delete, with the old table, every row that refers to it through a
        cascading key: a rebuild of ``deliveries`` would take every attempt with it. SQLite
        can change the setting only outside a transaction, so it is set around this one
        (``migrate`` checks the keys after a migration, as SQLite's procedure has it).
        """
        with self.engine.connect() as connection:
            if not self.is_sqlite:
                with connection.begin():
                    yield connection
                return
            driver = cast(sqlite3.Connection, connection.connection.driver_connection)
            driver.execute("PRAGMA foreign_keys=OFF")
            try:
                with connection.begin():
                    yield connection
            finally:
                driver.execute("PRAGMA foreign_keys=ON")

    @contextlib.contextmanager
    def _sqlite_migration_lock(self) -> Iterator[None]:
        """Hold ``<file>.migrate-lock`` while migrating a SQLite file (nothing elsewhere)."""
        path = make_url(self.url).database if self.is_sqlite else None
        if not path or path == ":memory:":
            yield
            return
        with open_lock_file(f"{path}.migrate-lock") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def call(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` in one transaction, synchronously."""
        self._check_file()
        with self.session() as session, session.begin():
            return fn(session)

    def _check_file(self) -> None:
        """Raise ``StoreUnavailable`` when the SQLite file opened at start is no longer at
        its path: everything written from then on would be lost with the file.

        Looked at no more than every ``FILE_CHECK_SECONDS``: the ``stat`` lets go of the
        interpreter lock, and winning it back on a busy process can cost a transaction
        milliseconds; once found gone, the file counts as gone for good.
        """
        if self._file is None:
            return
        path, identity = self._file
        if not self._file_lost:
            checked_at = time.monotonic()
            if checked_at - self._file_checked_at < FILE_CHECK_SECONDS:
                return
            self._file_checked_at = checked_at
            try:
                now = os.stat(path)
            except OSError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == identity:
                return
            self._file_lost = True
        raise StoreUnavailable(
            f"the SQLite file {Path(path).resolve()} was removed or replaced while the "
            "service ran; nothing is written until the service is restarted on the "
            "file it should use"
        )

    async def run_driver(self, fn: Callable[..., T], *args: Any, relaxed: bool = False) -> T:
        """Like ``run`` (``run_relaxed`` when ``relaxed``), for functions that take a
        ``Transaction``: on SQLite they get the driver's connection without a Session."""
        loop = asyncio.get_running_loop()
        call = functools.partial(self.call_driver, fn, *args, relaxed=relaxed)
        return await loop.run_in_executor(self._executor, call)

    def call_driver(self, fn: Callable[..., T], *args: Any, relaxed: bool = False) -> T:
        """``run_driver``'s transaction, synchronously (on one of the store's threads)."""
        call = self._call_on_driver if self.is_sqlite else self._call_with
        return call(fn, args, not relaxed)

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        """Queue ``fn(*args)`` for the store's threads without waiting for it; ``fn`` reports
        back itself. Raises ``RuntimeError`` once the store is closed."""
        self._executor.submit(fn, *args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(session, *args)`` in one transaction on the store's threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call_with, fn, args, True)

    async def run_relaxed(self, fn: Callable[..., T], *args: Any) -> T:
        """Like ``run``, for bookkeeping whose loss on a power cut costs only a repeat.

        On SQLite the commit then skips the disk sync (``synchronous=NORMAL`` in WAL mode:
        still safe against a process crash, and the database stays consistent). The
        dispatcher's leases and outcomes qualify: a lost one makes a delivery due again,
        which at-least-once delivery allows. What a caller was promised, such as a
        published event, is always written with ``run``.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call_with, fn, args, False)

    def _call_with(self, fn: Callable[..., T], args: tuple[Any, ...], durable: bool) -> T:
        self._check_file()
        with self.session() as session, session.begin():
            if self.is_sqlite:
                self._set_synchronous(session.connection().connection, durable)
            return fn(session, *args)

    def _call_on_driver(self, fn: Callable[..., T], args: tuple[Any, ...], durable: bool) -> T:
        self._check_file()
        pooled = self.engine.raw_connection()
        try:
            self._set_synchronous(pooled, durable)
            connection = cast(sqlite3.Connection, pooled.driver_connection)
            try:
                result = fn(DriverSession(connection, pooled.info), *args)
                connection.commit()
            except BaseException:
                connection.rollback()
                raise
            return result
        finally:
            pooled.close()

    def _set_synchronous(self, pooled: Any, durable: bool) -> None:
        """Set SQLite's sync level for the transaction about to start on ``pooled``.

        Set before the transaction's first write, when the driver opens it, and only when
        it changes: the setting stays with the connection.
        """
        level = self._synchronous if durable else "NORMAL"
        if pooled.info.get("synchronous") != level:
            cursor = pooled.cursor()
            cursor.execute(f"PRAGMA synchronous={level}")
            cursor.close()
            pooled.info["synchronous"] = level

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.engine.dispose()


def _report_broken_keys(connection: Connection) -> None:
    """Log rows whose foreign keys name no row, after a migration ran with the keys off.

    Reported, not deleted: such rows would have been there before, since the migrations
    themselves make none.
    """
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        log.warning(
            "database: %d rows name a row that is not there (the first in table %s)",
            len(broken),
            broken[0][0],
        )


def _first(value: str | tuple[str, ...] | None) -> str | None:
    """A URL query parameter's value (the first, when it is given more than once)."""
    if isinstance(value, tuple):
        return value[0] if value else None
    return value


def _create_private(path: str) -> None:
    """Make the SQLite file and its journals readable by their owner only: the database
    holds every signing secret. A new file is created so (SQLite gives its journal files
    the database's mode); an existing one that others may read is narrowed, with a warning.
    A path that cannot be created, or that holds something other than a SQLite database (a
    folder, a device, a file of other data), is left as it is for SQLite to report."""
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    if not _is_sqlite_file(path):
        return
    for name in (path, f"{path}-wal", f"{path}-shm"):
        try:
            status = os.stat(name)
            if not stat.S_ISREG(status.st_mode):
                continue
            mode = status.st_mode & 0o777
            if mode & 0o077:
                os.chmod(name, mode & 0o700)
                log.warning(
                    "%s was readable by others; it holds secrets, now only by its owner", name
                )
        except OSError:
            continue


#: The first bytes of every SQLite database file.
_SQLITE_HEADER = b"SQLite format 3\x00"


def _is_sqlite_file(path: str) -> bool:
    """Whether ``path`` is a regular file that is empty (new) or a SQLite database."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as file:
            start = file.read(len(_SQLITE_HEADER))
    except OSError:
        return False
    return start in (b"", _SQLITE_HEADER)


def open_lock_file(path: str) -> IO[bytes]:
    """Open (creating it readable by its owner only) a lock file beside the database."""
    return os.fdopen(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600), "ab")


#: The size a checkpoint truncates SQLite's write-ahead log to.
WAL_SIZE_LIMIT = 64 * 1024 * 1024


def _sqlite_pragmas(synchronous: str, dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers run beside the writer; FULL makes every commit durable before a
    # publish call returns; foreign keys make deletes cascade. A checkpoint cuts the WAL
    # back to 64 MiB: it otherwise keeps the size of the largest transaction ever written.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
    cursor.execute(f"PRAGMA synchronous={synchronous}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
