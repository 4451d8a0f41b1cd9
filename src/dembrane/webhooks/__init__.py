"""dembrane-webhooks: durable, signed webhook delivery for the Dembrane platform."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("dembrane-webhooks")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
