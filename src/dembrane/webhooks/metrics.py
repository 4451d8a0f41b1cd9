"""Prometheus metrics: what was published, what was sent, how it went.

The counters live in the process's default registry, next to the client library's own
process and Python collectors, and are exposed in the text format at ``GET /metrics`` of the
REST gateway (``serve``) or on ``WEBHOOKS_METRICS_PORT`` (any command, ``worker`` included).
No label carries a project, webhook or event id: the series stay few whatever the traffic.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

__all__ = [
    "ATTEMPTS",
    "ATTEMPT_SECONDS",
    "CONTENT_TYPE",
    "DELIVERIES_FINISHED",
    "DELIVERIES_QUEUED",
    "EVENTS_PUBLISHED",
    "IN_FLIGHT",
    "exposition",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST

EVENTS_PUBLISHED = Counter(
    "webhooks_events_published",
    "Events stored by publish calls (repeats of a stored id not counted).",
)
DELIVERIES_QUEUED = Counter(
    "webhooks_deliveries_queued",
    "Deliveries made due to be sent: new ones of published events, and failed ones sent "
    "again by a recovery or a manual retry.",
)
ATTEMPTS = Counter(
    "webhooks_delivery_attempts",
    "HTTP requests made to receivers, by result.",
    ["result"],
)
ATTEMPT_SECONDS = Histogram(
    "webhooks_delivery_attempt_seconds",
    "How long receivers took to answer (or to fail).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
DELIVERIES_FINISHED = Counter(
    "webhooks_deliveries_finished",
    "Deliveries that reached a final status: succeeded, failed or skipped.",
    ["status"],
)
IN_FLIGHT = Gauge(
    "webhooks_deliveries_in_flight",
    "Requests to receivers under way in this process's dispatcher.",
)

# Children looked up once: the hot path only increments.
ATTEMPT_SUCCESS = ATTEMPTS.labels(result="success")
ATTEMPT_FAILURE = ATTEMPTS.labels(result="failure")
SKIPPED = DELIVERIES_FINISHED.labels(status="skipped")
FAILED = DELIVERIES_FINISHED.labels(status="failed")


def exposition() -> bytes:
    """Every metric of this process in the Prometheus text format."""
    return generate_latest()
