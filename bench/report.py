"""The record of a run: the machine, ``docs/benchmarks.md``, and ``docs/benchmarks.png``."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from bench.results import Figure, ScenarioResult, markdown_table


@dataclass(frozen=True)
class Machine:
    """Where the benchmark ran."""

    cpu: str
    cores: int
    usable_cores: int
    memory_gb: float | None
    system: str
    python: str
    libraries: str
    database: str
    #: The 1-minute load average when the run began and when it ended.
    load: tuple[float, float] | None = None
    #: The share of the machine's CPU time its host took during the run (steal).
    stolen: float | None = None

    def rows(self) -> list[tuple[str, str]]:
        memory = "" if self.memory_gb is None else f", {self.memory_gb:.1f} GB RAM"
        usable = "" if self.usable_cores == self.cores else f" ({self.usable_cores} usable)"
        return [
            ("CPU", f"{self.cpu}, {self.cores} cores{usable}{memory}"),
            ("OS", self.system),
            ("Python", self.python),
            ("Libraries", self.libraries),
            ("Database", self.database),
            *(
                [
                    (
                        "Load average",
                        f"{self.load[0]:.2f} at the start, {self.load[1]:.2f} at the end",
                    )
                ]
                if self.load is not None
                else []
            ),
            *(
                [
                    (
                        "CPU taken by the host",
                        f"{self.stolen * 100:.0f} % of the machine's CPU time during the run "
                        "(steal: a virtual machine's cores running other guests); the notes "
                        "give it for each run",
                    )
                ]
                if self.stolen is not None
                else []
            ),
        ]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "Processor") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> float | None:
    """The 1-minute load average, where the system has one."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def describe_machine(
    database: str, load: tuple[float | None, float | None], stolen: float | None = None
) -> Machine:
    cores = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    names = ("grpcio", "aiohttp", "httptools", "SQLAlchemy", "uvloop")
    libraries = ", ".join(f"{name} {_version(name)}" for name in names)
    return Machine(
        cpu=_cpu_model(),
        cores=cores,
        usable_cores=usable,
        memory_gb=_memory_gb(),
        system=platform.platform(),
        python=f"{platform.python_implementation()} {platform.python_version()}",
        libraries=libraries,
        database=database,
        load=(load[0], load[1]) if load[0] is not None and load[1] is not None else None,
        stolen=stolen,
    )


# -- the plot ------------------------------------------------------------------------------


def write_plot(figures: Sequence[Figure], path: Path) -> str | None:
    """Bars of each judged figure against its goal; returns why it was skipped, if it was."""
    try:
        # An optional dependency: without it the report simply has no plot.
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return "matplotlib is not installed, so no plot was drawn"

    judged = [f for f in figures if f.goal is not None]
    labels: list[str] = []
    values: list[float] = []
    goals: list[float] = []
    colors: list[str] = []
    texts: list[str] = []
    for figure in judged:
        assert figure.goal is not None
        attained = figure.goal.attainment(figure.value, figure.ratio)
        labels.append(
            f"{figure.scenario}: {figure.name}\n(goal {figure.goal.describe(figure.unit)})"
        )
        values.append(0.0 if attained is None else attained)
        texts.append(" n/a" if attained is None else f" {attained:.2f}")
        goals.append(figure.goal.threshold if figure.goal.kind.value.startswith("ratio") else 1.0)
        colors.append({True: "#2e7d32", False: "#c62828", None: "#9e9e9e"}[figure.met])

    height = 0.9 + 0.55 * len(judged)
    fig, axis = plt.subplots(figsize=(10, height))
    positions = list(range(len(judged)))[::-1]
    axis.barh(positions, values, color=colors, height=0.6)
    for position, goal in zip(positions, goals, strict=True):
        axis.plot([goal, goal], [position - 0.4, position + 0.4], color="black", linewidth=2)
    for position, value, text in zip(positions, values, texts, strict=True):
        axis.text(value, position, text, va="center", fontsize=8)
    axis.set_yticks(positions, labels, fontsize=8)
    axis.set_xlabel(
        "ratio to the baseline (throughput, fan-out, isolation, claim time); "
        "value / limit (latency, memory)",
        fontsize=8,
    )
    axis.set_title("Each figure against its goal (black tick); green = met", fontsize=10)
    axis.set_xlim(0, max([*values, *goals, 1.0]) * 1.15)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# -- the document --------------------------------------------------------------------------

