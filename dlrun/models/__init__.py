"""Networks, one module per family, each built from a DataSpec."""

from dlrun.models.base import Network, build_network

__all__ = ["Network", "build_network"]
