"""Data sets as in-memory Lightning data modules, each describing itself with a DataSpec."""

from dlrun.data.spec import DataSpec

__all__ = ["DataSpec"]
