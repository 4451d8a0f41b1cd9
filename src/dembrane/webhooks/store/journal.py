"""Outcomes kept in a file from the moment they are known until the store has them.

The dispatcher writes outcomes to the store together, every 50 ms under load: one
transaction for many deliveries is what lets a small machine deliver thousands a second.
Outcomes waiting for that write would die with the process (``kill -9``, the kernel's
out-of-memory killer): the receivers that answered them would get those deliveries again,
and the log would not show the attempts they answered.

So each outcome with an attempt is also appended to a journal file beside the SQLite
database as soon as it is known. The operating system keeps what was written when the
process dies, so only a power cut or a crash of the machine itself can still lose it; the
journal is not synced, which would cost a disk flush per turn of the event loop.

The journal is a series of segments, ``<database>-outcomes.<n>``. Once the segment in use
holds ``SEGMENT_BYTES``, the next write of outcomes to the store seals it (later outcomes go
to a new one) and, when that write commits, deletes it. Files are made and deleted that
rarely because each is a change to the folder, which the file system may make wait behind
the database's disk syncs: a new segment per write of outcomes (twenty a second) lengthened
publish acknowledgements. So a segment also holds outcomes the store has. The next start
records what the segments hold before it takes over the leases of the process before,
through the same ownership check as every write of outcomes plus one more: a row is changed
only while it is still leased to the process that made the attempt and has no later attempt
recorded. An outcome the store already has is skipped, never written twice.

On SQLite the journal lies beside the database, and the file's delivery lock makes it one
process's own and the next process to hold the lock the one to replay it. Replicas on
PostgreSQL have no such file: they keep a journal only where ``WEBHOOKS_OUTCOME_JOURNAL``
names one, under a lock of its own. A replica replays it when it starts again; rows whose
leases ran out meanwhile went to other replicas, and the ownership check leaves them be.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
from collections.abc import Sequence

import orjson

from dembrane.webhooks.store.outbox import AttemptRecord, DeliveryResult, DeliveryState

__all__ = ["OutcomeJournal", "read_journal", "remove_journal"]

log = logging.getLogger(__name__)

#: The size at which a segment is sealed, to be deleted once the store has its outcomes.
SEGMENT_BYTES = 4 * 1024 * 1024


def _segments(prefix: str) -> list[tuple[int, str]]:
    """The journal's segments on disk, oldest first."""
    found = []
    for path in glob.glob(glob.escape(prefix) + ".*"):
        suffix = path[len(prefix) + 1 :]
        if suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found)


def _encode(result: DeliveryResult) -> list[object]:
    return [
        result.delivery_id,
        result.webhook_id,
        result.status.value,
        result.attempt_count,
        result.next_attempt_at,
        result.last_error,
        result.disable_reason,
        result.lost_attempts,
        [
            [
                a.number,
                a.attempted_at,
                a.status_code,
                a.latency_ms,
                a.response_body,
                a.error,
                a.success,
                a.lost,
            ]
            for a in result.attempts
        ],
    ]


def _decode(fields: Sequence[object]) -> DeliveryResult:
    (
        delivery_id,
        webhook_id,
        status,
        attempt_count,
        next_attempt_at,
        last_error,
        disable_reason,
        lost_attempts,
        attempts,
    ) = fields
    if not isinstance(attempts, list):
        raise TypeError("an outcome's attempts are a list")
    return DeliveryResult(
        delivery_id=str(delivery_id),
        webhook_id=str(webhook_id),
        status=DeliveryState(str(status)),
        attempt_count=int(attempt_count),  # type: ignore[call-overload]
        next_attempt_at=None if next_attempt_at is None else float(next_attempt_at),  # type: ignore[arg-type]
        attempts=tuple(
            AttemptRecord(
                number=int(a[0]),
                attempted_at=float(a[1]),
                status_code=None if a[2] is None else int(a[2]),
                latency_ms=float(a[3]),
                response_body=str(a[4]),
                error=str(a[5]),
                success=bool(a[6]),
                lost=bool(a[7]),
            )
            for a in attempts
        ),
        last_error=str(last_error),
        disable_reason=None if disable_reason is None else str(disable_reason),
        lost_attempts=int(lost_attempts),  # type: ignore[call-overload]
    )


