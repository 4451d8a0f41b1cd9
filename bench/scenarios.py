"""The scenarios: ceiling, throughput, latency, fan-out, isolation (backlog is in ``backlog``).

Every scenario that runs the service gets a fresh, empty database and a fresh service process
(``running_service``), publishes over gRPC from this process, and takes the receiver's count
of distinct deliveries as the truth about what arrived. Throughput-like scenarios then wait
until the service's own store records every delivery as succeeded, so a rate always covers
the whole path: publish, store, claim, send, record.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import resource
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import loadgen
from bench.client import BenchClient, make_event, signed_request
from bench.lanes import DatabaseLane
from bench.receiver import ReceiverProcess
from bench.results import (
    Figure,
    Goal,
    GoalKind,
    ScenarioResult,
    fmt_number,
    fmt_ratio,
    percentile,
)
from bench.service import ServiceConfig, ServiceProcess
from bench.steal import MachineClock, describe_stolen, stolen_share
from dembrane.webhooks.v1 import event_pb2, event_service_pb2

SUCCEEDED = "succeeded"
#: The per-webhook cap the product ships with; isolation runs with it, as deployments do.
DEFAULT_PER_WEBHOOK = 8


@dataclass(frozen=True)
class Scale:
    """How much work each scenario does; ``FULL`` for ``make bench``, ``QUICK`` for a smoke."""

    name: str
    ceiling_requests: int
    throughput_events: int
    batch_size: int
    publishers: int
    latency_rate: float
    latency_seconds: float
    latency_warmup_seconds: float
    baseline_seconds: float
    fanout_calls: int
    fanout_webhooks: int
    isolation_webhooks: int
    isolation_hanging: int
    isolation_events: int
    isolation_timeout: float
    #: Whether isolation also runs its control (the same webhooks, none hanging).
    isolation_control: bool
    backlog_small: int
    backlog_large: int
    backlog_webhooks: int
    backlog_run_seconds: float
    claim_repeats: int
    #: The longest a scenario waits for its deliveries before reporting what it has.
    deadline: float
    #: How many times throughput runs; the table shows the median round.
    rounds: int
    #: How many rounds of isolation run. Each weighs two runs of a hundred webhooks against
    #: scenario 2, and single runs scatter by a fifth on a busy machine (scenario 2 alone
    #: moved between 4,600 and 7,300 deliveries/s within five minutes on a quiet host):
    #: seven rounds give a steadier median than five, for under a minute more.
    isolation_rounds: int


FULL = Scale(
    name="full",
    ceiling_requests=40_000,
    throughput_events=20_000,
    batch_size=100,
    publishers=4,
    latency_rate=500.0,
    latency_seconds=20.0,
    latency_warmup_seconds=1.0,
    baseline_seconds=5.0,
    fanout_calls=200,
    fanout_webhooks=100,
    isolation_webhooks=100,
    isolation_hanging=10,
    isolation_events=20_000,
    isolation_timeout=5.0,
    isolation_control=True,
    backlog_small=1_000,
    backlog_large=1_000_000,
    backlog_webhooks=100,
    backlog_run_seconds=8.0,
    claim_repeats=15,
    deadline=150.0,
    rounds=3,
    isolation_rounds=7,
)

QUICK = Scale(
    name="quick",
    ceiling_requests=2_000,
    throughput_events=1_000,
    batch_size=100,
    publishers=4,
    latency_rate=500.0,
    latency_seconds=1.5,
    latency_warmup_seconds=0.25,
    baseline_seconds=0.5,
    fanout_calls=10,
    fanout_webhooks=100,
    isolation_webhooks=20,
    isolation_hanging=2,
    isolation_events=1_000,
    isolation_timeout=1.0,
    isolation_control=False,
    backlog_small=1_000,
    backlog_large=20_000,
    backlog_webhooks=20,
    backlog_run_seconds=1.0,
    claim_repeats=5,
    deadline=30.0,
    rounds=1,
    isolation_rounds=1,
)


@dataclass
class BenchContext:
    """What every scenario shares: the scale, the lane, the receiver, and earlier results."""

    scale: Scale
    lane: DatabaseLane
    receiver: ReceiverProcess
    workdir: Path
    concurrency: int
    #: The profiler to run the service under (``cprofile`` or ``sample``), and its folder.
    profile_mode: str | None = None
    profile_dir: Path | None = None
    #: The Go load generator for the latency scenario (``bench.loadgen``), if it was built.
    loadgen: Path | None = None
    #: Figures later scenarios compare against, by key (``ceiling``).
    baselines: dict[str, float] = field(default_factory=dict)
    #: Scenario 1's figure, whose value becomes the mean once C is measured again.
    ceiling: Figure | None = None

    def log(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class ServiceRun:
    """A running service: its process, a client on it, and its database."""

    service: ServiceProcess
    client: BenchClient
    url: str


@contextlib.asynccontextmanager
async def running_service(
    ctx: BenchContext, run: str, **settings: object
) -> AsyncIterator[ServiceRun]:
    """A fresh database and a service process on it."""
    url = await asyncio.to_thread(ctx.lane.fresh, run)
    config = ServiceConfig(database_url=url, **settings)  # type: ignore[arg-type]
    profile = None
    if ctx.profile_mode is not None and ctx.profile_dir is not None:
        profile = (ctx.profile_mode, ctx.profile_dir / run)
    service = ServiceProcess(config, ctx.workdir, profile=profile)
    await service.start()
    client = BenchClient(service.target)
    try:
        yield ServiceRun(service, client, url)
    finally:
        await client.close()
        await service.stop()
        if profile is not None:
            ctx.log(f"profile of the {run} run: {profile[1]}.*")


# -- helpers ------------------------------------------------------------------------------


def chunks(items: Sequence[event_pb2.Event], size: int) -> list[list[event_pb2.Event]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


async def publish_all(
    client: BenchClient,
    batches: Sequence[Sequence[event_pb2.Event]],
    publishers: int,
    ack_seconds: list[float] | None = None,
) -> int:
    """Publish every batch with ``publishers`` calls in flight; returns deliveries queued."""
    queue: asyncio.Queue[Sequence[event_pb2.Event]] = asyncio.Queue()
    for batch in batches:
        queue.put_nowait(batch)
    queued = 0

    async def publisher() -> None:
        nonlocal queued
        while True:
            try:
                batch = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            started = time.perf_counter()
            queued += await client.publish_batch(batch)
            if ack_seconds is not None:
                ack_seconds.append(time.perf_counter() - started)

    await asyncio.gather(*(publisher() for _ in range(publishers)))
    return queued


class DeliveryCounter:
    """Counts the store's deliveries by status from this process, off the event loop."""

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine

        from dembrane.webhooks.store.database import normalize_url

        self._engine = create_engine(normalize_url(url))

    def count(self, status: str) -> int:
        from sqlalchemy import text

        with self._engine.connect() as connection:
            value = connection.execute(
                text("SELECT count(*) FROM deliveries WHERE status = :status"),
                {"status": status},
            ).scalar_one()
        return int(value)

    async def wait_for(
        self, status: str, count: int, *, deadline: float, interval: float = 0.02
    ) -> tuple[float | None, int]:
        """Poll until ``count`` rows have ``status``; returns (monotonic time or None, seen)."""
        seen = 0
        while True:
            seen = await asyncio.to_thread(self.count, status)
            now = time.monotonic()
            if seen >= count:
                return now, seen
            if now >= deadline:
                return None, seen
            await asyncio.sleep(interval)

    def close(self) -> None:
        self._engine.dispose()


