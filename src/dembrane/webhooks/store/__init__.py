"""Persistence: SQLModel tables, engine set-up and queries. Knows nothing of protobuf."""
