"""Run the service's command line under a profiler: cProfile, or a sampling profiler.

``python -m bench.profiled MODE OUT COMMAND [ARGS...]`` behaves like
``dembrane-webhooks COMMAND [ARGS...]`` and, when the service exits, writes a profile:

* ``cprofile``: deterministic statistics of the main thread (the event loop: gRPC,
  dispatcher, sender) to ``OUT.loop.prof`` and of every other Python thread (the store's
  executor) to ``OUT.store.prof``. Exact call counts, but it slows everything down and
  attributes the time of suspended coroutines oddly, so read shares, not absolute times.
* ``sample``: a thread that reads every Python thread's CPU clock and looks at its stack about
  200 times a second (``sys._current_frames``), writing ``OUT.txt``: per thread, the CPU time
  it used (exact, from the kernel) and where its stack was (own time, and time including
  callees). The stacks are biased: the sampler needs the GIL, so it tends to wake just as a
  thread lets the GIL go, inside a C call such as ``hmac.digest`` or a commit. Read them
  to find paths, and read the CPU times to find the saturated thread.
"""

from __future__ import annotations

import cProfile
import pstats
import resource
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType

_thread_profiles: list[cProfile.Profile] = []
_lock = threading.Lock()

#: Frames where a thread waits for work rather than doing it.
_IDLE_LEAVES = (
    ("concurrent/futures/thread.py", "_worker"),
    ("threading.py", "wait"),
    # A thread whose top Python frame is its run method is inside C code (gRPC's poller).
    ("threading.py", "run"),
    ("uvloop/__init__.py", "run"),
    ("asyncio/runners.py", "run"),
    ("selectors.py", "select"),
)

Site = tuple[str, int, str]


def _profile_threads() -> None:
    original_run: Callable[[threading.Thread], None] = threading.Thread.run

    def run(self: threading.Thread) -> None:
        profile = cProfile.Profile()
        with _lock:
            _thread_profiles.append(profile)
        profile.enable()
        try:
            original_run(self)
        finally:
            profile.disable()

    threading.Thread.run = run  # type: ignore[method-assign]


def _short(filename: str) -> str:
    for marker in ("/site-packages/", "/src/", "/lib/python3"):
        if marker in filename:
            tail = filename.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3" else tail
    return filename


def _site(frame: FrameType) -> Site:
    code = frame.f_code
    return (_short(code.co_filename), code.co_firstlineno, code.co_name)


class Sampler(threading.Thread):
    """Counts, per thread, the function on top of the stack and every function on it."""

    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(name="bench-sampler", daemon=True)
        self.interval = interval
        self.stopping = threading.Event()
        self.samples: Counter[str] = Counter()
        self.idle: Counter[str] = Counter()
        self.own: dict[str, Counter[Site]] = {}
        self.inclusive: dict[str, Counter[Site]] = {}
        #: The last CPU time (seconds) read for each thread, by name and thread id.
        self.cpu: dict[tuple[str, int], float] = {}
        self.started = time.monotonic()

    @staticmethod
    def _label(thread_name: str) -> str:
        return "store" if thread_name.startswith("store") else thread_name

    def _read_cpu(self) -> None:
        for thread in threading.enumerate():
            if thread.ident is None or thread is self:
                continue
            try:
                clock = time.pthread_getcpuclockid(thread.ident)
                self.cpu[(self._label(thread.name), thread.ident)] = time.clock_gettime(clock)
            except (OSError, AttributeError):
                continue

    def run(self) -> None:
        me = threading.get_ident()
        while not self.stopping.wait(self.interval):
            self._read_cpu()
            names = {thread.ident: thread.name for thread in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                name = self._label(names.get(ident, str(ident)))
                self.samples[name] += 1
                leaf = _site(frame)
                if any(leaf[0].endswith(f) and leaf[2] == fn for f, fn in _IDLE_LEAVES):
                    self.idle[name] += 1
                    continue
                self.own.setdefault(name, Counter())[leaf] += 1
                seen: set[Site] = set()
                current: FrameType | None = frame
                while current is not None:
                    site = _site(current)
                    if site not in seen:
                        seen.add(site)
                        self.inclusive.setdefault(name, Counter())[site] += 1
                    current = current.f_back

    def report(self, top: int = 25) -> str:
        wall = time.monotonic() - self.started
        lines = [f"CPU time per Python thread over {wall:.1f} s (from the kernel, unbiased):"]
        by_name: dict[str, float] = {}
        for (name, _ident), seconds in self.cpu.items():
            by_name[name] = by_name.get(name, 0.0) + seconds
        for name, seconds in sorted(by_name.items(), key=lambda item: -item[1]):
            lines.append(f"   {name:32s} {seconds:7.1f} s  ({seconds / wall:.0%} of one core)")
        lines.append("")
        for name, total in self.samples.most_common():
            busy = total - self.idle[name]
            lines.append(
                f"== thread {name}: {total} stack samples, {busy / total:.0%} in Python "
                f"(biased; the rest idle or in C without Python frames)"
            )
            if not busy:
                continue
            lines.append("   own time (the function on top of the stack), share of all samples:")
            for (path, line, func), count in self.own.get(name, Counter()).most_common(top):
                lines.append(f"   {count / total:6.1%}  {func}  {path}:{line}")
            lines.append("   including callees (the service's code and its libraries' entries):")
            inclusive = self.inclusive.get(name, Counter())
            shown = 0
            for (path, line, func), count in inclusive.most_common():
                if not path.startswith(("dembrane/", "sqlalchemy/", "aiohttp/", "grpc/")):
                    continue
                lines.append(f"   {count / total:6.1%}  {func}  {path}:{line}")
                shown += 1
                if shown >= top:
                    break
        return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) < 4 or sys.argv[1] not in ("cprofile", "sample"):
        print(
            "usage: python -m bench.profiled {cprofile,sample} OUT COMMAND [ARGS...]",
            file=sys.stderr,
        )
        return 2
    mode, out, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    from dembrane.webhooks.cli import main as cli_main

    if mode == "sample":
        sampler = Sampler()
        started = time.monotonic()
        sampler.start()
        try:
            return cli_main(argv)
        finally:
            sampler.stopping.set()
            sampler.join()
            seconds = time.monotonic() - started
            usage = resource.getrusage(resource.RUSAGE_SELF)
            header = (
                f"sampled every {sampler.interval * 1000:g} ms for {seconds:.1f} s; the whole "
                f"process used {usage.ru_utime + usage.ru_stime:.1f} s of CPU "
                f"({usage.ru_utime:.1f} s user, {usage.ru_stime:.1f} s system)\n"
            )
            Path(f"{out}.txt").write_text(header + sampler.report())

    _profile_threads()
    profile = cProfile.Profile()
    profile.enable()
    try:
        return cli_main(argv)
    finally:
        profile.disable()
        pstats.Stats(profile).dump_stats(f"{out}.loop.prof")
        with _lock:
            # Executor threads have exited by now (the store shuts its pool down on stop).
            threads = list(_thread_profiles)
        if threads:
            store = pstats.Stats(threads[0])
            for thread_profile in threads[1:]:
                store.add(thread_profile)
            store.dump_stats(f"{out}.store.prof")


if __name__ == "__main__":
    sys.exit(main())
