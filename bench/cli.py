"""``python -m bench``: run the scenarios, print the table, record the run in the docs.

python -m bench                       # the full run (make bench); writes docs/benchmarks.md
python -m bench --quick               # small counts, a smoke run in well under a minute
python -m bench --only latency        # some scenarios (their baselines come along)
python -m bench --database-url postgresql://...   # another database lane
python -m bench --profile --only throughput       # where the service spends its time

Two set-ups compared in alternating rounds: ``python -m bench.compare`` (see its docstring).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pstats
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from bench import loadgen
from bench.backlog import backlog
from bench.lanes import DatabaseLane, ForeignDataError
from bench.receiver import ReceiverProcess
from bench.report import describe_machine, load_average, write_markdown, write_plot
from bench.results import Figure, ScenarioResult, text_table
from bench.scenarios import (
    FULL,
    QUICK,
    BenchContext,
    ceiling,
    fanout,
    isolation,
    latency,
    throughput,
)
from bench.service import REPO_ROOT
from bench.steal import MachineClock, describe_stolen, stolen_share

Scenario = Callable[[BenchContext], Awaitable[ScenarioResult]]

#: Every scenario, in the order they run.
SCENARIOS: dict[str, Scenario] = {
    "ceiling": ceiling,
    "throughput": throughput,
    "latency": latency,
    "fanout": fanout,
    "isolation": isolation,
    "backlog": backlog,
}

#: The scenarios whose figures another one takes as its baseline.
NEEDS: dict[str, tuple[str, ...]] = {
    "throughput": ("ceiling",),
    "backlog": ("ceiling",),
}

DOCS = REPO_ROOT / "docs" / "benchmarks.md"
PLOT = DOCS.with_suffix(".png")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmark the webhook service."
    )
    parser.add_argument(
        "--quick", action="store_true", help="small counts: a smoke run, under a minute"
    )
    parser.add_argument(
        "--database-url",
        help="the database every run uses, emptied first (default: WEBHOOKS_DATABASE_URL, "
        "else a fresh SQLite file per run in a temporary folder)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="SCENARIO",
        help=f"run only these ({', '.join(SCENARIOS)}); repeatable or comma-separated",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=128,
        help="the service's WEBHOOKS_MAX_CONCURRENCY and the ceiling's (default 128)",
    )
    parser.add_argument(
        "--docs",
        type=Path,
        help="write the report here (default: docs/benchmarks.md after a full, "
        "unprofiled run of every scenario; other runs write nothing unless given)",
    )
    parser.add_argument(
        "--no-docs", action="store_true", help="print the table only, whatever the run"
    )
    parser.add_argument(
        "--profile",
        nargs="?",
        choices=("sample", "cprofile"),
        const="sample",
        default=os.environ.get("BENCH_PROFILE") or None,
        help="run the service under a profiler and print where its threads spend their time: "
        "'sample' (the default; light) or 'cprofile' (exact counts, slows the service "
        "down). Also set by BENCH_PROFILE=sample|cprofile. The report is not rewritten.",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (databases, logs)"
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when a goal is missed"
    )
    return parser


def _selected(only: Sequence[str]) -> list[str]:
    names = [name.strip() for item in only for name in item.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        raise SystemExit(
            f"python -m bench: unknown scenario {', '.join(unknown)}; "
            f"choose from {', '.join(SCENARIOS)}"
        )
    wanted = set(names) if names else set(SCENARIOS)
    pending = list(wanted)
    while pending:
        for need in NEEDS.get(pending.pop(), ()):
            if need not in wanted:
                wanted.add(need)
                pending.append(need)
    return [name for name in SCENARIOS if name in wanted]


def _command(argv: Sequence[str]) -> str:
    if not argv:
        return "make bench"
    return ".venv/bin/python -m bench " + " ".join(shlex.quote(arg) for arg in argv)


def _print_profiles(profile_dir: Path) -> None:
    for path in sorted(profile_dir.glob("*.txt")):
        print(f"\n=== {path.stem}: where the service's threads spent their time ===")
        print(path.read_text())
    for path in sorted(profile_dir.glob("*.*.prof")):
        where = "event loop" if path.name.endswith(".loop.prof") else "store threads"
        stats = pstats.Stats(str(path))
        print(f"\n=== {path.name} ({where}): own time ===")
        stats.sort_stats("tottime").print_stats(25)
        print(f"=== {path.name} ({where}): the service's code by cumulative time ===")
        stats.sort_stats("cumulative").print_stats(r"dembrane/webhooks", 25)


async def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    names = _selected(args.only)
    scale = QUICK if args.quick else FULL
    workdir = Path(tempfile.mkdtemp(prefix="webhooks-bench-"))
    url = args.database_url or os.environ.get("WEBHOOKS_DATABASE_URL") or None
    lane = DatabaseLane(url, workdir)
    profile_dir = workdir / "profiles" if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True)
    started_at = datetime.now(UTC)
    started = time.monotonic()
    load_at_start = load_average()
    clock_at_start = MachineClock.read()
    cores = os.cpu_count() or 1
    if load_at_start is not None and load_at_start > 0.5 * cores:
        print(
            f"Warning: the load average is {load_at_start:.2f} on {cores} cores; other work "
            "on this machine will make the figures noisy.",
            file=sys.stderr,
        )
    results: list[ScenarioResult] = []
    figures: list[Figure] = []
    try:
        try:
            await asyncio.to_thread(lane.check)
        except ForeignDataError as error:
            print(f"python -m bench: {error}", file=sys.stderr)
            return 2
        database = await asyncio.to_thread(lane.describe)
        synchronous = os.environ.get("WEBHOOKS_SQLITE_SYNCHRONOUS", "FULL").upper()
        if lane.is_sqlite:
            database += f", synchronous={synchronous}"
        print(
            f"Benchmarking ({scale.name} run) on {database}; scenarios: {', '.join(names)}",
            file=sys.stderr,
        )
        built: Path | None = None
        if "latency" in names:
            built, how = await asyncio.to_thread(loadgen.build)
            if built is None:
                how = f"the Python client ({how})"
            print(f"Latency load generator: {how}", file=sys.stderr)
        async with ReceiverProcess() as receiver:
            ctx = BenchContext(
                scale=scale,
                lane=lane,
                receiver=receiver,
                workdir=workdir,
                concurrency=args.concurrency,
                profile_mode=args.profile,
                profile_dir=profile_dir,
                loadgen=built,
            )
            for name in names:
                ctx.log(f"--- {name}")
                begun = time.monotonic()
                try:
                    result = await SCENARIOS[name](ctx)
                except Exception as error:
                    traceback.print_exc()
                    result = ScenarioResult(name, error=f"{type(error).__name__}: {error}")
                result.seconds = time.monotonic() - begun
                ctx.log(f"{name} took {result.seconds:.1f} s")
                results.append(result)
        seconds = time.monotonic() - started
        clock_at_end = MachineClock.read()
        stolen = stolen_share(clock_at_start, clock_at_end)

        figures = [figure for result in results for figure in result.figures]
        print()
        print(text_table(figures))
        notes = [f"{r.name} failed: {r.error}" for r in results if r.error]
        notes += [note for result in results for note in result.notes]
        if notes:
            print("\nNotes:")
            for note in notes:
                print(f"  - {note}")
        print(f"\n{len(figures)} figures in {seconds / 60:.1f} minutes.")
        if stolen_text := describe_stolen(stolen):
            print(f"During the run {stolen_text}.")

        docs = _docs_path(args, names)
        if docs is not None:
            plot_path = docs.with_suffix(".png")
            plot_note = write_plot(figures, plot_path)
            if plot_note:
                print(f"No plot: {plot_note} (pip package: matplotlib).")
                # A plot of an earlier run must not pass for this one's.
                plot_path.unlink(missing_ok=True)
            write_markdown(
                docs,
                results=results,
                figures=figures,
                machine=describe_machine(database, (load_at_start, load_average()), stolen),
                command=_command(argv),
                started=started_at,
                seconds=seconds,
                plot=None if plot_note else plot_path.name,
                plot_note=plot_note,
                settings_note=(
                    f"WEBHOOKS_MAX_CONCURRENCY={args.concurrency}; the product's defaults "
                    "otherwise, except where a scenario says"
                ),
            )
            print(f"Wrote {docs}" + ("" if plot_note else f" and {plot_path}"))
        if profile_dir is not None:
            _print_profiles(profile_dir)
    finally:
        if args.keep or args.profile:
            print(f"Kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    if any(result.error for result in results):
        return 1
    if args.strict and any(figure.met is False for figure in figures):
        return 1
    return 0


def _docs_path(args: argparse.Namespace, names: Sequence[str]) -> Path | None:
    if args.no_docs:
        return None
    if args.docs is not None:
        return Path(args.docs)
    if args.quick or args.profile or list(names) != list(SCENARIOS):
        print(
            "Not rewriting docs/benchmarks.md: it records full runs of every scenario "
            "(pass --docs PATH to write this run's report somewhere).",
            file=sys.stderr,
        )
        return None
    return DOCS


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_run(args, argv))
    return uvloop.run(_run(args, argv))
