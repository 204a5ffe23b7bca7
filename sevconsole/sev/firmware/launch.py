"""The LAUNCH commands: a guest is created, its initial memory encrypted and measured.

LAUNCH_START needs the platform INIT or WORKING and applies the policy rules RECEIVE_START
applies (reserved bits, API version, ES support, key sharing). LAUNCH_MEASURE returns 48
bytes: HMAC-SHA256(TIK, 0x04 || api major || api minor || build || policy || SHA-256 of the
launched data || mnonce) || mnonce.
"""

from __future__ import annotations

import hmac
import operator

from ..policy import GuestPolicy
from ..status import Command, GuestState, Status
from .command import guest_command, platform_command
from .guest import (
    IN_LSECRET,
    IN_LUPDATE,
    MNONCE_LEN,
    VMSA_LEN,
    GuestContext,
    as_memory,
    check_span,
    check_vmsa,
)
from .platform import INIT_OR_WORKING
from .results import HandleResult, MeasureResult, Refusal, Result
from .state import FirmwareState


class LaunchCommands(FirmwareState):
    @platform_command(Command.LAUNCH_START, HandleResult, INIT_OR_WORKING)
    def launch_start(self, policy: int, memory: object, handle: int = 0) -> HandleResult:
        pol = GuestPolicy.from_u32(operator.index(policy))
        self._check_policy(pol)
        view = as_memory(memory)
        if view is None:
            raise Refusal(
                Status.INVALID_PARAM, "guest memory must be a writable contiguous byte buffer"
            )
        vek = self._new_vek(operator.index(handle), pol)
        guest = self._attach(pol, view, vek, GuestState.LUPDATE)
        guest.tek, guest.tik = self._rng(16), self._rng(16)  # the launch session's keys
        return HandleResult(Status.SUCCESS, guest.handle)

    @guest_command(Command.LAUNCH_UPDATE_DATA, Result, IN_LUPDATE)
    def launch_update_data(self, guest: GuestContext, gpa: int, length: int) -> Result:
        """Encrypt [gpa, gpa+length) in place with the VEK and add it to the launch digest."""
        start, n = operator.index(gpa), operator.index(length)
        if n <= 0 or n % 16:
            raise Refusal(Status.INVALID_LENGTH, f"length {n} must be a non-zero multiple of 16")
        region = check_span(guest, start, n)
        guest.launch_digest.update(region)
        guest.cipher.encrypt(start, region, out=region)  # in place, like the real command
        return Result(Status.SUCCESS)

    @guest_command(Command.LAUNCH_UPDATE_VMSA, Result, IN_LUPDATE)
    def launch_update_vmsa(self, guest: GuestContext, gpa: int, length: int = VMSA_LEN) -> Result:
        """An SEV-ES guest's VMSA page: encrypted in place and measured, like launch data."""
        start, n = operator.index(gpa), operator.index(length)
        check_vmsa(guest, start, n)
        region = check_span(guest, start, n)
        guest.launch_digest.update(region)
        guest.cipher.encrypt(start, region, out=region)
        return Result(Status.SUCCESS)

    @guest_command(Command.LAUNCH_MEASURE, MeasureResult, IN_LUPDATE)
    def launch_measure(self, guest: GuestContext) -> MeasureResult:
        mnonce = self._rng(MNONCE_LEN)
        major, minor = self.api
        msg = (
            bytes([0x04, major, minor, self.build & 0xFF])
            + guest.policy.to_u32().to_bytes(4, "little")
            + guest.launch_digest.digest()
            + mnonce
        )
        guest.state = GuestState.LSECRET
        return MeasureResult(Status.SUCCESS, hmac.digest(guest.tik, msg, "sha256") + mnonce)

    @guest_command(Command.LAUNCH_FINISH, Result, IN_LSECRET)
    def launch_finish(self, guest: GuestContext) -> Result:
        guest.end_session(GuestState.RUNNING)
        return Result(Status.SUCCESS)
