"""The sender pool: signed requests sent from worker subprocesses to a real receiver on loopback.

Every test runs real worker processes (``python -m dembrane.webhooks.delivery.worker``) and a
real ``Receiver`` on 127.0.0.1 that verifies every signature; what a worker reports is
compared with what the in-process ``Sender`` reports for the same answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from dembrane.webhooks import metrics
from dembrane.webhooks.auth import SCOPE_PUBLISH
from dembrane.webhooks.delivery.pool import SPILL_AT, SenderPool, default_processes
from dembrane.webhooks.delivery.sender import OutboundRequest, Sender
from dembrane.webhooks.delivery.targets import TargetPolicy
from dembrane.webhooks.domain.payload import ProjectInfo, render_body, test_event
from dembrane.webhooks.service import Service
from dembrane.webhooks.v1 import (
    event_pb2,
    webhook_pb2,
)
from dembrane.webhooks.v1 import event_service_pb2 as epb
from dembrane.webhooks.v1 import webhook_service_pb2 as pb

# mypy run on this file alone does not see the tests folder; the ignore is unused when it does.
from harness import (
    JWT_SECRET,
    Stubs,
    Tokens,
    make_settings,
    seed_world,
)
from receiver import (
    Receiver,
    Reply,
    unused_port,
)

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PROJECT = ProjectInfo(id="p1", name="Café Zuid", language="nl")
LOOPBACK = ("127.0.0.0/8",)
WORKER_MODULE = b"dembrane.webhooks.delivery.worker"
POOL_MODULE = "dembrane.webhooks.delivery.pool"
#: How long a test waits for a replacement worker; a restart pauses up to 1 s, then boots.
RESTART_DEADLINE_SECONDS = 15.0


def _request(url: str, *secrets: str, delivery_id: str = "dlv_1") -> OutboundRequest:
    event = test_event(PROJECT, datetime.now(UTC))
    return OutboundRequest(
        url=url,
        body=render_body(event, PROJECT, "https://dashboard.example.test"),
        event_type=event.type,
        event_id=event.id,
        delivery_id=delivery_id,
        secrets=secrets or (SECRET,),
    )


def _pool(
    processes: int = 2, *, allowed_targets: tuple[str, ...] = LOOPBACK, nice: int = 0
) -> SenderPool:
    return SenderPool(
        processes,
        connect_timeout=2.0,
        request_timeout=5.0,
        allowed_targets=allowed_targets,
        max_connections=32,
        nice=nice,
    )


def _thread_niceness(pid: int) -> set[int]:
    """The nice values of every thread of process ``pid`` (Linux keeps one per thread)."""
    values = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        # After the command name: state is field 0, nice field 16.
        values.add(int(stat.rsplit(")", 1)[1].split()[16]))
    return values


def _worker_children(parent: int | None = None) -> list[int]:
    """The pids of the children of ``parent`` (this process by default) that run a delivery
    worker (zombies included)."""
    parent = os.getpid() if parent is None else parent
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        # The fields after the command name in parentheses: state, then the parent's pid.
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and (
            WORKER_MODULE in cmdline or not cmdline
        ):
            found.append(int(entry))
    return found


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def _eventually(check: Callable[[], Awaitable[bool]], within: float) -> None:
    """Poll ``check`` until it holds; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"the condition did not hold within {within:g} seconds")
        await asyncio.sleep(0.05)


@pytest.fixture
async def pool() -> AsyncIterator[SenderPool]:
    async with _pool() as running:
        yield running


@pytest.fixture
async def sender() -> AsyncIterator[Sender]:
    policy = TargetPolicy([ipaddress.ip_network(LOOPBACK[0])])
    async with Sender(connect_timeout=2.0, request_timeout=5.0, policy=policy) as running:
        yield running


# -- sending -------------------------------------------------------------------------------


async def test_a_pool_delivers_requests_the_receiver_verifies(pool: SenderPool) -> None:
    """A request sent through a worker arrives with the exact body and all signatures valid."""
    assert len(pool.pids) == 2
    assert os.getpid() not in pool.pids
    async with Receiver(SECRET) as receiver:
        request = _request(receiver.url)
        outcome = await pool.send(request)
        [received] = receiver.requests
    assert outcome.success
    assert outcome.status_code == 200
    assert outcome.error == ""
    assert outcome.response_body == "ok"
    assert outcome.retry_after is None
    assert outcome.latency > 0
    assert abs((datetime.now(UTC) - outcome.attempted_at).total_seconds()) < 10
    assert received.body == request.body
    assert received.verified
    assert received.headers["webhook-id"] == request.event_id
    assert received.headers["X-Dembrane-Delivery"] == "dlv_1"
    assert received.headers["X-Dembrane-Event"] == "webhook.test"


