"""Transitional: lab/host.py still imports `PspTiming` from here. Its home is
`sevconsole.sev.firmware` (the package); remove this module once host.py imports it from there."""

from .firmware.results import PspTiming

__all__ = ["PspTiming"]