@dataclass
class DeliveryRun:
    """How long it took from the first publish to every delivery recorded as succeeded."""

    deliveries: int
    queued: int
    published_seconds: float
    received_seconds: float | None
    recorded_seconds: float | None
    received: int
    recorded: int
    ack_seconds: list[float]
    #: CPU seconds the service process used from the first publish to the last record.
    service_cpu: float | None = None
    #: The share of the machine's CPU time its host took meanwhile (see ``bench/steal.py``).
    stolen: float | None = None

    @property
    def complete(self) -> bool:
        return self.recorded_seconds is not None

    @property
    def rate(self) -> float | None:
        """Deliveries per second, end to end; a partial rate when the deadline passed."""
        if self.recorded_seconds is not None and self.recorded_seconds > 0:
            return self.deliveries / self.recorded_seconds
        return None

    def cpu_note(self, label: str) -> str:
        if self.service_cpu is None or not self.deliveries:
            return ""
        per = self.service_cpu / self.deliveries * 1000
        stolen = describe_stolen(self.stolen)
        return (
            f"{label}: the service used {per:.2f} ms of CPU per delivery "
            "(publish included, its sender processes too)" + (f"; {stolen}" if stolen else "")
        )

    def describe_shortfall(self) -> str:
        return (
            f"only {self.received:,} of {self.deliveries:,} deliveries arrived and "
            f"{self.recorded:,} were recorded before the deadline"
        )


