"""The service under test, run as a deployment runs it: its own process, settings from the env.

``ServiceProcess`` starts ``dembrane-webhooks serve --no-gateway`` (or ``worker``) with
``WEBHOOKS_*`` variables, waits until gRPC health says SERVING, and stops it with SIGTERM as
an orchestrator would. Any ``WEBHOOKS_*`` variable already set in the benchmark's own
environment passes through unless the scenario sets it, so a lane such as
``WEBHOOKS_SQLITE_SYNCHRONOUS=NORMAL make bench`` needs no flag.

With a profile the process runs under ``bench.profiled``, which writes where the service's
threads spent their time when it exits.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent

# The HS256 secret the benchmark mints its tokens with; the service runs only for the bench.
JWT_SECRET = "bench-only-jwt-secret-never-for-deployments"

_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass(frozen=True)
class ServiceConfig:
    """The settings a scenario runs the service with (the rest are the product's defaults)."""

    database_url: str
    max_concurrency: int = 128
    per_webhook_concurrency: int = 8
    request_timeout: float | None = None
    retry_schedule: str | None = None
    #: ``serve`` runs gRPC and the dispatcher; ``worker`` only the dispatcher.
    command: str = "serve"
    extra_env: dict[str, str] = field(default_factory=dict)

    def environment(self, grpc_port: int) -> dict[str, str]:
        env = {
            "WEBHOOKS_DATABASE_URL": self.database_url,
            "WEBHOOKS_GRPC_PORT": str(grpc_port),
            "WEBHOOKS_HTTP_PORT": "0",
            "WEBHOOKS_BIND": "127.0.0.1",
            "WEBHOOKS_JWT_SECRET": JWT_SECRET,
            "WEBHOOKS_ALLOWED_TARGETS": "127.0.0.0/8",
            "WEBHOOKS_MAX_CONCURRENCY": str(self.max_concurrency),
            "WEBHOOKS_PER_WEBHOOK_CONCURRENCY": str(self.per_webhook_concurrency),
            # A worker has no port to probe, so its start is read from its INFO log line.
            "WEBHOOKS_LOG_LEVEL": "INFO" if self.command == "worker" else "WARNING",
        }
        if self.request_timeout is not None:
            env["WEBHOOKS_REQUEST_TIMEOUT"] = f"{self.request_timeout:g}"
            env["WEBHOOKS_CONNECT_TIMEOUT"] = f"{min(self.request_timeout, 10.0):g}"
        if self.retry_schedule is not None:
            env["WEBHOOKS_RETRY_SCHEDULE"] = self.retry_schedule
        env.update(self.extra_env)
        return env


class ServiceProcess:
    """One running service process."""

    def __init__(
        self, config: ServiceConfig, workdir: Path, *, profile: tuple[str, Path] | None = None
    ) -> None:
        self.config = config
        self.workdir = workdir
        #: The profiler (``cprofile`` or ``sample``) and where its output goes, if any.
        self.profile = profile
        self.grpc_port = free_port()
        self.log_path = workdir / f"service-{self.grpc_port}.log"
        self._process: asyncio.subprocess.Process | None = None
        self.peak_rss_bytes: int | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("The service is not running.")
        return self._process.pid

    def _argv(self) -> list[str]:
        args = [self.config.command]
        if self.config.command == "serve":
            args.append("--no-gateway")
        if self.profile is not None:
            mode, out = self.profile
            return [sys.executable, "-m", "bench.profiled", mode, str(out), *args]
        return [sys.executable, "-m", "dembrane.webhooks.cli", *args]

    async def start(self) -> ServiceProcess:
        env = dict(os.environ)
        env.update(self.config.environment(self.grpc_port))
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                *self._argv(),
                env=env,
                cwd=self.workdir,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        if self.config.command == "serve":
            await self._wait_serving()
        else:
            await self._wait_started()
        return self

    async def _wait_serving(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_alive()
                try:
                    answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                except grpc.aio.AioRpcError:
                    answer = None
                if answer is not None and answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"The service did not become healthy in {_START_TIMEOUT:g} s.\n"
                        + self.log_tail()
                    )
                await asyncio.sleep(0.05)

    async def _wait_started(self) -> None:
        # A worker has no port to probe; the log says when its dispatcher runs.
        deadline = time.monotonic() + _START_TIMEOUT
        while "dispatcher started" not in self.log_path.read_text(errors="replace"):
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError("The worker did not start in time.\n" + self.log_tail())
            await asyncio.sleep(0.05)

    def _check_alive(self) -> None:
        if self._process is not None and self._process.returncode is not None:
            raise RuntimeError(
                f"The service exited with status {self._process.returncode}.\n" + self.log_tail()
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def cpu_seconds(self) -> float | None:
        """CPU time (user and system) the service has used so far, its sender processes
        included."""
        if self._process is None:
            return None
        pids = [self._process.pid, *child_pids(self._process.pid)]
        times = [proc_cpu_seconds(pid) for pid in pids]
        if times[0] is None:
            return None
        return sum(t for t in times if t is not None)

    def memory(self) -> tuple[int | None, int | None]:
        """The service's current and peak resident memory in bytes (Linux ``/proc``), its
        sender processes included (the sum of each process's figure)."""
        if self._process is None:
            return None, None
        return _memory_with_children(self._process.pid)

    async def stop(self) -> None:
        """SIGTERM, wait for a graceful exit, SIGKILL if it does not come."""
        process, self._process = self._process, None
        if process is None:
            return
        _, peak = _memory_with_children(process.pid)
        if peak is not None:
            self.peak_rss_bytes = peak
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), _STOP_TIMEOUT)
            except TimeoutError:
                process.kill()
                await process.wait()


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the service's sender processes)."""
    children: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            children.append(int(entry.name))
    return children


def _memory_with_children(pid: int) -> tuple[int | None, int | None]:
    current, peak = proc_memory(pid)
    for child in child_pids(pid):
        child_current, child_peak = proc_memory(child)
        if current is not None and child_current is not None:
            current += child_current
        if peak is not None and child_peak is not None:
            peak += child_peak
    return current, peak


def proc_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of a process, from ``/proc/<pid>/stat``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces; the fields after it are fixed.
    fields = text.rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_memory(pid: int) -> tuple[int | None, int | None]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of a process in bytes, from ``/proc/<pid>/status``."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None, None
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values.get("VmRSS"), values.get("VmHWM")
