"""The latency scenario's load generator: a small Go program (``bench/loadgen``).

The benchmark shares two cores with the service. A Python asyncio gRPC client spends about
0.6 ms of CPU per call, as much as the service's own event loop, and at 500 calls a second
that is a third of a core taken from the service while its latency is measured. The Go
program sends the same requests, serialized here, for a tenth of that.

It is built with the machine's Go toolchain into ``.bench-cache/`` at the repository's root
(Go's build cache makes later builds take a moment). Without Go, ``build`` says why and the
scenario falls back to the Python client.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_SOURCE = Path(__file__).resolve().parent / "loadgen"
_BINARY = _SOURCE.parent.parent / ".bench-cache" / "loadgen"

PUBLISH_EVENT = "/dembrane.webhooks.v1.EventService/PublishEvent"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


@dataclass
class Call:
    """One call: when it was sent (Unix seconds) and how long its answer took (seconds)."""

    sent: float
    seconds: float


@dataclass
class LoadRun:
    calls: list[Call]
    #: Calls started per second, as the program managed.
    offered: float


def build() -> tuple[Path | None, str]:
    """Build the program; return its path and how it was found, or None and why not."""
    go = shutil.which("go")
    if go is None:
        return None, "no Go toolchain on the PATH"
    _BINARY.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(  # noqa: S603 - the Go toolchain found on the PATH
            [go, "build", "-o", str(_BINARY), "."],
            cwd=_SOURCE,
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "CGO_ENABLED": "0"},
        )
    except subprocess.CalledProcessError as error:
        detail = (error.stderr or "").strip().splitlines()
        return None, f"go build failed: {detail[-1] if detail else error}"
    except subprocess.TimeoutExpired:
        return None, "go build took over 10 minutes"
    return _BINARY, f"Go, built from {_SOURCE.name}/"


async def run(
    binary: Path,
    target: str,
    method: str,
    requests: Sequence[bytes],
    rate: float,
    authorization: str | None = None,
) -> LoadRun:
    """Send ``requests`` (serialized) to ``method`` at ``rate`` per second, open-loop.

    Raises ``RuntimeError`` when the program fails or any call is not answered OK.
    """
    framed = b"".join(struct.pack(">I", len(body)) + body for body in requests)
    env = dict(os.environ)
    env.pop("LOADGEN_AUTHORIZATION", None)
    if authorization is not None:
        env["LOADGEN_AUTHORIZATION"] = authorization
    process = await asyncio.create_subprocess_exec(
        str(binary),
        "-target",
        target,
        "-method",
        method,
        "-rate",
        f"{rate:g}",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await process.communicate(framed)
    if process.returncode != 0:
        raise RuntimeError(f"the load generator failed: {err.decode(errors='replace').strip()}")
    lines = out.decode().splitlines()
    if not lines or not lines[-1].startswith("offered "):
        raise RuntimeError("the load generator's output ended early")
    offered = float(lines[-1].split()[1])
    calls: list[Call] = []
    failed: dict[int, int] = {}
    for line in lines[:-1]:
        sent, nanos, code = (int(part) for part in line.split())
        if code != 0:
            failed[code] = failed.get(code, 0) + 1
        calls.append(Call(sent / 1e9, nanos / 1e9))
    if failed:
        codes = ", ".join(f"{count} with code {code}" for code, count in sorted(failed.items()))
        raise RuntimeError(f"{sum(failed.values())} of {len(calls)} calls failed: {codes}")
    if len(calls) != len(requests):
        raise RuntimeError(f"the load generator reported {len(calls)} of {len(requests)} calls")
    return LoadRun(calls, offered)