async def test_workers_run_at_the_priority_they_are_given_in_every_thread() -> None:
    """A pool told ``nice=7`` runs its workers, every thread of them, 7 below this process's
    priority, and still delivers; a pool told 0 leaves them at this process's."""
    here = os.getpriority(os.PRIO_PROCESS, 0)
    async with Receiver(SECRET) as receiver:
        for nice, expected in ((7, min(19, here + 7)), (0, here)):
            async with _pool(nice=nice) as pool:
                # Requests first, so that threads the workers start for them are counted.
                outcomes = await asyncio.gather(
                    *(
                        pool.send(_request(receiver.url, delivery_id=f"dlv_n{nice}_{i}"))
                        for i in range(40)
                    )
                )
                assert all(outcome.success for outcome in outcomes)
                assert len(pool.pids) == 2
                for pid in pool.pids:
                    assert _thread_niceness(pid) == {expected}
    assert os.getpriority(os.PRIO_PROCESS, 0) == here


async def test_many_concurrent_sends_each_arrive_once(pool: SenderPool) -> None:
    """Fifty requests sent at once all succeed, and each delivery id arrives exactly once."""
    async with Receiver(SECRET) as receiver:
        requests = [_request(receiver.url, delivery_id=f"dlv_{i}") for i in range(50)]
        outcomes = await asyncio.gather(*(pool.send(r) for r in requests))
        received = await receiver.wait_for(50)
        await asyncio.sleep(0.05)
        assert len(receiver.requests) == 50
    assert all(o.success and o.response_body == "ok" for o in outcomes)
    ids = [r.headers["X-Dembrane-Delivery"] for r in received]
    assert sorted(ids) == sorted(r.delivery_id for r in requests)
    assert all(r.verified for r in received)
    bodies = {r.delivery_id: r.body for r in requests}
    assert all(r.body == bodies[r.headers["X-Dembrane-Delivery"]] for r in received)


async def test_a_worker_keeps_every_request_in_flight_at_once_wave_after_wave() -> None:
    """Twenty slow requests all reach the receiver together, and so do twenty more after."""
    async with _pool(1) as pool, Receiver(SECRET, default=Reply(delay=2.0)) as receiver:
        for wave in range(2):
            requests = [_request(receiver.url, delivery_id=f"dlv_{wave}_{i}") for i in range(20)]
            sends = asyncio.gather(*(pool.send(r) for r in requests))
            # Each is held for 2 s: one at a time, only the first would be there by now.
            arrived = await receiver.wait_for(20 * (wave + 1), within=1.5)
            outcomes = await sends
            assert all(o.success for o in outcomes)
            assert {r.headers["X-Dembrane-Delivery"] for r in arrived[wave * 20 :]} == {
                r.delivery_id for r in requests
            }


async def test_the_first_worker_fills_before_the_next_gets_work() -> None:
    """Up to SPILL_AT requests at once all go to the first worker; only the excess spills."""
    async with _pool(2) as pool, Receiver(SECRET, default=Reply(delay=1.0)) as receiver:
        requests = [_request(receiver.url, delivery_id=f"dlv_{i}") for i in range(SPILL_AT + 3)]
        sends = asyncio.gather(*(pool.send(r) for r in requests))
        await receiver.wait_for(len(requests), within=0.9)
        assert pool.in_flight == [SPILL_AT, 3]
        assert all(o.success for o in await sends)
        assert pool.in_flight == [0, 0]


async def test_the_timestamp_is_signed_as_given(pool: SenderPool) -> None:
    """An explicit timestamp reaches the worker and is the one the request is signed with."""
    timestamp = int(time.time()) - 30
    async with Receiver(SECRET) as receiver:
        outcome = await pool.send(_request(receiver.url), timestamp=timestamp)
        [received] = receiver.requests
    assert outcome.success
    assert received.headers["webhook-timestamp"] == str(timestamp)
    assert received.verified


async def test_a_503_with_retry_after_is_reported(pool: SenderPool) -> None:
    """A 503 answer comes back with its status, body, the parsed Retry-After and an error."""
    reply = Reply(503, body=b"busy", headers={"Retry-After": "120"})
    async with Receiver(SECRET, replies=[reply]) as receiver:
        outcome = await pool.send(_request(receiver.url))
    assert not outcome.success
    assert outcome.status_code == 503
    assert outcome.retry_after == 120.0
    assert outcome.response_body == "busy"
    assert "503" in outcome.error