_METHOD = """\
## What each scenario measures

Each run of the service is a separate `dembrane-webhooks serve --no-gateway` process
(settings from `WEBHOOKS_*`, loopback targets allowed) on an empty database, with the
sender processes it starts itself (`WEBHOOKS_SENDER_PROCESSES`, by default one fewer than
the cores and at least two: two here, the second used only when the first falls behind). Events are
published over gRPC from the benchmark's own process. Deliveries go to a lean aiohttp
receiver in a third process that answers 200 at once and records each delivery id and the
first arrival of each event. A run counts as finished when the receiver has every delivery
**and** the service's store records every one as succeeded. So a rate covers the whole path:
publish, commit, claim, sign, POST, record.

1. **Ceiling (C).** A bare aiohttp loop POSTs the same signed body (a
   `conversation.summarized` event of about 1.7 kB) to the same receiver, at the service's
   global concurrency (`WEBHOOKS_MAX_CONCURRENCY`). Nothing can deliver faster than this on
   this machine; it is the baseline of scenario 2. It is measured before scenario 2 and
   again right after each of its rounds, and each round is set against the mean of the two
   measurements around it (all are in the notes): a shared machine's speed drifts during a
   run, and one measurement half a minute away from a round could flatter or wrong it. The
   figure in the table is the C of the round shown for scenario 2. The service itself
   does not send through aiohttp but through its own HTTP/1.1 client (`delivery/http.py`),
   which spends about a quarter of aiohttp's CPU per request; C stays the bare aiohttp
   loop, the common client a team would write.
2. **Throughput.** `PublishEvents` in batches of 100 (4 calls in flight) to a single
   webhook, which may use the whole concurrency
   (`WEBHOOKS_PER_WEBHOOK_CONCURRENCY` = the global one). Deliveries per second from the
   first publish until every delivery is recorded as succeeded, against C. The publish rate
   beside it shows whether publishing or delivering set the pace. It runs three times, each
   on a fresh database; the table shows the round with the median ratio to C, and the notes
   give every round. One run of this scenario moves by a fifth from one minute to the next on
   this machine, so a single one could land on either side of its goal by chance.
3. **Latency at 500 events/s.** `PublishEvent` calls at a steady 500 per second (open loop:
   a slow answer does not slow the schedule), one event each. *Acknowledged per second* is
   how many of those calls the service answered per second, against the offered rate: below
   it, calls queue and every latency below grows with the length of the run. *Publish ack*
   is the call's round trip, set against a gRPC health check at the same rate (the
   transport's own cost). *Publish to receiver* runs from just before the call to the
   receiver's first sight of the event, set against a bare POST to the receiver at the same
   rate.
4. **Fan-out.** The same number of deliveries made two ways: one event per call to a
   project with 100 webhooks, against 100 events per call to a project with one webhook.
5. **Isolation.** 100 projects with one webhook each. Every tenth webhook's receiver never
   answers, so each request to it waits for the request timeout (5 s), and its retries come
   back a second later. Events go round-robin over all projects until the healthy webhooks
   together have as many as scenario 2's one webhook (20,000; the hanging ones get their
   2,223 on top), and the figure is the healthy webhooks' deliveries per second against
   scenario 2: the same healthy work, with everything the hanging webhooks cost (their
   events published, stored, claimed and sent) added. Publishing and storing an event is
   about a third of the CPU a delivery costs here, so a service whose hanging webhooks cost
   nothing beyond their own events would show about 0.96x. The service runs with the
   product's per-webhook cap (`WEBHOOKS_PER_WEBHOOK_CONCURRENCY=8`), as a deployment would.
   A control run with the same 100 webhooks, none hanging, separates the cost of the
   hanging from the cost of spreading the work over many webhooks. Scenario 2 runs again
   before the first of five rounds and after each, and a round (the hanging run, then the
   control) is set against the mean of the two runs of scenario 2 around it, so the
   machine's drift in speed (a quarter within minutes) falls on both sides of the ratio;
   the table shows the round with the median ratio, and the notes give every round.
6. **Backlog.** 1,000,000 due deliveries (10,000 events to 100 webhooks) are written
   straight into the store, against 1,000. The *claim time* is `store.outbox.claim_due`
   as the dispatcher calls it (its batch size, in its own transaction), median of repeated
   claims. The commit is timed apart and noted, because a disk sync does not grow with the
   table. The *peak memory* is the `VmHWM` of a `dembrane-webhooks worker` process that
   delivers from the backlog for a few seconds, one process per size, plus that of its
   sender processes. Its delivery rate
   while draining, with nothing being published, is set against C.

The notes under the table give the CPU time the service spent per delivery, publish
and its sender processes included, next to the CPU time the bare loop spent per request.
They are measured from `/proc`, so other work on the machine does not inflate them the way
it does wall-clock rates.

The goals, set for a 2-core machine on SQLite: throughput at
least half of C; ack p99 under 10 ms; publish to receiver p50 under 20 ms and p99 under
100 ms; fan-out within 20 % of the one-webhook rate; isolation costing less than 10 %; a
claim on the large backlog at most twice as slow as on the small one; peak memory under
300 MB.
"""