async def deliver_and_wait(
    ctx: BenchContext,
    run: ServiceRun,
    batches: Sequence[Sequence[event_pb2.Event]],
    expected: int,
    *,
    already_succeeded: int = 0,
    publishers: int | None = None,
) -> DeliveryRun:
    """Publish ``batches`` and time them until ``expected`` deliveries succeeded."""
    await ctx.receiver.reset()
    counter = DeliveryCounter(run.url)
    acks: list[float] = []
    cpu_before = run.service.cpu_seconds()
    clock_before = MachineClock.read()
    try:
        started = time.monotonic()
        deadline = started + ctx.scale.deadline
        publishing = asyncio.create_task(
            publish_all(run.client, batches, publishers or ctx.scale.publishers, acks)
        )
        published_at: float | None = None

        def note_published(_task: asyncio.Task[int]) -> None:
            nonlocal published_at
            published_at = time.monotonic()

        publishing.add_done_callback(note_published)
        received_at, received = await ctx.receiver.wait_delivered(expected, deadline=deadline)
        queued = await publishing
        recorded_at: float | None = None
        recorded = 0
        if received_at is not None:
            # Only now is the store polled, so the polling never competes with the run.
            recorded_at, recorded = await counter.wait_for(
                SUCCEEDED, already_succeeded + expected, deadline=deadline + 10
            )
            recorded -= already_succeeded
        cpu_after = run.service.cpu_seconds()
        clock_after = MachineClock.read()
        return DeliveryRun(
            service_cpu=(
                None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
            ),
            stolen=stolen_share(clock_before, clock_after),
            deliveries=expected,
            queued=queued,
            published_seconds=(published_at or time.monotonic()) - started,
            received_seconds=None if received_at is None else received_at - started,
            recorded_seconds=None if recorded_at is None else recorded_at - started,
            received=received,
            recorded=recorded,
            ack_seconds=acks,
        )
    finally:
        counter.close()


async def warm_up(ctx: BenchContext, client: BenchClient, project_id: str, per_event: int) -> int:
    """Publish one batch and wait for it, so connections and caches are warm; returns the
    number of succeeded deliveries it left in the store."""
    events = [make_event(f"warm-{project_id}-{i}", project_id) for i in range(20)]
    await ctx.receiver.reset()
    await client.publish_batch(events)
    expected = len(events) * per_event
    done, _ = await ctx.receiver.wait_delivered(expected, deadline=time.monotonic() + 30)
    if done is None:
        raise RuntimeError("The warm-up deliveries did not arrive within 30 seconds.")
    return expected


@contextlib.contextmanager
def steady_collector() -> Iterator[None]:
    """Keep this process's garbage collector from pausing a timed phase for long.

    The load generator holds every event it is about to publish and every figure it took,
    and a full collection walks them all: 40-80 ms with this process's heap, during which no
    call is started or stamped, and which would land in the service's figures. Collecting
    first and setting what exists aside (``gc.freeze``) leaves later collections only the
    phase's own new objects; the set-aside objects are handed back afterwards.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def paced(rate: float, count: int, call: Callable[[int], Coroutine[Any, Any, None]]) -> float:
    """Start ``call(i)`` at ``rate`` per second (open loop: never waits for answers);
    returns the achieved start rate."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    with steady_collector():
        start = loop.time()
        for index in range(count):
            delay = start + index / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(call(index)))
        spent = loop.time() - start
        await asyncio.gather(*tasks)
    return count / spent if spent > 0 else float("nan")