@pytest.mark.parametrize(
    "reply",
    [
        Reply(503, body=b"busy", headers={"Retry-After": "120"}),
        Reply(429, headers={"Retry-After": "7"}),
        Reply(429, headers={"Retry-After": "soon"}),
        Reply(500, body=b"boom", headers={"Retry-After": "30"}),
        Reply(302, headers={"Location": "https://elsewhere.example/"}),
        Reply(410, body=b"gone"),
        Reply(204, body=b""),
    ],
    ids=["503-retry-after", "429-retry-after", "429-invalid", "500", "redirect", "410", "204"],
)
async def test_answers_come_back_as_from_the_in_process_sender(
    pool: SenderPool, sender: Sender, reply: Reply
) -> None:
    """Status, body, error and Retry-After from a worker equal the in-process sender's."""
    async with Receiver(SECRET, replies=[reply, reply]) as receiver:
        from_pool = await pool.send(_request(receiver.url))
        in_process = await sender.send(_request(receiver.url))
    assert from_pool.status_code == in_process.status_code == reply.status
    assert from_pool.response_body == in_process.response_body
    assert from_pool.error == in_process.error
    assert from_pool.retry_after == in_process.retry_after
    assert from_pool.success == in_process.success
    assert from_pool.permanent_gone == in_process.permanent_gone


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"], ids=["literal", "resolved"])
async def test_the_target_policy_applies_inside_the_worker(host: str) -> None:
    """A pool without allowed targets refuses loopback, with the in-process sender's words."""
    async with (
        Receiver(SECRET) as receiver,
        _pool(1, allowed_targets=()) as pool,
        Sender(connect_timeout=2.0, request_timeout=5.0, policy=TargetPolicy()) as sender,
    ):
        url = f"http://{host}:{receiver.port}/hook"
        from_pool = await pool.send(_request(url))
        in_process = await sender.send(_request(url))
        assert receiver.requests == []
    assert from_pool.status_code is None
    assert not from_pool.success
    assert ("loopback address" if host == "127.0.0.1" else "not resolve to a public") in (
        from_pool.error
    )
    assert "webhooks must target public addresses" in from_pool.error
    assert from_pool.error == in_process.error


async def test_connection_refused_is_a_failed_outcome(pool: SenderPool) -> None:
    """A refused connection comes back as a failed outcome without a status, not an exception."""
    port = unused_port()
    outcome = await pool.send(_request(f"http://127.0.0.1:{port}/hook"))
    assert outcome.status_code is None
    assert not outcome.success
    assert not outcome.lost
    assert outcome.error == f"Connection refused by 127.0.0.1:{port}."
    assert outcome.response_body == ""


# -- workers that die, and closing ---------------------------------------------------------


async def test_a_killed_worker_fails_its_attempt_and_is_replaced() -> None:
    """SIGKILL on a busy worker fails the in-flight attempt as lost (the service's doing, not
    the receiver's), and a replacement sends the next."""
    async with (
        Receiver(SECRET, replies=[Reply(200, delay=30)]) as receiver,
        _pool(1) as pool,
    ):
        [pid] = pool.pids
        in_flight = asyncio.create_task(pool.send(_request(receiver.url, delivery_id="dlv_1")))
        await receiver.wait_for(1)
        os.kill(pid, signal.SIGKILL)
        async with asyncio.timeout(10):
            lost = await in_flight
        assert lost.status_code is None
        assert not lost.success
        assert lost.lost
        assert "worker process stopped" in lost.error

        deadline = time.monotonic() + RESTART_DEADLINE_SECONDS
        while True:
            retried = await pool.send(_request(receiver.url, delivery_id="dlv_2"))
            if retried.success or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert retried.success
        assert not retried.lost
        assert retried.response_body == "ok"
        [replacement] = pool.pids
        assert replacement != pid
        assert _gone(pid)
        assert receiver.requests[-1].headers["X-Dembrane-Delivery"] == "dlv_2"
        assert receiver.requests[-1].verified


async def test_close_leaves_no_worker_process() -> None:
    """After close every worker process has exited and been reaped."""
    pool = _pool(2)
    await pool.start()
    async with Receiver(SECRET) as receiver:
        assert (await pool.send(_request(receiver.url))).success
    pids = pool.pids
    assert len(pids) == 2
    assert not any(_gone(pid) for pid in pids)
    assert set(pids) <= set(_worker_children())
    await pool.close()
    assert pool.pids == []
    assert all(_gone(pid) for pid in pids)
    assert not set(pids) & set(_worker_children())