_REPRODUCE = """\
## Reproduce

```sh
make bench                                   # the full run; rewrites this page
.venv/bin/python -m bench --quick            # a smoke run in well under a minute
.venv/bin/python -m bench --only latency     # one scenario (its baselines come along)
.venv/bin/python -m bench --database-url postgresql://user@localhost:5432/webhooks_bench
WEBHOOKS_SQLITE_SYNCHRONOUS=NORMAL make bench  # any WEBHOOKS_* setting passes through
.venv/bin/python -m bench --only throughput --profile   # where the service spends its time
.venv/bin/python -m bench.compare --b WEBHOOKS_SENDER_PROCESSES=1   # two set-ups, in turns
```

One run measures each figure once, and this machine's speed drifts by up to a third within
minutes, so a single run cannot show a change smaller than that. `bench.compare` runs two
services side by side (different settings, `serve` arguments, or another checkout's code
with `--b-source`) and publishes to them in alternating rounds of single-event calls at
500/s (or, with `--batch 100 --rate 2000`, calls of 100 events as scenario 2 makes), so
both meet the same machine; it reports each side's acknowledgement and publish-to-receiver
p50/p99, the CPU each used per event, and in how many rounds each was faster or cheaper.

A database URL (the flag or `WEBHOOKS_DATABASE_URL`) is emptied before each run, so point
it at a scratch database: the benchmark refuses one holding workspaces it did not create.
"""


def write_markdown(
    path: Path,
    *,
    results: Sequence[ScenarioResult],
    figures: Sequence[Figure],
    machine: Machine,
    command: str,
    started: datetime,
    seconds: float,
    plot: str | None,
    plot_note: str | None,
    settings_note: str,
) -> None:
    """Rewrite the benchmarks page with this run's figures."""
    lines = [
        "# Benchmarks",
        "",
        "This page is written by `make bench`; rerun it rather than editing the figures.",
        "",
        "## Last run",
        "",
        "| | |",
        "|---|---|",
        f"| Date | {started.astimezone(UTC).strftime('%Y-%m-%d %H:%M UTC')} |",
        *(f"| {key} | {value} |" for key, value in machine.rows()),
        f"| Settings | {settings_note} |",
        f"| Command | `{command}` |",
        f"| Duration | {seconds / 60:.1f} minutes |",
        "",
        "## Results",
        "",
        markdown_table(figures),
        "",
    ]
    if plot is not None:
        lines += [f"![Each figure against its goal]({plot})", ""]
    elif plot_note:
        lines += [f"_No plot: {plot_note}._", ""]
    notes = [note for result in results for note in result.notes]
    errors = [f"{result.name} failed: {result.error}" for result in results if result.error]
    if notes or errors:
        lines += ["Notes from the run:", ""]
        lines += [f"- {note}" for note in (*errors, *notes)]
        lines.append("")
    lines += [_METHOD, _REPRODUCE]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")
