"""How much of the machine's CPU time its host gave to someone else while a figure was taken.

On a virtual machine the hypervisor may run other guests on the cores this one believes it
has; Linux counts the time its runnable vCPUs waited for that as *steal* (``/proc/stat``).
A run on a 2-core guest that lost a third of its CPU time to steal measures a machine of
about 1.3 cores, and no comparison with a run minutes away from it means much. Every
figure the service's speed decides therefore carries the share stolen while it was taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Of the ``cpu`` line's fields (user, nice, system, idle, iowait, irq, softirq, steal,
#: guest, guest_nice), those that add up to the time that passed; guest time is already
#: counted in user time.
_COUNTED_FIELDS = 8
_STEAL_FIELD = 7


@dataclass(frozen=True)
class MachineClock:
    """The machine's CPU time so far, in the kernel's ticks, all cores together."""

    total: int
    stolen: int

    @classmethod
    def read(cls, path: Path = Path("/proc/stat")) -> MachineClock | None:
        """The clock now; None where the system keeps no such count (not Linux)."""
        try:
            with path.open() as stat:
                first = stat.readline().split()
        except OSError:
            return None
        if len(first) <= _COUNTED_FIELDS or first[0] != "cpu":
            return None
        try:
            fields = [int(value) for value in first[1 : _COUNTED_FIELDS + 1]]
        except ValueError:
            return None
        return cls(total=sum(fields), stolen=fields[_STEAL_FIELD])

    def stolen_share_since(self, earlier: MachineClock | None) -> float | None:
        """The share of the CPU time since ``earlier`` that the host took (0 to 1)."""
        if earlier is None or self.total <= earlier.total:
            return None
        return max(0, self.stolen - earlier.stolen) / (self.total - earlier.total)


def stolen_share(before: MachineClock | None, after: MachineClock | None) -> float | None:
    """The share of the CPU time between two readings that the host took; None when either
    reading is missing."""
    return None if after is None else after.stolen_share_since(before)


def describe_stolen(share: float | None) -> str:
    """``share`` as the notes put it, or "" when it is unknown."""
    if share is None:
        return ""
    return f"{share * 100:.0f} % of the machine's CPU time was taken by its host (steal)"