async def test_close_fails_attempts_still_in_flight() -> None:
    """Closing while a request waits on its answer gives a failed attempt, not a hang."""
    async with Receiver(SECRET, default=Reply(200, delay=30)) as receiver:
        pool = _pool(1)
        await pool.start()
        pids = pool.pids
        in_flight = asyncio.create_task(pool.send(_request(receiver.url)))
        await receiver.wait_for(1)
        async with asyncio.timeout(10):
            await pool.close()
            outcome = await in_flight
    assert outcome.status_code is None
    assert "worker process stopped" in outcome.error
    assert all(_gone(pid) for pid in pids)


async def test_send_before_start_raises() -> None:
    """Sending on a pool that was never started raises instead of failing silently."""
    pool = _pool(1)
    with pytest.raises(RuntimeError, match="not started"):
        await pool.send(_request("http://127.0.0.1:9/"))
    assert pool.pids == []


async def test_send_after_close_raises() -> None:
    """Sending on a closed pool raises like sending on one never started."""
    async with _pool(1) as pool:
        pass
    with pytest.raises(RuntimeError, match="not started"):
        await pool.send(_request("http://127.0.0.1:9/"))


def test_a_pool_needs_a_process() -> None:
    """A pool of zero workers is refused when it is made."""
    with pytest.raises(ValueError, match="at least one process"):
        _pool(0)


async def test_an_idle_worker_that_dies_is_replaced() -> None:
    """A worker killed while idle is started again, so the pool keeps its size."""
    async with Receiver(SECRET) as receiver, _pool(2) as pool:
        killed = pool.pids[0]
        os.kill(killed, signal.SIGKILL)

        async def noticed() -> bool:
            return killed not in pool.pids

        # Until the pool reads the end of the worker's socket, a send may still go to it.
        await _eventually(noticed, within=5.0)

        async def back_to_two() -> bool:
            assert (await pool.send(_request(receiver.url))).success
            return len(pool.pids) == 2

        await _eventually(back_to_two, within=5.0)


async def test_close_during_a_restart_leaves_no_worker_process() -> None:
    """Closing while a replacement worker is starting leaves no worker process behind."""
    async with Receiver(SECRET, replies=[Reply(200, delay=30)]) as receiver:
        pool = _pool(1)
        await pool.start()
        try:
            [pid] = pool.pids
            # Past the restart pause, so the replacement is spawned at once.
            await asyncio.sleep(1.1)
            in_flight = asyncio.create_task(pool.send(_request(receiver.url)))
            await receiver.wait_for(1)
            os.kill(pid, signal.SIGKILL)
            assert (await in_flight).status_code is None

            async def replacement_spawned() -> bool:
                return any(child != pid for child in _worker_children())

            await _eventually(replacement_spawned, within=5.0)
            assert pool.pids == []  # not ready yet
            await pool.close()
            assert _worker_children() == []
        finally:
            await pool.close()
            # The orphan exits once its socket is collected; end it rather than wait.
            for child in _worker_children():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)

            async def none_left() -> bool:
                return _worker_children() == []

            await _eventually(none_left, within=5.0)


# -- the service ---------------------------------------------------------------------------


async def _deliveries(stubs: Stubs, tokens: Tokens, webhook_id: str) -> list[webhook_pb2.Delivery]:
    listed = await stubs.webhooks.ListDeliveries(
        pb.ListDeliveriesRequest(project_id="p-paid", webhook_id=webhook_id),
        metadata=tokens.bearer(tokens.user("u-owner")),
    )
    return list(listed.deliveries)


