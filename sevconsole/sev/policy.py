"""The SEV guest policy (a u32): its flags, reserved bits and minimum firmware API version.

Layout (SEV reference, section 3): bits 0-5 are the flags NODBG, NOKS, ES, NOSEND, DOMAIN and
SEV; bits 6-15 are reserved and must be zero; bits 16-23 hold the minimum API major and bits
24-31 the minimum API minor. The policy is fixed at launch, travels with the guest in the
migration stream and is bound to the session by its policy_mac, so a target cannot relax it.

`GuestPolicy.explain()` gives, for each flag and for the reserved bits (and last the API
minimum), a sentence of what it means and one of what it does to a migration, for the console
and the preflight checks.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from enum import IntFlag

U32_MAX = 0xFFFF_FFFF
RESERVED_SHIFT = 6
RESERVED_MASK = 0x3FF  # 10 bits: 6-15
API_MAJOR_SHIFT = 16
API_MINOR_SHIFT = 24


class PolicyFlag(IntFlag):
    NODBG = 0x01
    NOKS = 0x02
    ES = 0x04
    NOSEND = 0x08
    DOMAIN = 0x10
    SEV = 0x20


ALL_FLAGS = PolicyFlag(0x3F)
FLAG_ORDER: tuple[PolicyFlag, ...] = tuple(PolicyFlag)  # bit order: NODBG .. SEV


class PolicyError(ValueError):
    """A policy value or text that is not a valid SEV guest policy."""


@dataclass(frozen=True)
class PolicyBitInfo:
    """One row of `GuestPolicy.explain()`: `bit` is the lowest bit of the field, `mask` all of them."""

    name: str
    bit: int
    set: bool
    meaning: str
    migration: str
    mask: int = 0


_MEANING = {
    PolicyFlag.NODBG: (
        "Debug commands (DBG_DECRYPT, DBG_ENCRYPT) are refused for this guest, so the hypervisor "
        "cannot read or write its memory through the firmware."
    ),
    PolicyFlag.NOKS: (
        "The guest may not share its memory encryption key (VEK) with any other guest."
    ),
    PolicyFlag.ES: "SEV-ES guest: its CPU register state (the VMSA) is encrypted too.",
    PolicyFlag.NOSEND: "The guest may never be sent to another platform.",
    PolicyFlag.DOMAIN: (
        "The guest may only move within its owner's domain: to platforms whose PEK is certified "
        "by the same Owner Certificate Authority (OCA) as this one."
    ),
    PolicyFlag.SEV: (
        "The guest may only move to genuine AMD SEV platforms, proven by a certificate chain up "
        "to the AMD root key, running at least the policy's firmware API version."
    ),
}

_NO_FIRMWARE_CHECK = (
    " With neither DOMAIN nor SEV set, SEND_START only sanity-checks the target's PDH and would "
    "wrap the guest's keys for any key: the console must verify the target chain itself."
)


def _migration(flag: PolicyFlag, policy: GuestPolicy) -> str:
    on = bool(policy.flags & flag)
    unchecked = policy.target_unchecked
    if flag is PolicyFlag.NODBG:
        return (
            "No effect on the transfer; the policy travels with the guest, so the target refuses "
            "debug commands as well."
            if on
            else "No effect on the transfer; debug commands stay allowed on the target as here."
        )
    if flag is PolicyFlag.NOKS:
        return (
            "The target must receive the guest under a fresh key: RECEIVE_START into an existing "
            "guest's key (a non-zero handle) is refused with POLICY_FAILURE."
            if on
            else "The target may receive the guest into an existing guest's key (RECEIVE_START "
            "with a handle), if that guest allows key sharing too."
        )
    if flag is PolicyFlag.ES:
        return (
            "The target must support SEV-ES (RECEIVE_START fails with POLICY_FAILURE otherwise); "
            "each vCPU's VMSA moves with SEND/RECEIVE_UPDATE_VMSA."
            if on
            else "Plain SEV: only memory pages move; the target need not support SEV-ES."
        )
    if flag is PolicyFlag.NOSEND:
        return (
            "SEND_START is refused with POLICY_FAILURE: this guest cannot be migrated at all."
            if on
            else "SEND_START is allowed: the guest may be migrated."
        )
    if flag is PolicyFlag.DOMAIN:
        return (
            "SEND_START checks the target's PDH <- PEK <- OCA chain and refuses the target unless "
            "its OCA equals this platform's OCA."
            if on
            else "The firmware does not check that the target belongs to the same owner."
            + (_NO_FIRMWARE_CHECK if unchecked else "")
        )
    # PolicyFlag.SEV
    return (
        "SEND_START checks the target's chain PDH <- PEK <- CEK <- ASK <- ARK up to the AMD root, "
        f"and the target PEK's API version must be at least {policy.api_major}.{policy.api_minor}."
        if on
        else "The firmware does not check that the target is a genuine AMD platform."
        + (_NO_FIRMWARE_CHECK if unchecked else "")
    )


def _u32(value: object, what: str = "policy") -> int:
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise PolicyError(f"{what} {value!r} is not an integer") from None
    if not 0 <= number <= U32_MAX:
        raise PolicyError(f"{what} {number:#x} does not fit in 32 bits")
    return number


@dataclass(frozen=True)
class GuestPolicy:
    """A decoded policy. `reserved` holds bits 6-15 as a 10-bit number (u32 >> 6 & 0x3FF)."""

    flags: PolicyFlag = PolicyFlag(0)
    reserved: int = 0
    api_major: int = 0
    api_minor: int = 0

    def __post_init__(self) -> None:
        flags = _u32(self.flags, "policy flags")
        if flags & ~int(ALL_FLAGS):
            raise PolicyError(
                f"policy flags {flags:#x} hold bits beyond the six flags (bits 0-5); "
                "put reserved bits in `reserved`"
            )
        object.__setattr__(self, "flags", PolicyFlag(flags))
        for name, value, top in (
            ("reserved bits 6-15", self.reserved, RESERVED_MASK),
            ("API major", self.api_major, 0xFF),
            ("API minor", self.api_minor, 0xFF),
        ):
            number = _u32(value, name)
            if number > top:
                raise PolicyError(f"{name} {number} does not fit (at most {top})")
            object.__setattr__(self, _FIELD[name], number)

    # ---------------------------------------------------------- conversions

    @classmethod
    def from_u32(cls, value: int) -> GuestPolicy:
        number = _u32(value)
        return cls(
            flags=PolicyFlag(number & int(ALL_FLAGS)),
            reserved=(number >> RESERVED_SHIFT) & RESERVED_MASK,
            api_major=(number >> API_MAJOR_SHIFT) & 0xFF,
            api_minor=(number >> API_MINOR_SHIFT) & 0xFF,
        )

    def to_u32(self) -> int:
        return (
            int(self.flags)
            | self.reserved << RESERVED_SHIFT
            | self.api_major << API_MAJOR_SHIFT
            | self.api_minor << API_MINOR_SHIFT
        )

    @classmethod
    def parse(cls, text: str, api: tuple[int, int] = (0, 0)) -> GuestPolicy:
        """`"NODBG|NOKS|DOMAIN|SEV"` (also commas, spaces, any case; "" or "none" for no flags)
        or a number such as `"0x37"`, whose own API and reserved bits then count."""
        if not isinstance(text, str):
            raise PolicyError(f"policy text {text!r} is not a string")
        words = [w for w in text.replace(",", "|").replace(" ", "|").split("|") if w]
        if len(words) == 1 and words[0][:1].isdigit():
            try:
                return cls.from_u32(int(words[0], 0))
            except ValueError as exc:
                raise PolicyError(f"policy {words[0]!r} is not a number or flag list: {exc}") from None
        flags = PolicyFlag(0)
        for word in words:
            name = word.upper()
            if name == "NONE":
                continue
            if name not in PolicyFlag.__members__:
                known = ", ".join(f.name or "" for f in FLAG_ORDER)
                raise PolicyError(f"unknown policy flag {word!r}; the flags are {known}")
            flags |= PolicyFlag[name]
        return cls(flags=flags, api_major=api[0], api_minor=api[1])

    # ---------------------------------------------------------- reading

    @property
    def api(self) -> tuple[int, int]:
        """Minimum firmware API version (major, minor)."""
        return self.api_major, self.api_minor

    def allows_api(self, api: tuple[int, int]) -> bool:
        """Whether firmware at `api` meets the policy's minimum."""
        return tuple(api) >= self.api

    @property
    def target_unchecked(self) -> bool:
        """Neither DOMAIN nor SEV: the firmware would send the guest to any PDH key."""
        return not self.flags & (PolicyFlag.DOMAIN | PolicyFlag.SEV)

    def flag_names(self) -> str:
        """`"NODBG|NOKS|DOMAIN|SEV"` in bit order; "" when no flag is set."""
        return "|".join(f.name or "" for f in FLAG_ORDER if self.flags & f)

    def __str__(self) -> str:
        names = self.flag_names() or "no flags"
        text = f"0x{self.to_u32():08x} {names}, API >= {self.api_major}.{self.api_minor}"
        if self.reserved:
            text += f", reserved bits 0x{self.reserved << RESERVED_SHIFT:04x} set"
        return text

    def explain(self) -> list[PolicyBitInfo]:
        """The six flags in bit order, then the reserved bits, then the API minimum."""
        rows = [
            PolicyBitInfo(
                name=flag.name or "",
                bit=flag.bit_length() - 1,
                set=bool(self.flags & flag),
                meaning=_MEANING[flag],
                migration=_migration(flag, self),
                mask=int(flag),
            )
            for flag in FLAG_ORDER
        ]
        reserved_bits = self.reserved << RESERVED_SHIFT
        rows.append(
            PolicyBitInfo(
                name="reserved",
                bit=RESERVED_SHIFT,
                set=bool(self.reserved),
                meaning="Bits 6-15 are reserved and must be zero.",
                migration=(
                    f"Reserved bits 0x{reserved_bits:04x} are set: RECEIVE_START on any target "
                    "fails with POLICY_FAILURE, so this guest cannot be received anywhere."
                    if self.reserved
                    else "All zero, as the firmware requires."
                ),
                mask=RESERVED_MASK << RESERVED_SHIFT,
            )
        )
        rows.append(
            PolicyBitInfo(
                name="API",
                bit=API_MAJOR_SHIFT,
                set=self.api != (0, 0),
                meaning=(
                    f"Minimum firmware API version {self.api_major}.{self.api_minor} "
                    "(bits 16-23 major, 24-31 minor)."
                ),
                migration=self._api_migration(),
                mask=0xFFFF << API_MAJOR_SHIFT,
            )
        )
        return rows

    def _api_migration(self) -> str:
        if self.api == (0, 0):
            return "No minimum: a target with any firmware API version may receive the guest."
        text = (
            f"The target firmware's API must be at least {self.api_major}.{self.api_minor}: "
            "RECEIVE_START fails with POLICY_FAILURE below it"
        )
        if self.flags & PolicyFlag.SEV:
            return text + ", and SEND_START checks the target PEK's version (SEV flag)."
        return text + "."


_FIELD = {"reserved bits 6-15": "reserved", "API major": "api_major", "API minor": "api_minor"}
