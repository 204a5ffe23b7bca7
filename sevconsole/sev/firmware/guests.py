"""Guest management (ACTIVATE, DEACTIVATE, GUEST_STATUS, DECOMMISSION) and the guest CPU's view.

A SENT guest accepts DECOMMISSION, GUEST_STATUS and DEACTIVATE only: no second runnable copy.
ACTIVATE takes an ASID in 1..max_asid that no other guest holds; guest commands do not need it.
`guest_write`/`guest_read` are not PSP commands (not logged): the guest's own CPU reading and
writing its encrypted memory, in LUPDATE, LSECRET, RUNNING and SUPDATE.
"""

from __future__ import annotations

import operator

from ..status import Command, PlatformState, Status
from .command import guest_command
from .guest import (
    ACTIVATABLE,
    ANY_STATE,
    GUEST_CPU_STATES,
    GuestAccessError,
    GuestContext,
    span_problem,
)
from .results import GuestStatusResult, Refusal, Result
from .state import FirmwareState


class GuestCommands(FirmwareState):
    @guest_command(Command.ACTIVATE, Result, ACTIVATABLE)
    def activate(self, guest: GuestContext, asid: int) -> Result:
        a = operator.index(asid)
        if not 1 <= a <= self.max_asid:
            raise Refusal(Status.INVALID_ASID, f"ASID {a} is outside 1..{self.max_asid}")
        owner = next(
            (g.handle for g in self._guests.values() if g.asid == a and g is not guest), None
        )
        if owner is not None:
            raise Refusal(Status.ASID_OWNED, f"ASID {a} is in use by guest {owner}")
        guest.asid = a
        return Result(Status.SUCCESS)

    @guest_command(Command.DEACTIVATE, Result, ANY_STATE)
    def deactivate(self, guest: GuestContext) -> Result:
        guest.asid = 0
        return Result(Status.SUCCESS)

    @guest_command(Command.GUEST_STATUS, GuestStatusResult, ANY_STATE)
    def guest_status(self, guest: GuestContext) -> GuestStatusResult:
        return GuestStatusResult(Status.SUCCESS, guest.policy.to_u32(), guest.asid, guest.state)

    @guest_command(Command.DECOMMISSION, Result, ANY_STATE)
    def decommission(self, guest: GuestContext) -> Result:
        del self._guests[guest.handle]
        if not self._guests:
            self._state = PlatformState.INIT
        return Result(Status.SUCCESS)

    # ------------------------------------------------------------------ the guest CPU's view

    def _cpu_guest(self, handle: int, gpa: int, length: int) -> GuestContext:
        try:
            guest = self._guests.get(operator.index(handle))
            gpa, length = operator.index(gpa), operator.index(length)
        except TypeError:
            raise GuestAccessError(
                f"guest {handle!r}: handle, address and length must be integers"
            ) from None
        if guest is None:
            raise GuestAccessError(f"guest {handle} does not exist on this platform")
        if guest.state not in GUEST_CPU_STATES:
            raise GuestAccessError(f"guest {handle} is {guest.state.name}: its CPU cannot run here")
        why = (
            span_problem(guest, gpa, length)
            if length % 16 == 0
            else f"length {length} is not a multiple of 16"
        )
        if why:
            raise GuestAccessError(f"guest {handle}: {why}")
        return guest

    def guest_write(self, handle: int, gpa: int, plaintext: bytes) -> None:
        """The guest writes its private memory: stored encrypted with its VEK (not a PSP command)."""
        guest = self._cpu_guest(handle, gpa, len(plaintext))
        guest.memory[gpa : gpa + len(plaintext)] = guest.cipher.encrypt(gpa, bytes(plaintext))

    def guest_read(self, handle: int, gpa: int, length: int) -> bytes:
        """The guest reads its private memory: decrypted with its VEK (not a PSP command)."""
        guest = self._cpu_guest(handle, gpa, length)
        return guest.cipher.decrypt(gpa, guest.memory[gpa : gpa + length].tobytes())
