"""Simulated SEV hypervisor hosts. Other machines, as far as the console knows: reached over SSH and QMP only.

Only `sevconsole.cli` (and tests) import this package; the console itself reaches a lab host
over SSH and QMP like any other host.
"""

from .control import Lab, LabError, RunningHost

__all__ = ["Lab", "LabError", "RunningHost"]
