"""How the service's processes set up Python's cyclic garbage collector once started."""

from __future__ import annotations

import gc

#: Container objects allocated (net of those freed) between two collections of the youngest
#: generation; Python's default is 700. A process under load keeps a steady set of objects
#: alive (the calls and requests in flight), and at the default every collection walked that
#: set again, a few thousand times a second, moving it into older generations to be walked
#: there too. At this threshold collections come a fourteenth as often, and most objects
#: made for one call are freed by their reference counts before any collection sees them.
YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Set aside what start-up built, and collect the young generation less often.

    What exists once the process is ready lives as long as the process: frozen, later
    collections never walk it again, which shortens their pauses under load.
    """
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
