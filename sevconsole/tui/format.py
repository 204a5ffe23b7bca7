"""Human forms of the numbers the console shows: sizes, rates, durations, SEV names."""

from __future__ import annotations

from sevconsole.sev.status import GuestState, PlatformState, Status

GUEST_STATES = tuple(s.name for s in GuestState)  # UNINIT .. SENT, firmware numbering
PLATFORM_STATES = tuple(s.name for s in PlatformState)


def size(n: float | None) -> str:
    """Bytes in binary units: 1.5 GiB."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def rate(bps: float | None) -> str:
    """Bytes per second in decimal MB/s, as QEMU's operators read it."""
    return "-" if bps is None else f"{bps / 1e6:.1f} MB/s"


def count(n: float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e4:
        return f"{n / 1e3:.1f}k"
    return f"{n:.0f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def guest_state(value: int | None) -> str:
    if value is None:
        return "?"
    return GUEST_STATES[value] if 0 <= value < len(GUEST_STATES) else f"state {value}"


def platform_state(value: int | None) -> str:
    if value is None:
        return "?"
    return PLATFORM_STATES[value] if 0 <= value < len(PLATFORM_STATES) else f"state {value}"


def status(code: int | None) -> str:
    """`0x07 POLICY_FAILURE`."""
    if code is None:
        return "-"
    if code < 0:  # engine.fold.UNSEEN_STATUS: the command ran, its status was never read
        return "status not logged"
    try:
        return f"0x{code:02X} {Status(code).name}"
    except ValueError:
        return f"0x{code:02X} (unknown status)"


def policy(value: int | None) -> str:
    """`0x0033 NODBG|NOKS|DOMAIN|SEV`, or the hex alone where policy decoding is unavailable."""
    if value is None:
        return "-"
    try:
        from sevconsole.sev.policy import GuestPolicy
    except ImportError:
        return f"0x{value:04X}"
    try:
        names = GuestPolicy.from_u32(value).flag_names()
    except ValueError:
        return f"0x{value:04X} (undecodable)"
    return f"0x{value:04X} {names or 'none'}"


def fingerprint(hexdigest: str, groups: int = 8) -> str:
    """Short form of a SHA-256 fingerprint: the first bytes, colon-separated."""
    pairs = [hexdigest[i : i + 2] for i in range(0, min(len(hexdigest), groups * 2), 2)]
    return ":".join(pairs) + ("…" if len(hexdigest) > groups * 2 else "")

