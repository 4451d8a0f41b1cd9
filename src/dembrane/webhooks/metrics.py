"""Prometheus metrics: what was published, what was sent, how it went.

The hot paths (every publish call, every request to a receiver) only add to plain numbers
in ``STATS``; a collector turns them into metrics when ``/metrics`` is read. The client
library's own metric objects take a lock per update, which at thousands of deliveries a
second cost a visible share of the event loop. The process and Python collectors of the
default registry come along, and everything is exposed in the text format at
``GET /metrics`` of the REST gateway (``serve``) or on ``WEBHOOKS_METRICS_PORT`` (``serve``
and ``worker``; a ``gateway`` alone has no figures of its own to show). No label carries a
project, webhook or event id: the series stay few whatever the traffic.

Every update happens on the event loop's thread, so plain additions are safe.
"""

from __future__ import annotations

import bisect
import json
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "STATS", "Stats", "exposition", "serve_metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Upper bounds (seconds) of the answer-time histogram's buckets.
ANSWER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Stats:
    """The process's running totals."""

    def __init__(self) -> None:
        self.events_published = 0
        self.deliveries_queued = 0
        self.attempts_success = 0
        self.attempts_failure = 0
        #: Requests whose outcome the service lost itself (no answer to time or count).
        self.attempts_lost = 0
        self.finished = {"succeeded": 0, "failed": 0, "skipped": 0}
        self.in_flight = 0
        #: The store's backlog when last read (None before the first reading).
        self.pending: int | None = None
        self.oldest_due_seconds = 0.0
        #: The process ids of this process's sender processes, when it has any.
        self.sender_pids: Callable[[], list[int]] | None = None
        # One count per bucket of ANSWER_BUCKETS, plus one for answers slower than all.
        self._answer_counts = [0] * (len(ANSWER_BUCKETS) + 1)
        self._answer_sum = 0.0

    def attempt(self, success: bool, seconds: float) -> None:
        """A request to a receiver ended after ``seconds``."""
        if success:
            self.attempts_success += 1
        else:
            self.attempts_failure += 1
        self._answer_counts[bisect.bisect_left(ANSWER_BUCKETS, seconds)] += 1
        self._answer_sum += seconds

    def backlog(self, pending: int, oldest_due_seconds: float) -> None:
        """The store's backlog as just read: deliveries pending, and how long the
        longest-waiting due one has been due."""
        self.pending = pending
        self.oldest_due_seconds = max(0.0, oldest_due_seconds)

    def answer_buckets(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative ``(le, count)`` pairs ending with ``+Inf``, and the sum of seconds."""
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*ANSWER_BUCKETS, float("inf")), self._answer_counts, strict=True):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return buckets, self._answer_sum


STATS = Stats()


class _StatsCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        stats = STATS
        yield CounterMetricFamily(
            "webhooks_events_published",
            "Events stored by publish calls (repeats of a stored id not counted).",
            value=stats.events_published,
        )
        yield CounterMetricFamily(
            "webhooks_deliveries_queued",
            "Deliveries made due to be sent: new ones of published events, and failed ones "
            "sent again by a recovery or a manual retry.",
            value=stats.deliveries_queued,
        )
        attempts = CounterMetricFamily(
            "webhooks_delivery_attempts",
            "HTTP requests made to receivers, by result: success, failure, or lost (a sender "
            "process of the service stopped, or stopping cut the request off, so the receiver "
            "may or may not have it).",
            labels=["result"],
        )
        attempts.add_metric(["success"], stats.attempts_success)
        attempts.add_metric(["failure"], stats.attempts_failure)
        attempts.add_metric(["lost"], stats.attempts_lost)
        yield attempts
        finished = CounterMetricFamily(
            "webhooks_deliveries_finished",
            "Deliveries that reached a final status: succeeded, failed or skipped.",
            labels=["status"],
        )
        for status, count in stats.finished.items():
            finished.add_metric([status], count)
        yield finished
        buckets, seconds = stats.answer_buckets()
        yield HistogramMetricFamily(
            "webhooks_delivery_attempt_seconds",
            "How long receivers took to answer (or to fail).",
            buckets=buckets,
            sum_value=seconds,
        )
        yield GaugeMetricFamily(
            "webhooks_deliveries_in_flight",
            "Requests to receivers under way in this process's dispatcher.",
            value=stats.in_flight,
        )
        if stats.sender_pids is not None:
            yield from _sender_figures(stats.sender_pids())
        if stats.pending is not None:
            yield GaugeMetricFamily(
                "webhooks_deliveries_pending",
                "Deliveries in the store waiting to be sent or sent again (all replicas'), "
                "as last read (every 15 s).",
                value=stats.pending,
            )
            yield GaugeMetricFamily(
                "webhooks_oldest_due_delivery_seconds",
                "How long the delivery that has waited longest since it came due has waited "
                "(0 when none is due), as last read (every 15 s).",
                value=stats.oldest_due_seconds,
            )


def _resident_bytes(pid: int) -> int | None:
    """A process's resident memory, from Linux's ``/proc`` (None elsewhere, or once gone)."""
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _sender_figures(pids: list[int]) -> Iterator[Metric]:
    """The sender processes beside this one: the ``process_*`` figures cover only this one."""
    yield GaugeMetricFamily(
        "webhooks_sender_processes",
        "Sender processes running beside this process.",
        value=len(pids),
    )
    sizes = [size for size in map(_resident_bytes, pids) if size is not None]
    if sizes:
        yield GaugeMetricFamily(
            "webhooks_sender_resident_memory_bytes",
            "Resident memory of the sender processes together.",
            value=sum(sizes),
        )


REGISTRY.register(_StatsCollector())


def exposition() -> bytes:
    """Every metric of this process in the Prometheus text format."""
    return generate_latest()


class _QuietHandler(WSGIRequestHandler):
    """Scrapes come every few seconds; they are not worth a log line each."""

    def log_message(self, format: str, *args: Any) -> None:
        return


def serve_metrics(
    port: int, host: str, health: Callable[[], str | None] | None = None
) -> WSGIServer:
    """Serve ``GET /metrics`` on ``host:port`` from a thread. Stop it with ``shutdown()``.

    With ``health`` (what stops the process from doing its work now, or None), ``GET /healthz``
    answers 200 ``{"status": "ok"}`` or 503 with that sentence: the probe of a ``worker``,
    which has no REST port. Any other path is 404, so a probe pointed at the wrong path fails.
    """
    metrics_app = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz" and health is not None:
            return _health_answer(health(), start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        where = "/metrics and /healthz" if health is not None else "/metrics"
        return [f"Not found; this port serves {where}.\n".encode()]

    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
    server: WSGIServer = make_server(host, port, app, server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def _health_answer(problem: str | None, start_response: Any) -> list[bytes]:
    """The answer of ``/healthz``, shaped as the REST gateway's."""
    if problem is None:
        status, body = "200 OK", {"status": "ok"}
    else:
        status, body = "503 Service Unavailable", {"status": "unavailable", "detail": problem}
    payload = json.dumps(body).encode()
    start_response(
        status,
        [
            ("Content-Type", "application/json; charset=utf-8"),
            ("Content-Length", str(len(payload))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [payload]
