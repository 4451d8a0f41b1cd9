"""Scenario 6, backlog: a million due deliveries against a thousand.

The backlog is written straight into the store (a million deliveries through the API would
measure the API): the schema comes from the service's own migrations, the rows are inserted in
chunks of 50,000 (SQLite with ``synchronous=OFF`` on the loading connection only, PostgreSQL
with ``COPY``), every delivery pending and due in the past. Then, per size:

* the claim: ``store.outbox.claim_due`` as the dispatcher calls it (same batch size, its own
  transaction), timed over repeated claims, the two sizes taking turns. The figure is the
  claim's statements, the part that could grow with the table; the commit, a disk sync that
  does not, is timed apart and noted. Each claim's lease is undone afterwards, outside the
  timing, so every claim meets the same table;
* the memory: the service's dispatcher (``dembrane-webhooks worker``) runs over the backlog in
  a process of its own for a few seconds, delivering to the receiver, and its peak resident
  memory (``VmHWM``, its sender processes' added) is read before it stops. One process per
  size, so peaks never mix.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Engine,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    bindparam,
    text,
)

from bench.client import EVENT_TYPE, WEBHOOK_SECRET, WORKSPACE_ID, rendered_body
from bench.results import Figure, Goal, GoalKind, ScenarioResult
from bench.scenarios import DEFAULT_PER_WEBHOOK, BenchContext
from bench.service import ServiceConfig, ServiceProcess
from dembrane.webhooks.domain.access import Tier
from dembrane.webhooks.store.database import Database
from dembrane.webhooks.store.outbox import claim_due

PROJECT_ID = "p-backlog"
CHUNK_ROWS = 50_000
#: The lease the claims take, as the service's default ``WEBHOOKS_LEASE_SECONDS``.
LEASE_SECONDS = 60.0
_MB = 1024 * 1024


def dispatcher_batch(max_concurrency: int) -> int:
    """The rows one claim leases; the dispatcher's own default for this concurrency."""
    return max(16, min(500, 2 * max_concurrency))


# -- building ------------------------------------------------------------------------------


def _reflect(engine: Engine, name: str) -> Table:
    return Table(name, MetaData(), autoload_with=engine)