def _session(limit: int) -> aiohttp.ClientSession:
    """An HTTP client set up as the service's sender sets up its own."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit),
        timeout=aiohttp.ClientTimeout(total=30),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding",),
    )


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


# -- 1. ceiling -----------------------------------------------------------------------------


async def bare_rate(ctx: BenchContext) -> tuple[float, float, int]:
    """A bare aiohttp loop POSTing the same signed body to the same receiver.

    Returns requests per second, CPU seconds per request, and how many the receiver counted.
    """
    body, headers = signed_request("evt-ceiling", "p-throughput")
    url = ctx.receiver.url(0)
    total = ctx.scale.ceiling_requests
    concurrency = ctx.concurrency

    async with _session(concurrency) as session:

        async def post(index: int) -> None:
            request_headers = dict(headers)
            request_headers["X-Dembrane-Delivery"] = f"dlv_ceiling_{index}"
            async with session.post(url, data=body, headers=request_headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"The receiver answered {response.status}.")

        async def loop(numbers: Sequence[int]) -> float:
            cursor = iter(numbers)

            async def worker() -> None:
                for index in cursor:
                    await post(index)

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return time.perf_counter() - started

        await ctx.receiver.reset()
        await loop(range(-min(2_000, total), 0))  # warm-up: connections, caches
        await ctx.receiver.reset()
        cpu_before = _own_cpu_seconds()
        seconds = await loop(range(total))
        cpu = _own_cpu_seconds() - cpu_before
    stats = await ctx.receiver.stats()
    return total / seconds, cpu / total, int(stats["delivered"])


async def ceiling(ctx: BenchContext) -> ScenarioResult:
    """C: the bare loop's rate (measured again after each round of scenario 2)."""
    result = ScenarioResult("ceiling")
    total = ctx.scale.ceiling_requests
    rate, cpu, delivered = await bare_rate(ctx)
    result.notes.append(f"ceiling: the bare loop used {cpu * 1000:.2f} ms of CPU per request")
    if delivered < total:
        result.notes.append(f"the receiver counted {delivered} of {total} requests")
    ctx.baselines["ceiling"] = rate
    ctx.ceiling = Figure(
        "1 ceiling",
        f"bare aiohttp POSTs, concurrency {ctx.concurrency}",
        "req/s",
        rate,
        baseline_name="the reference",
    )
    result.figures.append(ctx.ceiling)
    return result


async def bare_post_latency(ctx: BenchContext, rate: float, seconds: float) -> list[float]:
    """Round trips of bare POSTs to the receiver at ``rate`` per second: the network floor."""
    body, headers = signed_request("evt-latency-floor", "p-latency")
    url = ctx.receiver.url(0)
    samples: list[float] = []
    async with _session(ctx.concurrency) as session:

        async def post(index: int) -> None:
            request_headers = dict(headers)
            request_headers["X-Dembrane-Delivery"] = f"dlv_floor_{index}"
            started = time.perf_counter()
            async with session.post(url, data=body, headers=request_headers) as response:
                await response.read()
            samples.append(time.perf_counter() - started)

        await paced(rate, int(rate * ctx.scale.latency_warmup_seconds), post)  # warm-up
        samples.clear()
        await paced(rate, int(rate * seconds), post)
    return samples


# -- 2. throughput --------------------------------------------------------------------------


def round_name(base: str, number: int) -> str:
    """The name of a run in round ``number`` (its database's and its profile's name)."""
    return base if number == 1 else f"{base}-{number}"


