"""Benchmarks of the webhook service: ``python -m bench`` (or ``make bench``).

Each scenario starts the service as a real deployment would run it (``dembrane-webhooks
serve`` in its own process, settings from ``WEBHOOKS_*``), drives it over gRPC from this
process, and counts what a lean receiver in a third process gets. Every figure is reported
with a baseline measured in the same run, so a ratio means the same on any machine.
"""
