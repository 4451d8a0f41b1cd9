"""The REST gateway: a thin translation of HTTP routes onto the gRPC API."""