def median_round(keys: Sequence[float | None]) -> int:
    """The index of the median round by ``keys`` (unmeasured ones count lowest); for an even
    count, the lower of the two middle ones."""
    order = sorted(range(len(keys)), key=lambda i: (keys[i] is not None, keys[i] or 0.0))
    return order[(len(order) - 1) // 2]


@dataclass
class ThroughputRound:
    """One throughput run and C around it: measured just before it and just after it."""

    delivered: DeliveryRun
    ceiling: float | None

    @property
    def ratio(self) -> float | None:
        rate = self.delivered.rate
        if rate is None or not self.ceiling:
            return None
        return rate / self.ceiling


async def _throughput_run(ctx: BenchContext, name: str) -> DeliveryRun:
    scale = ctx.scale
    project = "p-throughput"
    # One webhook may use the whole concurrency, as the ceiling's loop does.
    async with running_service(
        ctx,
        name,
        max_concurrency=ctx.concurrency,
        per_webhook_concurrency=ctx.concurrency,
    ) as run:
        await run.client.seed_project(project)
        await run.client.create_webhooks(project, [ctx.receiver.url(0)])
        warm = await warm_up(ctx, run.client, project, per_event=1)
        events = [make_event(f"thr-{i}", project) for i in range(scale.throughput_events)]
        ctx.log(f"{name}: publishing {len(events):,} events in batches of {scale.batch_size}")
        return await deliver_and_wait(
            ctx, run, chunks(events, scale.batch_size), len(events), already_succeeded=warm
        )


async def throughput(ctx: BenchContext) -> ScenarioResult:
    """PublishEvents in batches to one webhook until every delivery is recorded.

    It runs ``scale.rounds`` times, and C is measured again after each round: a round is set
    against the mean of the C measured just before and just after it, so the machine's drift
    in speed over the minutes of a run falls on both sides of the ratio. The table shows the
    round with the median ratio; the notes give every round.
    """
    result = ScenarioResult("throughput")
    scale = ctx.scale
    ceilings: list[float] = []
    if ctx.ceiling is not None and ctx.ceiling.value is not None:
        ceilings.append(ctx.ceiling.value)
    rounds: list[ThroughputRound] = []
    for number in range(1, scale.rounds + 1):
        delivered = await _throughput_run(ctx, round_name("throughput", number))
        around: float | None = None
        if ceilings:
            ctx.log("ceiling: measuring C again")
            again, _cpu, _delivered = await bare_rate(ctx)
            around = (ceilings[-1] + again) / 2
            ceilings.append(again)
        rounds.append(ThroughputRound(delivered, around))

    chosen = rounds[median_round([r.ratio if ceilings else r.delivered.rate for r in rounds])]
    delivered = chosen.delivered
    rate = delivered.rate
    if ctx.ceiling is not None and chosen.ceiling is not None:
        ctx.ceiling.value = chosen.ceiling
        ctx.baselines["ceiling"] = chosen.ceiling
        if len(rounds) == 1:
            result.notes.append(
                f"ceiling: C was {ceilings[0]:,.0f} req/s before scenario 2 and "
                f"{ceilings[1]:,.0f} after it; the figures use the mean, {chosen.ceiling:,.0f}"
            )
        else:
            measured = ", ".join(f"{c:,.0f}" for c in ceilings)
            result.notes.append(
                f"ceiling: C was {measured} req/s, measured before the first round of scenario "
                "2 and after each; a round is set against the mean of the two around it, and "
                f"the figures use the median round's, {chosen.ceiling:,.0f}"
            )
    if len(rounds) > 1:
        described = "; ".join(
            f"{fmt_number(r.delivered.rate, '/s')}"
            + (f" ({fmt_ratio(r.ratio)})" if r.ratio is not None else "")
            for r in rounds
        )
        result.notes.append(
            f"throughput: {len(rounds)} rounds: {described}; the table shows the median round"
        )
    for number, done in enumerate(rounds, start=1):
        label = "throughput" if len(rounds) == 1 else f"throughput round {number}"
        if done.delivered.rate is None:
            result.notes.append(f"{label}: {done.delivered.describe_shortfall()}")
        if note := done.delivered.cpu_note(label):
            result.notes.append(note)
    result.figures.append(
        Figure(
            "2 throughput",
            "deliveries/s, 1 webhook, publish to recorded",
            "/s",
            rate,
            baseline=ctx.baselines.get("ceiling"),
            baseline_name="C",
            goal=Goal(GoalKind.RATIO_AT_LEAST, 0.5),
        )
    )
    published = delivered.published_seconds
    result.figures.append(
        Figure(
            "2 throughput",
            f"publish rate, batches of {scale.batch_size}",
            "ev/s",
            scale.throughput_events / published if published > 0 else None,
            baseline=rate,
            baseline_name="delivery rate",
        )
    )
    return result


# -- 3. latency -----------------------------------------------------------------------------


async def latency(ctx: BenchContext) -> ScenarioResult:
    """PublishEvent at a steady 500 events/s: acknowledgement and publish-to-receiver times."""
    result = ScenarioResult("latency")
    scale = ctx.scale
    rate = scale.latency_rate
    project = "p-latency"
    ctx.log(f"latency: bare POST floor at {rate:g}/s")
    floor = await bare_post_latency(ctx, rate, scale.baseline_seconds)

    acks: list[float] = []
    sent_at: dict[str, float] = {}
    acked_at: list[float] = []
    transport: list[float] = []
    async with running_service(
        ctx,
        "latency",
        max_concurrency=ctx.concurrency,
        per_webhook_concurrency=ctx.concurrency,
    ) as run:
        client = run.client
        await client.seed_project(project)
        await client.create_webhooks(project, [ctx.receiver.url(0)])
        await warm_up(ctx, client, project, per_event=1)
        count = int(rate * scale.latency_seconds)
        events = [make_event(f"lat-{i}", project) for i in range(count)]
        warm_count = int(rate * scale.latency_warmup_seconds)
        warm_events = [make_event(f"lat-warm-{i}", project) for i in range(warm_count)]

        ctx.log(f"latency: gRPC health floor at {rate:g}/s")
        if ctx.loadgen is not None:
            floor_run = await loadgen.run(
                ctx.loadgen,
                run.service.target,
                loadgen.HEALTH_CHECK,
                [b""] * int(rate * scale.baseline_seconds),
                rate,
            )
            transport = [call.seconds for call in floor_run.calls]
        else:

            async def health(_index: int) -> None:
                started = time.perf_counter()
                await client.health_check()
                transport.append(time.perf_counter() - started)

            await paced(rate, int(rate * scale.baseline_seconds), health)

        async def publish(event: event_pb2.Event, record: bool) -> None:
            wall = time.time()
            started = time.perf_counter()
            await client.publish_one(event)
            if record:
                done = time.perf_counter()
                acks.append(done - started)
                acked_at.append(wall + done - started)
                sent_at[event.id] = wall

        async def publish_all(batch: list[event_pb2.Event], record: bool) -> float:
            """Publish ``batch`` one call per event at ``rate``; returns the offered rate."""
            if ctx.loadgen is None:
                return await paced(rate, len(batch), lambda i: publish(batch[i], record))
            requests = [
                event_service_pb2.PublishEventRequest(event=event).SerializeToString()
                for event in batch
            ]
            published = await loadgen.run(
                ctx.loadgen,
                run.service.target,
                loadgen.PUBLISH_EVENT,
                requests,
                rate,
                authorization=client.publish_md[0][1],
            )
            if record:
                for event, call in zip(batch, published.calls, strict=True):
                    acks.append(call.seconds)
                    acked_at.append(call.sent + call.seconds)
                    sent_at[event.id] = call.sent
            return published.offered

        ctx.log(f"latency: {warm_count} events of warm-up, then {count:,} at {rate:g}/s")
        await publish_all(warm_events, False)
        await ctx.receiver.wait_delivered(len(warm_events), deadline=time.monotonic() + 60)
        await ctx.receiver.reset()
        first_sent = time.time()
        clock_before = MachineClock.read()
        offered = await publish_all(events, True)
        clock_after = MachineClock.read()
        done_at, seen = await ctx.receiver.wait_delivered(
            count, deadline=time.monotonic() + scale.deadline
        )
        arrivals = await ctx.receiver.arrivals()
    result.notes.append(
        "latency: the calls and the health floor were sent by "
        + (
            "the Go load generator (bench/loadgen)"
            if ctx.loadgen is not None
            else "the benchmark's Python client (no Go load generator was built)"
        )
    )
    if done_at is None:
        result.notes.append(f"latency: only {seen:,} of {count:,} deliveries arrived in time")
    if stolen := describe_stolen(stolen_share(clock_before, clock_after)):
        result.notes.append(f"latency: while the events were published, {stolen}")
    if offered < 0.95 * rate:
        result.notes.append(
            f"latency: the load generator offered {offered:.0f} events/s, not {rate:g}"
        )
    # The first call's own sending time: the Go program starts and connects before it.
    first_sent = min(sent_at.values(), default=first_sent)
    acked_rate = len(acked_at) / (max(acked_at) - first_sent) if acked_at else None
    to_receiver = [arrivals[i] - sent_at[i] for i in sent_at if i in arrivals]

    def add(
        name: str, value: float | None, base: float | None, base_name: str, goal: float | None
    ) -> None:
        result.figures.append(
            Figure(
                "3 latency",
                name,
                "ms",
                value,
                baseline=base,
                baseline_name=base_name,
                goal=None if goal is None else Goal(GoalKind.VALUE_BELOW, goal),
            )
        )

    result.figures.append(
        Figure(
            "3 latency",
            "publish calls acknowledged per second",
            "/s",
            acked_rate,
            baseline=offered,
            baseline_name="offered",
        )
    )
    add(
        "publish ack p50",
        _ms(percentile(acks, 50)),
        _ms(percentile(transport, 50)),
        "gRPC health p50",
        None,
    )
    add(
        "publish ack p99",
        _ms(percentile(acks, 99)),
        _ms(percentile(transport, 99)),
        "gRPC health p99",
        10.0,
    )
    add(
        "publish to receiver p50",
        _ms(percentile(to_receiver, 50)),
        _ms(percentile(floor, 50)),
        "bare POST p50",
        20.0,
    )
    add(
        "publish to receiver p99",
        _ms(percentile(to_receiver, 99)),
        _ms(percentile(floor, 99)),
        "bare POST p99",
        100.0,
    )
    return result


# -- 4. fan-out -----------------------------------------------------------------------------


async def fanout(ctx: BenchContext) -> ScenarioResult:
    """One event to 100 webhooks against 100 events to one webhook, same delivery count."""
    result = ScenarioResult("fanout")
    scale = ctx.scale
    width = scale.fanout_webhooks
    calls = scale.fanout_calls
    deliveries = calls * width
    runs: dict[str, DeliveryRun] = {}
    for shape in ("narrow", "wide"):
        project = f"p-{shape}"
        hooks = 1 if shape == "narrow" else width
        async with running_service(
            ctx,
            f"fanout-{shape}",
            max_concurrency=ctx.concurrency,
            per_webhook_concurrency=ctx.concurrency,
        ) as run:
            await run.client.seed_project(project)
            await run.client.create_webhooks(project, [ctx.receiver.url(i) for i in range(hooks)])
            warm = await warm_up(ctx, run.client, project, per_event=hooks)
            if shape == "narrow":
                # 100 events to 1 webhook per call.
                events = [make_event(f"fan-n-{i}", project) for i in range(deliveries)]
                batches = chunks(events, width)
            else:
                # 1 event to 100 webhooks per call.
                batches = [[make_event(f"fan-w-{i}", project)] for i in range(calls)]
            ctx.log(f"fan-out: {shape}, {len(batches)} calls, {deliveries:,} deliveries")
            runs[shape] = await deliver_and_wait(
                ctx, run, batches, deliveries, already_succeeded=warm
            )
    narrow, wide = runs["narrow"], runs["wide"]
    for shape, done in runs.items():
        if not done.complete:
            result.notes.append(f"fan-out ({shape}): {done.describe_shortfall()}")
        if note := done.cpu_note(f"fan-out ({shape})"):
            result.notes.append(note)
    result.figures.append(
        Figure(
            "4 fan-out",
            f"deliveries/s, 1 event to {width} webhooks",
            "/s",
            wide.rate,
            baseline=narrow.rate,
            baseline_name=f"{width} events to 1 webhook",
            goal=Goal(GoalKind.RATIO_AT_LEAST, 0.8),
        )
    )
    result.figures.append(
        Figure(
            "4 fan-out",
            f"publish ack p50, 1 event to {width} webhooks",
            "ms",
            _ms(percentile(wide.ack_seconds, 50)),
            baseline=_ms(percentile(narrow.ack_seconds, 50)),
            baseline_name=f"{width} events to 1 webhook",
        )
    )
    return result


# -- 5. isolation ---------------------------------------------------------------------------


@dataclass
class IsolationRound:
    """One round of scenario 5: the hanging run and its control, and scenario 2 run just
    before and just after them."""

    hung: DeliveryRun
    before: DeliveryRun
    after: DeliveryRun
    control: DeliveryRun | None
    hanging_requests: int

    @property
    def alone(self) -> float | None:
        """Scenario 2's rate around the round: the mean of the runs before and after it."""
        if self.before.rate is None or self.after.rate is None:
            return None
        return (self.before.rate + self.after.rate) / 2

    @property
    def ratio(self) -> float | None:
        alone = self.alone
        if self.hung.rate is None or not alone:
            return None
        return self.hung.rate / alone


async def _isolation_run(ctx: BenchContext, hanging: set[int], run_name: str) -> DeliveryRun:
    """One event per project round robin over single-webhook projects, some of them hanging;
    timed until every healthy delivery is recorded."""
    scale = ctx.scale
    hooks = scale.isolation_webhooks
    projects = [f"p-iso-{i:03d}" for i in range(hooks)]
    async with running_service(
        ctx,
        run_name,
        max_concurrency=ctx.concurrency,
        per_webhook_concurrency=DEFAULT_PER_WEBHOOK,
        request_timeout=scale.isolation_timeout,
        # Failed requests come back at once: the hanging receivers never get a rest.
        retry_schedule="1,1,1,1,1",
    ) as run:
        for index, project in enumerate(projects):
            await run.client.seed_project(project)
            await run.client.create_webhooks(
                project, [ctx.receiver.url(index, hanging=index in hanging)]
            )
        healthy_projects = [p for i, p in enumerate(projects) if i not in hanging]
        warm_events = [make_event(f"iso-warm-{p}", p) for p in healthy_projects]
        await ctx.receiver.reset()
        await run.client.publish_batch(warm_events)
        await ctx.receiver.wait_delivered(len(warm_events), deadline=time.monotonic() + 30)
        # The healthy webhooks get as many events as scenario 2's one webhook, and the
        # hanging ones their round-robin share on top: the healthy rate is set against the
        # same healthy work, and all the hanging ones cost (their events published, stored,
        # claimed and sent) is extra.
        events: list[event_pb2.Event] = []
        healthy = 0
        while healthy < scale.isolation_events:
            index = len(events)
            events.append(make_event(f"iso-{index}", projects[index % hooks]))
            healthy += (index % hooks) not in hanging
        hung = (
            f"{len(hanging)} of them hanging for {scale.isolation_timeout:g} s"
            if hanging
            else "none hanging (the control)"
        )
        ctx.log(f"isolation: {len(events):,} events over {hooks} webhooks, {hung}")
        return await deliver_and_wait(
            ctx,
            run,
            chunks(events, scale.batch_size),
            healthy,
            already_succeeded=len(warm_events),
        )


async def isolation(ctx: BenchContext) -> ScenarioResult:
    """A tenth of the webhooks hang until the request timeout; how fast do the rest go?

    Scenario 2 runs again before the first round and after each, and each round (the hanging
    set-up, then a control with the same webhooks, none hanging) is set against the mean of
    the two runs of scenario 2 around it, as throughput is against C: the machine's speed
    drifts by a quarter within minutes, and a baseline from one side only takes all of that
    drift into the ratio. The control shows how much of any difference is the hanging and
    how much the spread over many webhooks. The table shows the round with the median ratio;
    the notes give every round.
    """
    result = ScenarioResult("isolation")
    scale = ctx.scale
    hooks = scale.isolation_webhooks
    step = max(1, hooks // max(1, scale.isolation_hanging))
    hanging = set(range(0, hooks, step))
    rounds: list[IsolationRound] = []
    before = await _throughput_run(ctx, round_name("isolation-scenario2", 0))
    for number in range(1, scale.isolation_rounds + 1):
        hung = await _isolation_run(ctx, hanging, round_name("isolation", number))
        stats = await ctx.receiver.stats()
        control = (
            await _isolation_run(ctx, set(), round_name("isolation-control", number))
            if scale.isolation_control
            else None
        )
        after = await _throughput_run(ctx, round_name("isolation-scenario2", number))
        rounds.append(IsolationRound(hung, before, after, control, int(stats["hanging"])))
        before = after
    chosen = rounds[median_round([r.ratio for r in rounds])]

    alone_runs = [rounds[0].before] + [r.after for r in rounds]
    result.notes.append(
        "isolation: scenario 2 ran at "
        + ", ".join(fmt_number(run.rate, "/s") for run in alone_runs)
        + ", before the first round and after each; a round is set against the mean of the "
        "two around it"
    )
    if len(rounds) > 1:
        described = "; ".join(
            f"{fmt_number(r.hung.rate, '/s')} against {fmt_number(r.alone, '/s')}"
            + ("" if r.ratio is None else f" ({fmt_ratio(r.ratio)})")
            + ("" if r.control is None else f", control {fmt_number(r.control.rate, '/s')}")
            for r in rounds
        )
        result.notes.append(
            f"isolation: {len(rounds)} rounds, healthy deliveries/s against scenario 2 around "
            f"them: {described}; the table shows the round with the median ratio"
        )
    labelled = [("isolation scenario 2 before round 1", rounds[0].before)]
    for number, r in enumerate(rounds, start=1):
        suffix = "" if len(rounds) == 1 else f" round {number}"
        labelled.append((f"isolation{suffix}", r.hung))
        if r.control is not None:
            labelled.append((f"isolation control{suffix}", r.control))
        labelled.append((f"isolation scenario 2 after round {number}", r.after))
    for label, done in labelled:
        if not done.complete:
            result.notes.append(f"{label}: {done.describe_shortfall()}")
        if note := done.cpu_note(label):
            result.notes.append(note)
    result.notes.append(
        f"isolation: the hanging webhooks received {chosen.hanging_requests:,} requests during "
        + ("the run" if len(rounds) == 1 else "the median round")
    )
    label = f"healthy deliveries/s, {len(hanging)} of {hooks} webhooks hanging"
    result.figures.append(
        Figure(
            "5 isolation",
            label,
            "/s",
            chosen.hung.rate,
            baseline=chosen.alone,
            baseline_name="scenario 2, mean of the runs before and after",
            goal=Goal(GoalKind.RATIO_AT_LEAST, 0.9),
        )
    )
    if chosen.control is not None:
        result.figures.append(
            Figure(
                "5 isolation",
                label,
                "/s",
                chosen.hung.rate,
                baseline=chosen.control.rate,
                baseline_name=f"same {hooks} webhooks, none hanging",
            )
        )
    return result
