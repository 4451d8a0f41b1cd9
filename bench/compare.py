"""``python -m bench.compare``: two service set-ups side by side, measured in alternating rounds.

A full run (``python -m bench``) measures each figure once, minutes away from the others,
and a shared machine's speed drifts by a third within minutes: one run cannot tell whether
a change makes publishing faster by less than that. This runs two services at once, side A
and side B, each on its own SQLite file with its own sender process and its own webhook on
one shared receiver, and publishes to them in turns: single-event ``PublishEvent`` calls at
a steady rate for a few seconds, A then B, then B then A, round after round. Both sides
therefore meet the same machine. It prints, for each side, the acknowledgement and
publish-to-receiver p50/p99 over all its rounds and round by round, the CPU time the
service (its sender processes included) used per event in each round, and in how many
rounds B was faster or used less CPU. With ``--batch N`` the rounds publish ``PublishEvents``
calls of N events at the same event rate, as scenario 2 does: the CPU per event then
shows the cost of the delivery path more than that of a call.

    python -m bench.compare --b WEBHOOKS_SENDER_PROCESSES=0
    python -m bench.compare --b-serve-arg=--no-dispatcher        # publishing alone
    python -m bench.compare --b-source ../other-checkout/src      # another version's code
    python -m bench.compare --rounds 12 --seconds 4 --rate 300
    python -m bench.compare --b-source ../other/src --batch 100 --rate 2000   # CPU per event

Settings not given keep the benchmark's (``bench/service.py``). With ``--no-dispatcher`` a
side delivers nothing, and its publish-to-receiver figures are left out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.client import BenchClient, make_event
from bench.receiver import ReceiverProcess
from bench.results import percentile
from bench.scenarios import paced
from bench.service import ServiceConfig, ServiceProcess
from bench.steal import MachineClock, stolen_share

_PROJECT = "p-compare"
#: Events each side publishes before the first round: connections, caches, the first claims.
_WARM_UP_EVENTS = 500
#: The longest a round waits for its deliveries to arrive.
_DELIVERY_DEADLINE_SECONDS = 60.0


@dataclass
class Side:
    """One service under comparison and what its rounds measured."""

    name: str
    env: dict[str, str]
    serve_args: list[str]
    source: str | None
    acks: list[float] = field(default_factory=list)
    to_receiver: list[float] = field(default_factory=list)
    rounds: list[tuple[float, float]] = field(default_factory=list)
    #: CPU seconds per event, round by round (None where ``/proc`` could not tell).
    cpu: list[float | None] = field(default_factory=list)
    #: The share of the machine's CPU time its host took, round by round (``bench/steal.py``).
    stolen: list[float | None] = field(default_factory=list)
    service: ServiceProcess | None = None
    client: BenchClient | None = None
    hook: int = 0

    @property
    def delivers(self) -> bool:
        return "--no-dispatcher" not in self.serve_args

    def describe(self) -> str:
        parts = [f"{key}={value}" for key, value in self.env.items()] + self.serve_args
        if self.source:
            parts.append(f"code from {self.source}")
        return " ".join(parts) or "the benchmark's settings"


class _Service(ServiceProcess):
    """A service process with extra ``serve`` arguments and, maybe, other code first."""

    def __init__(self, config: ServiceConfig, workdir: Path, side: Side) -> None:
        super().__init__(config, workdir)
        self._side = side

    def _argv(self) -> list[str]:
        return super()._argv() + self._side.serve_args


async def _start(side: Side, receiver: ReceiverProcess, workdir: Path) -> None:
    env = dict(side.env)
    if side.source:
        # Ahead of the installed package: the other checkout's code runs on this side.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (side.source, os.environ.get("PYTHONPATH", "")) if p
        )
    config = ServiceConfig(
        database_url=f"sqlite:///{workdir / side.name / 'webhooks.db'}",
        max_concurrency=128,
        per_webhook_concurrency=128,
        extra_env=env,
    )
    side.service = await _Service(config, workdir / side.name, side).start()
    side.client = BenchClient(side.service.target)
    await side.client.seed_project(_PROJECT)
    await side.client.create_webhooks(_PROJECT, [receiver.url(side.hook)])
    for index in range(_WARM_UP_EVENTS):
        await side.client.publish_one(make_event(f"warm-{side.name}-{index}", _PROJECT))


async def _round(
    side: Side, receiver: ReceiverProcess, number: int, rate: float, seconds: float, batch: int
) -> None:
    client = side.client
    service = side.service
    assert client is not None
    assert service is not None
    calls = max(1, int(rate * seconds / batch))
    events = [make_event(f"cmp-{side.name}-{number}-{i}", _PROJECT) for i in range(calls * batch)]
    sent_at: dict[str, float] = {}
    acks: list[float] = []

    async def publish(index: int) -> None:
        chunk = events[index * batch : (index + 1) * batch]
        wall, started = time.time(), time.perf_counter()
        if batch == 1:
            await client.publish_one(chunk[0])
        else:
            await client.publish_batch(chunk)
        acks.append(time.perf_counter() - started)
        for event in chunk:
            sent_at[event.id] = wall

    await receiver.reset()
    cpu_before = service.cpu_seconds()
    clock_before = MachineClock.read()
    await paced(rate / batch, calls, publish)
    clock_after = MachineClock.read()
    side.stolen.append(stolen_share(clock_before, clock_after))
    if side.delivers:
        await receiver.wait_delivered(
            len(events), deadline=time.monotonic() + _DELIVERY_DEADLINE_SECONDS
        )
        arrivals = await receiver.arrivals()
        side.to_receiver += [arrivals[i] - sent_at[i] for i in sent_at if i in arrivals]
    # Every outcome is written within a flush interval of its arrival.
    await asyncio.sleep(0.2)
    cpu_after = service.cpu_seconds()
    side.cpu.append(
        None if cpu_before is None or cpu_after is None else (cpu_after - cpu_before) / len(events)
    )
    side.acks += acks
    side.rounds.append((percentile(acks, 50) or 0.0, percentile(acks, 99) or 0.0))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _report(a: Side, b: Side) -> str:
    lines = []
    for side in (a, b):
        lines.append(f"{side.name}: {side.describe()}")
        lines.append(
            f"  ack p50 {_ms(percentile(side.acks, 50))} ms, p99 {_ms(percentile(side.acks, 99))}"
            " ms over all rounds"
            + (
                f"; publish to receiver p50 {_ms(percentile(side.to_receiver, 50))} ms, "
                f"p99 {_ms(percentile(side.to_receiver, 99))} ms"
                if side.delivers
                else ""
            )
        )
        lines.append(
            "  ack p50/p99 by round (ms): "
            + " ".join(f"{p50 * 1000:.0f}/{p99 * 1000:.0f}" for p50, p99 in side.rounds)
        )
        lines.append(
            f"  CPU per event (ms): median {_cpu_ms(_median(side.cpu))}; by round: "
            + " ".join(_cpu_ms(value) for value in side.cpu)
        )
        if any(share is not None for share in side.stolen):
            lines.append(
                "  CPU time taken by the host while publishing (steal), by round: "
                + " ".join("-" if share is None else f"{share:.0%}" for share in side.stolen)
            )
    rounds = len(a.rounds)
    faster50 = sum(pb[0] < pa[0] for pa, pb in zip(a.rounds, b.rounds, strict=True))
    faster99 = sum(pb[1] < pa[1] for pa, pb in zip(a.rounds, b.rounds, strict=True))
    pooled_a, pooled_b = percentile(a.acks, 50), percentile(b.acks, 50)
    ratio = f"{pooled_b / pooled_a:.2f}x" if pooled_a and pooled_b else "-"
    lines.append(
        f"B against A: ack p50 {ratio}; B faster in {faster50} of {rounds} rounds at p50, "
        f"{faster99} of {rounds} at p99"
    )
    cheaper = sum(
        pb is not None and pa is not None and pb < pa for pa, pb in zip(a.cpu, b.cpu, strict=True)
    )
    cpu_a, cpu_b = _median(a.cpu), _median(b.cpu)
    cpu_ratio = f"{cpu_b / cpu_a:.2f}x" if cpu_a and cpu_b else "-"
    lines.append(
        f"B against A: CPU per event {cpu_ratio} (medians); B used less in {cheaper} of "
        f"{rounds} rounds"
    )
    return "\n".join(lines)


def _cpu_ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.3f}"


def _median(values: Sequence[float | None]) -> float | None:
    known = sorted(v for v in values if v is not None)
    return percentile(known, 50) if known else None


def _settings(items: Sequence[str]) -> dict[str, str]:
    settings: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"A setting is NAME=VALUE, not {item!r}.")
        settings[key] = value
    return settings


async def compare(
    a: Side, b: Side, *, rounds: int, seconds: float, rate: float, batch: int = 1
) -> str:
    with tempfile.TemporaryDirectory(prefix="webhooks-compare-") as folder:
        workdir = Path(folder)
        async with ReceiverProcess() as receiver:
            try:
                for side in (a, b):
                    await _start(side, receiver, workdir)
                for number in range(rounds):
                    order = (a, b) if number % 2 == 0 else (b, a)
                    for side in order:
                        await _round(side, receiver, number, rate, seconds, batch)
                        # Let the side just measured finish its writes before the other starts.
                        await asyncio.sleep(1.0)
                    print(f"round {number + 1} of {rounds} done", file=sys.stderr)
            finally:
                for side in (a, b):
                    if side.client is not None:
                        await side.client.close()
                    if side.service is not None:
                        await side.service.stop()
    return _report(a, b)


def _resolved(folder: str | None) -> str | None:
    return None if folder is None else str(Path(folder).resolve())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description="Publish to two services in alternating rounds and compare their latency.",
    )
    for name in ("a", "b"):
        parser.add_argument(
            f"--{name}",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help=f"a WEBHOOKS_* setting of side {name.upper()} (repeatable)",
        )
        parser.add_argument(
            f"--{name}-serve-arg",
            action="append",
            default=[],
            metavar="ARG",
            help=f"an extra 'serve' argument of side {name.upper()}, e.g. --no-dispatcher",
        )
        parser.add_argument(
            f"--{name}-source",
            metavar="DIR",
            help=f"a 'src' folder whose code side {name.upper()} runs instead of this one's",
        )
    parser.add_argument("--rounds", type=int, default=8, help="rounds per side (default 8)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of a round")
    parser.add_argument("--rate", type=float, default=500.0, help="events per second")
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        help="events per call: 1 (the default) publishes with PublishEvent, more with "
        "PublishEvents, as scenario 2 does",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0 or args.rate <= 0 or args.batch < 1:
        parser.error("--rounds, --seconds, --rate and --batch must be positive")
    sides = [
        Side(
            name=name.upper(),
            env=_settings(getattr(args, name)),
            serve_args=getattr(args, f"{name}_serve_arg"),
            source=_resolved(getattr(args, f"{name}_source")),
            hook=index,
        )
        for index, name in enumerate(("a", "b"))
    ]
    report = asyncio.run(
        compare(*sides, rounds=args.rounds, seconds=args.seconds, rate=args.rate, batch=args.batch)
    )
    print(report)


if __name__ == "__main__":
    main()
