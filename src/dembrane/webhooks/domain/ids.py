"""Identifiers: a type prefix and a time-ordered, URL-safe random part.

The time comes first so identifiers created later sort later, which keeps "newest first"
listings stable when two rows share a creation time. Ids are made on the publish path (one
per delivery), so they are plain hexadecimal, formatted in C.
"""

from __future__ import annotations

import random
import time


def new_id(prefix: str) -> str:
    """A new identifier such as ``dlv_0194f3a2c1d07e5b...``: 32 hex digits after the prefix.

    48 bits of milliseconds since the epoch, then 80 random bits. Ids must be unique, not
    unguessable (nothing is authorized by knowing one), so the random part comes from the
    fast generator, which stays in C and holds the interpreter lock, rather than a system
    call per id; the ``random`` module reseeds it in forked children.
    """
    millis = time.time_ns() // 1_000_000
    return f"{prefix}_{millis:012x}{random.getrandbits(80):020x}"
