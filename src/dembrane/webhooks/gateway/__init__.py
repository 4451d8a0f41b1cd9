"""The REST gateway: a thin translation of HTTP routes onto the gRPC API.

:func:`create_app` builds the aiohttp application and :func:`run_gateway` serves it; the
routes come from the ``google.api.http`` annotations of ``webhook_service.proto``.
"""

from dembrane.webhooks.gateway.app import bound_port, create_app, run_gateway

__all__ = ["bound_port", "create_app", "run_gateway"]