async def test_a_service_with_worker_processes_delivers_end_to_end(tmp_path: Path) -> None:
    """An event published to a service that sends from a worker arrives once, verified."""
    service = Service(make_settings(tmp_path, sender_processes=1))
    await service.start()
    try:
        assert service.resources is not None
        sender = service.resources.sender
        assert isinstance(sender, SenderPool)
        pids = sender.pids
        assert len(pids) == 1
        # The worker runs at the default WEBHOOKS_SENDER_NICE below the service's priority.
        here = os.getpriority(os.PRIO_PROCESS, 0)
        assert _thread_niceness(pids[0]) == {min(19, here + 10)}
        tokens = Tokens(service.settings.jwt_secret or "")
        async with (
            grpc.aio.insecure_channel(service.grpc_target) as channel,
            Receiver() as receiver,
        ):
            stubs = Stubs.on(channel)
            await seed_world(stubs, tokens)
            created = await stubs.webhooks.CreateWebhook(
                pb.CreateWebhookRequest(
                    project_id="p-paid",
                    name="Hook",
                    url=receiver.url,
                    events=["conversation.started"],
                ),
                metadata=tokens.bearer(tokens.user("u-owner")),
            )
            # The service generated the signing secret; the receiver verifies with it.
            assert created.secret
            receiver.secrets = (created.secret,)
            event = event_pb2.Event(
                id="evt-pool",
                type="conversation.started",
                project_id="p-paid",
                conversation=event_pb2.Conversation(id="conv-pool"),
            )
            await stubs.events.PublishEvents(
                epb.PublishEventsRequest(events=[event]),
                metadata=tokens.bearer(tokens.service(SCOPE_PUBLISH)),
            )
            await receiver.wait_for(1, within=10.0)

            async def delivered() -> bool:
                found = await _deliveries(stubs, tokens, created.webhook.id)
                return [d.status for d in found] == [webhook_pb2.DELIVERY_STATUS_SUCCEEDED]

            await _eventually(delivered, within=10.0)
            [delivery] = await _deliveries(stubs, tokens, created.webhook.id)
            await asyncio.sleep(0.1)
            [received] = receiver.requests
        assert received.verified
        assert received.headers["webhook-id"] == "evt-pool"
        assert received.headers["X-Dembrane-Event"] == "conversation.started"
        assert received.headers["X-Dembrane-Delivery"] == delivery.id
        assert delivery.attempt_count == 1
        # The request went out from the worker, which is still the one that started.
        assert sender.pids == pids
        # /metrics shows the sender process beside the service's own figures.
        figures = {
            name: float(value)
            for name, _, value in (
                line.partition(" ")
                for line in metrics.exposition().decode().splitlines()
                if line.startswith("webhooks_sender_")
            )
        }
        assert figures["webhooks_sender_processes"] == 1
        assert figures["webhooks_sender_resident_memory_bytes"] > 10 * 1024 * 1024
    finally:
        await service.stop()
    assert all(_gone(pid) for pid in pids)


async def test_serve_starts_a_worker_again_without_a_word_about_fork(tmp_path: Path) -> None:
    """A worker of a running ``serve`` killed and started again leaves nothing on stderr but
    the service's own line: no fork-handler notice from gRPC."""
    grpc_port = unused_port()
    env = {
        **os.environ,
        "WEBHOOKS_DATABASE_URL": f"sqlite:///{tmp_path / 'serve.db'}",
        "WEBHOOKS_GRPC_PORT": str(grpc_port),
        "WEBHOOKS_HTTP_PORT": str(unused_port()),
        "WEBHOOKS_JWT_SECRET": JWT_SECRET,
        "WEBHOOKS_SENDER_PROCESSES": "2",
    }
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dembrane.webhooks.cli",
            "serve",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    try:

        async def serving() -> bool:
            # gRPC listens only once the workers are ready.
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", grpc_port)
            except OSError:
                return False
            writer.close()
            return True

        await _eventually(serving, within=30.0)
        first = _worker_children(process.pid)
        assert len(first) == 2
        os.kill(first[0], signal.SIGKILL)

        async def replaced() -> bool:
            now = _worker_children(process.pid)
            return first[0] not in now and len(now) == 2

        await _eventually(replaced, within=RESTART_DEADLINE_SECONDS)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    logged = stderr_path.read_text()
    assert f"(pid {first[0]}) exited with status -9; starting another" in logged
    assert "fork" not in logged.lower()


# -- how many workers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cores", "expected"),
    [(0, 0), (1, 0), (2, 2), (3, 2), (4, 3), (5, 4), (6, 4), (64, 4)],
)
def test_default_processes_leaves_a_core_and_caps_at_four(
    monkeypatch: pytest.MonkeyPatch, cores: int, expected: int
) -> None:
    """Auto means no workers on one core, two on two, else one fewer than the cores, at most 4."""

    def affinity(_pid: int) -> set[int]:
        return set(range(cores))

    # Patched where the pool module looks it up: its ``os`` is the ``os`` module.
    monkeypatch.setattr(f"{POOL_MODULE}.os.sched_getaffinity", affinity, raising=False)
    assert default_processes() == expected


def test_default_processes_without_affinity_counts_the_cpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where affinity cannot be read, the CPU count decides, and an unknown count means one."""
    monkeypatch.delattr(f"{POOL_MODULE}.os.sched_getaffinity", raising=False)
    monkeypatch.setattr(f"{POOL_MODULE}.os.cpu_count", lambda: 8)
    assert default_processes() == 4
    monkeypatch.setattr(f"{POOL_MODULE}.os.cpu_count", lambda: None)
    assert default_processes() == 0
