"""Entry point of ``python -m bench``; see ``bench.cli`` for the flags."""

from __future__ import annotations

import os
import sys

# The benchmark starts processes while its gRPC channels are busy; gRPC's fork handlers have
# nothing to do for a fork that is followed by exec, and only warn about it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

# Imported after the variable is set: gRPC reads it when it loads.
from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
