"""Signing, retry policy, the HTTP sender and the dispatcher. Knows nothing of protobuf."""
