"""The firmware model's state: platform, keys, guests, the command lock, log and modelled time.

`FirmwareState` holds what every command needs and runs one command at a time
(`_execute`, used by the decorators in command.py). Introspection (`log`, `counts`,
`last_status`, `busy_s`, `guest_state()`, `platform_state`, `handles`) never waits for a
running command. Nothing here sleeps or reads a clock other than the one it is given.
"""

from __future__ import annotations

import operator
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..certs import AmdCert, SevCert, join_amd_chain, join_platform_chain
from ..errors import SevFormatError
from ..memory import GuestMemoryCipher
from ..policy import GuestPolicy, PolicyFlag
from ..status import Command, GuestState, PlatformState, Status
from ..transport import TransportFormatError
from .guest import GuestContext
from .keys import PlatformKeys, generate_platform_keys
from .results import CommandRecord, CommandResult, PspTiming, Refusal

LOG_SIZE = 1024

R = TypeVar("R", bound=CommandResult)

# Input of the wrong type or shape: the command answers INVALID_PARAM instead of raising.
BAD_INPUT = (TypeError, ValueError, OverflowError, SevFormatError, TransportFormatError)


class FirmwareState:
    """State and plumbing shared by the commands; see `SevFirmware`."""

    def __init__(
        self,
        *,
        ask_key: rsa.RSAPrivateKey,
        ask: AmdCert,
        ark: AmdCert,
        api: tuple[int, int] = (0, 24),
        build: int = 1,
        es: bool = True,
        oca_key: ec.EllipticCurvePrivateKey | None = None,
        timing: PspTiming | None = None,
        rng: Callable[[int], bytes] = os.urandom,
        clock: Callable[[], float] = time.time,
        max_asid: int = 509,
    ) -> None:
        if len(api) != 2 or not all(0 <= v <= 255 for v in api):
            raise ValueError(f"api must be (major, minor), each 0..255, not {api!r}")
        self.api = (int(api[0]), int(api[1]))
        self.build = int(build)
        self.es = bool(es)
        self.ask = ask
        self.ark = ark
        self.timing = timing
        self.max_asid = max_asid
        self._rng = rng
        self._clock = clock
        self._keys: PlatformKeys = generate_platform_keys(ask_key, self.api, oca_key)
        self._external_owner = oca_key is not None  # a given OCA is an owner's, shared by its hosts
        self._state = PlatformState.UNINIT
        self._guests: dict[int, GuestContext] = {}
        self._next_handle = 1
        self._lock = threading.RLock()
        self._info_lock = threading.Lock()
        self._log: deque[CommandRecord] = deque(maxlen=LOG_SIZE)
        self._counts: dict[Command, int] = {}
        self._last_status = Status.SUCCESS
        self._busy_s = 0.0
        self._work = bytearray(0)
        self._charged: tuple[int, int] | None = None  # set by a page command that succeeds

    # ------------------------------------------------------------------ introspection

    @property
    def amd_chain(self) -> bytes:
        """ASK || ARK: the AMD chain this platform's CEK chains to."""
        return join_amd_chain(self.ask, self.ark)

    @property
    def platform_state(self) -> PlatformState:
        return self._state

    @property
    def pdh_cert(self) -> SevCert:
        return self._keys.pdh

    @property
    def cert_chain(self) -> bytes:
        """PEK || OCA || CEK (what PDH_CERT_EXPORT returns), without a command."""
        k = self._keys
        return join_platform_chain(k.pek, k.oca, k.cek)

    @property
    def log(self) -> list[CommandRecord]:
        with self._info_lock:
            return list(self._log)

    @property
    def counts(self) -> dict[Command, int]:
        with self._info_lock:
            return dict(self._counts)

    @property
    def last_status(self) -> Status:
        return self._last_status

    @property
    def busy_s(self) -> float:
        """Modelled PSP time of every command so far, by `timing` (0.0 without one)."""
        return self._busy_s

    @property
    def handles(self) -> list[int]:
        return sorted(self._guests)

    def guest_state(self, handle: int) -> GuestState:
        """A guest's state without a command (UNINIT for a handle that is not, or no longer, there)."""
        guest = self._guests.get(handle)
        return guest.state if guest is not None else GuestState.UNINIT

    # ------------------------------------------------------------------ running a command

    def _execute(
        self,
        command: Command,
        handle: int | None,
        result: Callable[..., R],
        body: Callable[[], R],
    ) -> R:
        """Run one command under the lock: a refusal or bad input becomes a result; logged.

        A page command that succeeds calls `_charge` with its packets and pages; anything else
        is one record and costs `per_command_s`.
        """
        with self._lock:
            self._charged = None
            try:
                answer = body()
            except Refusal as refusal:
                answer = result(
                    refusal.status, detail=f"{command.name}: {refusal.detail}", **refusal.fields
                )
            except BAD_INPUT as exc:
                answer = result(
                    Status.INVALID_PARAM, detail=f"{command.name}: invalid parameter: {exc}"
                )
            charged = self._charged if answer.status is Status.SUCCESS else None
            made: object = getattr(answer, "handle", None)  # LAUNCH_START, RECEIVE_START
            logged = made or handle
            # A handle that is no int (callers may pass anything) is logged as none.
            self._record(
                command,
                logged if isinstance(logged, int) else None,
                answer.status,
                *(charged or (1, 0)),
            )
            return answer

    def _charge(self, packets: int, pages: int) -> None:
        """A page command succeeded: `packets` go to the log and counts, `pages` to PSP time."""
        self._charged = (packets, pages)

    def _record(
        self, command: Command, handle: int | None, status: Status, packets: int, pages: int
    ) -> None:
        record = CommandRecord(command, handle, status, self._clock())
        cost = self.timing.cost(pages) if self.timing is not None else 0.0
        with self._info_lock:
            self._log.extend([record] * min(packets, LOG_SIZE))
            self._counts[command] = self._counts.get(command, 0) + packets
            self._last_status = status
            self._busy_s += cost

    # ------------------------------------------------------------------ checks commands share

    def _check_platform(self, allowed: Collection[PlatformState]) -> None:
        if self._state not in allowed:
            names = " or ".join(s.name for s in sorted(allowed))
            raise Refusal(
                Status.INVALID_PLATFORM_STATE,
                f"the platform is {self._state.name}, this command needs {names}",
            )

    def _guest(self, handle: int, allowed: Collection[GuestState]) -> GuestContext:
        """The guest for a guest command, or the refusal: platform, handle, then state."""
        if self._state is not PlatformState.WORKING:
            raise Refusal(
                Status.INVALID_PLATFORM_STATE,
                f"the platform is {self._state.name}, guest commands need WORKING",
            )
        try:
            guest = self._guests.get(operator.index(handle))
        except TypeError:  # callers may pass anything: that is no handle
            guest = None
        if guest is None:
            raise Refusal(Status.INVALID_GUEST, f"no guest has handle {handle!r}")
        if guest.state not in allowed:
            names = "/".join(s.name for s in sorted(allowed))
            raise Refusal(
                Status.INVALID_GUEST_STATE,
                f"guest {guest.handle} is {guest.state.name}, this command needs {names}",
            )
        return guest

    def _check_policy(self, policy: GuestPolicy) -> None:
        """POLICY_FAILURE unless this firmware can host a guest of this policy."""
        if policy.reserved:
            raise Refusal(
                Status.POLICY_FAILURE,
                f"reserved policy bits 6-15 must be zero, policy has {policy.reserved << 6:#06x}",
            )
        if (policy.api_major, policy.api_minor) > self.api:
            raise Refusal(
                Status.POLICY_FAILURE,
                f"the policy asks for firmware API {policy.api_major}.{policy.api_minor}, "
                f"this firmware is {self.api[0]}.{self.api[1]}",
            )
        if policy.flags & PolicyFlag.ES and not self.es:
            raise Refusal(
                Status.POLICY_FAILURE,
                "the policy sets ES, and SEV-ES is not configured on this platform",
            )

    # ------------------------------------------------------------------ guests and buffers

    def _new_vek(self, handle: int, policy: GuestPolicy) -> bytes:
        """A fresh VEK, or with key sharing (handle != 0) the other guest's, unless NOKS."""
        if not handle:
            return self._rng(16)
        other = self._guests.get(handle)
        if other is None:
            raise Refusal(Status.INVALID_GUEST, f"no guest has handle {handle} to share keys with")
        if policy.flags & PolicyFlag.NOKS or other.policy.flags & PolicyFlag.NOKS:
            raise Refusal(
                Status.POLICY_FAILURE,
                f"NOKS: key sharing with guest {handle} is forbidden by policy",
            )
        return other.vek

    def _attach(
        self, policy: GuestPolicy, memory: memoryview, vek: bytes, state: GuestState
    ) -> GuestContext:
        handle = self._next_handle
        self._next_handle += 1
        guest = GuestContext(handle, policy, memory, vek, GuestMemoryCipher(vek), state)
        self._guests[handle] = guest
        self._state = PlatformState.WORKING
        return guest

    def _scratch(self, length: int) -> memoryview:
        """A reused work buffer of `length` bytes (only used under the command lock)."""
        if len(self._work) < length:
            self._work = bytearray(length)
        return memoryview(self._work)[:length]
