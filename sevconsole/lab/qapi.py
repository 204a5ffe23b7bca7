"""Command arguments checked as QEMU 7.2's QAPI input visitor checks them, in its words.

A command's arguments are a `Struct` of members in schema order. Members are visited in that
order (the first bad one answers), then unknown keys are refused, as qobject-input-visitor.c
does. The sentences are QEMU's:

    Parameter 'uri' is missing
    Invalid parameter type for 'uri', expected: string
    Parameter 'downtime-limit' expects uint64          (unsigned integers; a negative wraps)
    Parameter 'multifd-channels' expects uint8_t
    Parameter 'multifd-compression' does not accept value 'x'
    Parameter 'capabilities[0].x' is unexpected

`qdict_order` gives the order in which QEMU walks the keys of a QMP request (its QDict hash),
which decides which of two bad members QEMU names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

UINT64 = (1 << 64) - 1


class QapiError(Exception):
    """An argument QEMU would refuse; `str()` is QEMU's sentence."""


class Type:
    def visit(self, value: Any, path: str, name: str | None) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


def _wrong(path: str, expected: str) -> QapiError:
    return QapiError(f"Invalid parameter type for '{path}', expected: {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Str(Type):
    def visit(self, value: Any, path: str, name: str | None) -> str:
        if not isinstance(value, str):
            raise _wrong(path, "string")
        return value


class Bool(Type):
    def visit(self, value: Any, path: str, name: str | None) -> bool:
        if not isinstance(value, bool):
            raise _wrong(path, "boolean")
        return value


class Int(Type):
    """int64."""

    def visit(self, value: Any, path: str, name: str | None) -> int:
        if not _is_int(value) or value > (1 << 63) - 1:
            raise _wrong(path, "integer")
        return value


@dataclass(frozen=True)
class Uint(Type):
    """uint64 (also QAPI's `size`), or a narrower unsigned type checked after it."""

    bits: int = 64

    def visit(self, value: Any, path: str, name: str | None) -> int:
        if not _is_int(value):
            raise QapiError(f"Parameter '{path}' expects uint64")
        value &= UINT64  # QEMU takes a negative number as its two's complement, for old clients
        if self.bits < 64 and value >= 1 << self.bits:
            raise QapiError(f"Parameter '{path}' expects uint{self.bits}_t")
        return value


@dataclass(frozen=True)
class Enum(Type):
    values: tuple[str, ...]

    def visit(self, value: Any, path: str, name: str | None) -> str:
        if not isinstance(value, str):
            raise _wrong(path, "string")
        if value not in self.values:
            # QEMU names the member here, not its full path ('null' for a list element)
            raise QapiError(f"Parameter '{name or 'null'}' does not accept value '{value}'")
        return value


class StrOrNull(Type):
    def visit(self, value: Any, path: str, name: str | None) -> str | None:
        if value is not None and not isinstance(value, str):
            raise _wrong(path, "StrOrNull")
        return value


@dataclass(frozen=True)
class List(Type):
    element: Type

    def visit(self, value: Any, path: str, name: str | None) -> list[Any]:
        if not isinstance(value, list):
            raise _wrong(path, "array")
        return [self.element.visit(v, f"{path}[{i}]", None) for i, v in enumerate(value)]


@dataclass(frozen=True)
class Member:
    name: str
    type: Type
    optional: bool = True


@dataclass(frozen=True)
class Struct(Type):
    members: tuple[Member, ...] = field(default_factory=tuple)

    def visit(self, value: Any, path: str, name: str | None) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _wrong(path, "object")
        out: dict[str, Any] = {}
        for member in self.members:
            where = f"{path}.{member.name}" if path else member.name
            if member.name not in value:
                if not member.optional:
                    raise QapiError(f"Parameter '{where}' is missing")
                continue
            out[member.name] = member.type.visit(value[member.name], where, member.name)
        known = {m.name for m in self.members}
        for key in value:
            if key not in known:
                raise QapiError(f"Parameter '{f'{path}.{key}' if path else key}' is unexpected")
        return out

    def names(self) -> list[str]:
        return [m.name for m in self.members]


def struct(*members: Member | tuple[str, Type] | tuple[str, Type, bool]) -> Struct:
    """Struct(("uri", Str(), False), ("blk", Bool())): optional unless the third item is False."""
    return Struct(tuple(m if isinstance(m, Member) else Member(*m) for m in members))


def check(args: Struct, value: dict[str, Any]) -> dict[str, Any]:
    return args.visit(value, "", None)


def required(name: str, type_: Type) -> Member:
    return Member(name, type_, optional=False)


def qdict_hash(key: str) -> int:
    """QEMU's qdict.c tdb_hash, folded into its 512 buckets."""
    data = key.encode()
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % 512


def qdict_order(keys: Iterable[str]) -> list[str]:
    """The order qdict_first/qdict_next visit `keys` (inserted in this order): by bucket, and
    within a bucket the newest first (entries are inserted at the head of the bucket's list)."""
    keyed = [(qdict_hash(k), -i, k) for i, k in enumerate(keys)]
    return [k for _, _, k in sorted(keyed)]