def read_journal(prefix: str) -> list[tuple[str, DeliveryResult]]:
    """Every outcome the journal at ``prefix`` holds, in the order they were written, with
    the dispatcher that leased its row.

    A line cut short (the process died while writing it) or otherwise unreadable is left
    out: the delivery it describes comes due again when its lease is taken over. Lines end
    at a newline byte only, and each is decoded on its own: text in a line may hold other
    line separators (U+2028, NEL), and a line cut short may end inside a character.
    """
    entries: list[tuple[str, DeliveryResult]] = []
    for _number, path in _segments(prefix):
        try:
            with open(path, "rb") as file:
                lines = file.read().split(b"\n")
        except OSError as error:
            log.warning("could not read the outcome journal %s: %s", path, error)
            continue
        owner = ""
        for line in lines:
            if not line:
                continue
            try:
                fields = json.loads(line)
                if isinstance(fields, dict):
                    owner = str(fields["owner"])
                elif owner:
                    entries.append((owner, _decode(fields)))
            except (ValueError, TypeError, KeyError):
                continue
    return entries


def remove_journal(prefix: str) -> None:
    """Delete every segment of the journal at ``prefix``."""
    for _number, path in _segments(prefix):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class OutcomeJournal:
    """The journal a running dispatcher appends to (see the module's note).

    A write that fails (a full disk, a folder taken away) stops the journal for the rest of
    the run, with one line in the log: delivery goes on as without one.
    """

    def __init__(self, prefix: str, owner: str) -> None:
        self.prefix = prefix
        self._owner = owner
        existing = _segments(prefix)
        self._number = existing[-1][0] if existing else 0
        #: The segments this journal made and has not deleted yet, oldest first.
        self._made: list[int] = []
        self._fd: int | None = None
        #: Bytes written to the segment in use.
        self._size = 0
        self._pending: list[bytes] = []
        self.broken = False

    def append(self, result: DeliveryResult) -> None:
        """Queue a result with attempts for the next ``write``.

        orjson writes a line in a tenth of the standard module's time (one per delivery, on
        the event loop), with the same numbers read back; it writes text as UTF-8 where the
        standard module escapes it, which ``read_journal`` reads line by line as bytes.
        """
        if self.broken:
            return
        fields = _encode(result)
        try:
            line = orjson.dumps(fields)
        except TypeError:  # orjson.JSONEncodeError: text with a lone surrogate
            line = json.dumps(fields, separators=(",", ":")).encode()
        self._pending.append(line)

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def write(self) -> None:
        """Append what was queued to the segment in use, in one write."""
        if not self._pending or self.broken:
            self._pending.clear()
            return
        lines, self._pending = self._pending, []
        try:
            if self._fd is None:
                self._number += 1
                self._fd = os.open(
                    f"{self.prefix}.{self._number}",
                    os.O_CREAT | os.O_WRONLY | os.O_APPEND | os.O_TRUNC,
                    0o600,
                )
                self._made.append(self._number)
                self._size = 0
                lines.insert(0, json.dumps({"owner": self._owner}).encode())
            data = b"\n".join(lines) + b"\n"
            if os.write(self._fd, data) < len(data):
                # A full disk: what follows would run on from a line cut short.
                raise OSError("the disk took only part of a write")
            self._size += len(data)
        except OSError as error:
            self._fail(error)

    def mark(self) -> int | None:
        """Write what is queued, for a write of outcomes to the store that begins now. When
        the segment in use is full, seal it (outcomes from now on go to a new one) and return
        its number, to pass to ``committed`` once the store has taken everything up to here.
        """
        self.write()
        if self._size < SEGMENT_BYTES:
            return None
        return self.seal()

    def seal(self) -> int:
        """End the segment in use; outcomes written from now on go to the next one. Returns
        the number of the last segment sealed, for ``committed``."""
        self.write()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        return self._number

    def committed(self, sealed: int) -> None:
        """The store has every outcome of the segments up to ``sealed``: delete them."""
        while self._made and self._made[0] <= sealed:
            with contextlib.suppress(OSError):
                os.unlink(f"{self.prefix}.{self._made[0]}")
            del self._made[0]

    def close(self, *, keep: bool) -> None:
        """Stop writing; keep the segments (outcomes the store does not have) or delete them."""
        sealed = self.seal()
        if not keep:
            self.committed(sealed)

    def _fail(self, error: OSError) -> None:
        self.broken = True
        self._pending.clear()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        log.warning(
            "could not write the outcome journal %s (%s); outcomes now wait for the store "
            "alone, and a crash loses those of its last moments",
            self.prefix,
            error,
        )