def _complete(table: Table, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` plus a neutral value for every other NOT NULL column without a default,
    so that a column a later migration adds does not break the build."""
    row = dict(values)
    for column in table.columns:
        if column.name in row or column.nullable or column.server_default is not None:
            continue
        if column.primary_key and isinstance(column.type, Integer):
            continue
        row[column.name] = _neutral(column)
    return row


def _neutral(column: Column[Any]) -> object:
    if isinstance(column.type, Boolean):
        return False
    if isinstance(column.type, Integer):
        return 0
    if isinstance(column.type, Float):
        return 0.0
    if isinstance(column.type, LargeBinary):
        return b""
    return ""


def _bulk_insert(
    engine: Engine, table: Table, template: dict[str, Any], rows: Iterator[dict[str, Any]]
) -> None:
    """Insert ``rows`` (each a partial row over ``template``) in chunks, as fast as the
    database takes them."""
    defaults = _complete(table, template)
    columns = list(defaults)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        if engine.dialect.name == "sqlite":
            # Loading only: this connection does not wait for the disk; the service's do.
            cursor.execute("PRAGMA synchronous=OFF")
            placeholders = ", ".join("?" for _ in columns)
            sql = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({placeholders})"  # noqa: S608
            for chunk in _chunked(rows, columns, defaults):
                cursor.executemany(sql, chunk)
                raw.commit()
        else:
            copy_sql = f"COPY {table.name} ({', '.join(columns)}) FROM STDIN"
            for chunk in _chunked(rows, columns, defaults):
                with cursor.copy(copy_sql) as copy:
                    for values in chunk:
                        copy.write_row(values)
                raw.commit()
        cursor.close()
    finally:
        raw.close()


def _chunked(
    rows: Iterator[dict[str, Any]], columns: Sequence[str], defaults: dict[str, Any]
) -> Iterator[list[tuple[Any, ...]]]:
    chunk: list[tuple[Any, ...]] = []
    for row in rows:
        merged = defaults | row
        chunk.append(tuple(merged[name] for name in columns))
        if len(chunk) >= CHUNK_ROWS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def build_backlog(url: str, deliveries: int, webhook_urls: Sequence[str]) -> float:
    """Write ``deliveries`` due deliveries over ``len(webhook_urls)`` webhooks; returns the
    seconds it took."""
    started = time.perf_counter()
    hooks = len(webhook_urls)
    events = max(1, deliveries // hooks)
    database = Database(url)
    engine = database.engine
    try:
        database.migrate()
        now = time.time()
        tables = {
            name: _reflect(engine, name)
            for name in ("workspaces", "projects", "webhooks", "events", "deliveries")
        }
        with engine.begin() as connection:
            connection.execute(
                tables["workspaces"].insert(),
                [
                    _complete(
                        tables["workspaces"],
                        {
                            "id": WORKSPACE_ID,
                            "name": "Benchmarks",
                            "tier": int(Tier.CHANGEMAKER),
                            "created_at": now,
                            "updated_at": now,
                        },
                    )
                ],
            )
            connection.execute(
                tables["projects"].insert(),
                [
                    _complete(
                        tables["projects"],
                        {
                            "id": PROJECT_ID,
                            "workspace_id": WORKSPACE_ID,
                            "name": f"Project {PROJECT_ID}",
                            "language": "en",
                            "created_at": now,
                            "updated_at": now,
                        },
                    )
                ],
            )
            connection.execute(
                tables["webhooks"].insert(),
                [
                    _complete(
                        tables["webhooks"],
                        {
                            "id": _webhook_id(index),
                            "project_id": PROJECT_ID,
                            "name": f"bench {index}",
                            "url": hook_url,
                            "events": f'["{EVENT_TYPE}"]',
                            "status": "published",
                            "secret": WEBHOOK_SECRET,
                            "disabled_reason": "",
                            "created_at": now,
                            "updated_at": now,
                        },
                    )
                    for index, hook_url in enumerate(webhook_urls)
                ],
            )
        past = now - 3600.0

        event_template = {
            "id": "",
            "type": EVENT_TYPE,
            "project_id": PROJECT_ID,
            "occurred_at": past,
            "created_at": past,
            "body": b"",
            "skip_reason": "",
            "delivery_count": hooks,
        }

        def event_rows() -> Iterator[dict[str, Any]]:
            for number in range(events):
                event_id = _event_id(number)
                yield {"id": event_id, "body": rendered_body(event_id, PROJECT_ID)}

        _bulk_insert(engine, tables["events"], event_template, event_rows())

        delivery_template = {
            "id": "",
            "event_id": "",
            "webhook_id": "",
            "event_type": EVENT_TYPE,
            "status": "pending",
            "attempt_count": 0,
            "next_attempt_at": past,
            "lease_owner": None,
            "created_at": past,
            "updated_at": past,
            "last_attempt_at": None,
            "last_status_code": None,
            "last_error": "",
            "skip_reason": "",
        }

        def delivery_rows() -> Iterator[dict[str, Any]]:
            for number in range(events):
                event_id = _event_id(number)
                for index in range(hooks):
                    yield {
                        "id": f"dlv_backlog_{number:07d}_{index:03d}",
                        "event_id": event_id,
                        "webhook_id": _webhook_id(index),
                        # Oldest first, all in the past: every row is due.
                        "next_attempt_at": past + number * 1e-3 + index * 1e-6,
                    }

        _bulk_insert(engine, tables["deliveries"], delivery_template, delivery_rows())
        if engine.dialect.name == "postgresql":
            # What autovacuum would have done by the time a real backlog had built up.
            with engine.begin() as connection:
                connection.execute(text("ANALYZE events"))
                connection.execute(text("ANALYZE deliveries"))
    finally:
        database.close()
    return time.perf_counter() - started


def _webhook_id(index: int) -> str:
    return f"wh_backlog_{index:03d}"


def _event_id(number: int) -> str:
    return f"evt-backlog-{number:07d}"


# -- measuring -----------------------------------------------------------------------------


def time_claims(
    urls: dict[int, str], batch: int, repeats: int
) -> dict[int, tuple[list[float], list[float]]]:
    """Seconds of ``claim_due``'s statements and of the commit after them, per claim and size.

    The sizes take turns, one claim each, so that the machine's drift in speed during the
    run falls on both alike.
    """
    synchronous = os.environ.get("WEBHOOKS_SQLITE_SYNCHRONOUS", "FULL").upper()
    databases = {size: Database(url, sqlite_synchronous=synchronous) for size, url in urls.items()}
    owner = "dsp_bench_claims"
    undo = text(
        "UPDATE deliveries SET next_attempt_at = :due, lease_owner = NULL WHERE id IN :ids"
    ).bindparams(bindparam("ids", expanding=True))
    timings: dict[int, tuple[list[float], list[float]]] = {size: ([], []) for size in urls}
    try:
        for _ in range(repeats):
            for size, database in databases.items():
                samples, commits = timings[size]
                with database.session() as session:
                    session.begin()
                    started = time.perf_counter()
                    claims = claim_due(session, owner, time.time(), LEASE_SECONDS, batch)
                    claimed = time.perf_counter()
                    session.commit()
                    commits.append(time.perf_counter() - claimed)
                samples.append(claimed - started)
                if not claims:
                    raise RuntimeError("The claim found no due deliveries in the backlog.")
                ids = [claim.delivery_id for claim in claims]
                with database.engine.begin() as connection:
                    connection.execute(undo, {"due": time.time() - 3600.0, "ids": ids})
    finally:
        for database in databases.values():
            database.close()
    return timings


@dataclass
class DispatcherRun:
    """What a dispatcher did over a backlog in its few seconds."""

    peak_rss_bytes: int | None
    delivered: int
    #: Deliveries per second from the first arrival to the end of the run.
    drain_rate: float | None


async def run_dispatcher(ctx: BenchContext, url: str, seconds: float) -> DispatcherRun:
    """Run a dispatcher-only service over the backlog for ``seconds`` after it starts."""
    config = ServiceConfig(
        database_url=url,
        max_concurrency=ctx.concurrency,
        per_webhook_concurrency=DEFAULT_PER_WEBHOOK,
        command="worker",
    )
    profile = None
    if ctx.profile_mode is not None and ctx.profile_dir is not None:
        profile = (ctx.profile_mode, ctx.profile_dir / f"{Path(url).stem}-worker")
    service = ServiceProcess(config, ctx.workdir, profile=profile)
    await ctx.receiver.reset()
    await service.start()
    first: tuple[float, int] | None = None
    try:
        end = time.monotonic() + seconds
        while (now := time.monotonic()) < end:
            if first is None:
                delivered = (await ctx.receiver.stats())["delivered"]
                if delivered:
                    first = (time.monotonic(), delivered)
            await asyncio.sleep(min(0.05, max(0.0, end - now)))
        delivered = (await ctx.receiver.stats())["delivered"]
        last = time.monotonic()
    finally:
        await service.stop()
    rate = None
    if first is not None and delivered > first[1] and last > first[0]:
        rate = (delivered - first[1]) / (last - first[0])
    return DispatcherRun(service.peak_rss_bytes, delivered, rate)


async def backlog(ctx: BenchContext) -> ScenarioResult:
    result = ScenarioResult("backlog")
    scale = ctx.scale
    batch = dispatcher_batch(ctx.concurrency)
    hooks = [ctx.receiver.url(i) for i in range(scale.backlog_webhooks)]
    claim_ms: dict[int, float] = {}
    peak_mb: dict[int, float | None] = {}
    drain: dict[int, float | None] = {}
    sizes = (scale.backlog_small, scale.backlog_large)
    urls: dict[int, str] = {}
    built: dict[int, float] = {}
    for size in sizes:
        urls[size] = await asyncio.to_thread(ctx.lane.fresh, f"backlog-{size}")
        ctx.log(f"backlog: writing {size:,} due deliveries")
        built[size] = await asyncio.to_thread(build_backlog, urls[size], size, hooks)
        ctx.log(f"backlog: {size:,} rows written in {built[size]:.1f} s")
    ctx.log(f"backlog: timing claims of {batch}, the sizes taking turns")
    timings = await asyncio.to_thread(time_claims, urls, batch, scale.claim_repeats)
    for size in sizes:
        samples, commits = timings[size]
        claim_ms[size] = statistics.median(samples) * 1000.0
        result.notes.append(
            f"backlog {size:,}: built in {built[size]:.1f} s; claim of {batch} rows: median "
            f"{claim_ms[size]:.2f} ms, first {samples[0] * 1000:.2f} ms, "
            f"max {max(samples) * 1000:.2f} ms over {len(samples)} claims; "
            f"its commit: median {statistics.median(commits) * 1000:.2f} ms"
        )
    for size in sizes:
        ctx.log(
            f"backlog: the dispatcher runs over {size:,} rows for {scale.backlog_run_seconds:g} s"
        )
        ran = await run_dispatcher(ctx, urls[size], scale.backlog_run_seconds)
        peak_mb[size] = None if ran.peak_rss_bytes is None else ran.peak_rss_bytes / _MB
        drain[size] = ran.drain_rate
        result.notes.append(
            f"backlog {size:,}: the dispatcher delivered {ran.delivered:,} in its "
            f"{scale.backlog_run_seconds:g} s"
        )
    small, large = scale.backlog_small, scale.backlog_large
    result.figures.append(
        Figure(
            "6 backlog",
            f"claim time ({batch} rows), {large:,} due",
            "ms",
            claim_ms[large],
            baseline=claim_ms[small],
            baseline_name=f"{small:,} due",
            goal=Goal(GoalKind.RATIO_AT_MOST, 2.0),
        )
    )
    result.figures.append(
        Figure(
            "6 backlog",
            f"dispatcher peak memory, {large:,} due",
            "MB",
            peak_mb[large],
            baseline=peak_mb[small],
            baseline_name=f"{small:,} due",
            goal=Goal(GoalKind.VALUE_BELOW, 300.0),
        )
    )
    result.figures.append(
        Figure(
            "6 backlog",
            f"deliveries/s draining {large:,} due, nothing published",
            "/s",
            drain[large],
            baseline=ctx.baselines.get("ceiling"),
            baseline_name="C" if "ceiling" in ctx.baselines else "",
        )
    )
    return result
