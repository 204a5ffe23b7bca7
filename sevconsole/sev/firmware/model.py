"""`SevFirmware`: one PSP, its commands gathered from the modules that define them."""

from __future__ import annotations

from .guests import GuestCommands
from .launch import LaunchCommands
from .platform import PlatformCommands
from .receive import ReceiveCommands
from .send import SendCommands


class SevFirmware(PlatformCommands, LaunchCommands, GuestCommands, SendCommands, ReceiveCommands):
    """One PSP. See the package docstring for the commands and the rules.

    Keyword arguments: `ask_key`, `ask`, `ark` (the AMD root its CEK chains to), `api`
    ((major, minor)), `build`, `es` (SEV-ES configured), `oca_key` (an external owner's OCA,
    else self-owned), `timing` (a `PspTiming` cost model: `busy_s` adds it up), `rng`,
    `clock` (the log's timestamps; wall clock by default), `max_asid`.
    """
