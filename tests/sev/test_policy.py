"""Guest policy: u32 round trips, names, reserved bits, API minimum and the explanations."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sevconsole.sev.policy import GuestPolicy, PolicyError, PolicyFlag

RECOMMENDED = 0x37  # sev-tool's NODBG|NOKS|ES|DOMAIN|SEV


def test_flag_values_are_the_reference_bits() -> None:
    assert [(f.name, int(f)) for f in PolicyFlag] == [
        ("NODBG", 1), ("NOKS", 2), ("ES", 4), ("NOSEND", 8), ("DOMAIN", 0x10), ("SEV", 0x20),
    ]


@given(st.integers(0, 0xFFFF_FFFF))
def test_every_u32_round_trips(value: int) -> None:
    policy = GuestPolicy.from_u32(value)
    assert policy.to_u32() == value
    assert int(policy.flags) == value & 0x3F
    assert policy.reserved == (value >> 6) & 0x3FF
    assert (policy.api_major, policy.api_minor) == ((value >> 16) & 0xFF, value >> 24)
    assert GuestPolicy.parse(hex(value)) == policy


@given(
    flags=st.integers(0, 0x3F), major=st.integers(0, 255), minor=st.integers(0, 255)
)
def test_names_parse_back(flags: int, major: int, minor: int) -> None:
    policy = GuestPolicy(PolicyFlag(flags), 0, major, minor)
    assert GuestPolicy.parse(policy.flag_names(), api=(major, minor)) == policy


def test_names_and_api_of_known_policies() -> None:
    assert GuestPolicy.from_u32(0x1).flag_names() == "NODBG"  # QEMU's default
    assert GuestPolicy.from_u32(RECOMMENDED).flag_names() == "NODBG|NOKS|ES|DOMAIN|SEV"
    assert GuestPolicy.from_u32(0).flag_names() == ""
    policy = GuestPolicy.parse("NODBG|NOKS|DOMAIN|SEV", api=(0, 17))
    assert policy.to_u32() == 0x1100_0033
    assert str(policy) == "0x11000033 NODBG|NOKS|DOMAIN|SEV, API >= 0.17"
    assert GuestPolicy.parse("sev, nodbg") == GuestPolicy.parse("NODBG|SEV")
    assert GuestPolicy.parse("none") == GuestPolicy.parse("") == GuestPolicy.from_u32(0)


def test_api_minimum() -> None:
    policy = GuestPolicy.from_u32(0x1100_0000)  # 0.17
    assert policy.api == (0, 17)
    assert policy.allows_api((0, 17)) and policy.allows_api((1, 0))
    assert not policy.allows_api((0, 16))


def test_reserved_bits_are_kept_and_reported() -> None:
    value = 0x0000_8041  # NODBG, bit 6 and bit 15
    policy = GuestPolicy.from_u32(value)
    assert policy.reserved == 0x201 and policy.to_u32() == value
    assert policy.flag_names() == "NODBG"
    assert "reserved bits 0x8040 set" in str(policy)
    row = {r.name: r for r in policy.explain()}["reserved"]
    assert row.set and row.bit == 6 and row.mask == 0xFFC0
    assert "0x8040" in row.migration and "POLICY_FAILURE" in row.migration
    clean = {r.name: r for r in GuestPolicy.from_u32(1).explain()}["reserved"]
    assert not clean.set and "zero" in clean.migration


def test_explain_covers_each_flag_in_bit_order_with_its_state() -> None:
    policy = GuestPolicy.from_u32(0x0016_0000 | RECOMMENDED)  # API 22.0
    rows = policy.explain()
    assert [(r.name, r.bit) for r in rows] == [
        ("NODBG", 0), ("NOKS", 1), ("ES", 2), ("NOSEND", 3), ("DOMAIN", 4), ("SEV", 5),
        ("reserved", 6), ("API", 16),
    ]
    assert [r.set for r in rows] == [True, True, True, False, True, True, False, True]
    for row in rows:
        assert row.meaning.endswith(".") and row.migration.endswith(".")


def _migration(value: int, name: str) -> str:
    return {r.name: r for r in GuestPolicy.from_u32(value).explain()}[name].migration


def test_the_migration_sentences_say_what_the_firmware_does() -> None:
    assert "SEND_START is refused with POLICY_FAILURE" in _migration(0x8, "NOSEND")
    assert "allowed" in _migration(0x0, "NOSEND")
    assert "OCA equals this platform's OCA" in _migration(0x10, "DOMAIN")
    sev = _migration(0x0011_0020, "SEV")  # SEV with API 17.0
    assert "AMD root" in sev and "at least 17.0" in sev
    assert "SEV-ES" in _migration(0x4, "ES") and "UPDATE_VMSA" in _migration(0x4, "ES")
    assert "fresh key" in _migration(0x2, "NOKS")
    assert "debug" in _migration(0x1, "NODBG")


def test_neither_domain_nor_sev_is_shown_as_a_risk() -> None:
    open_policy = GuestPolicy.from_u32(0x1)
    assert open_policy.target_unchecked
    assert "any key" in _migration(0x1, "DOMAIN") and "any key" in _migration(0x1, "SEV")
    assert not GuestPolicy.from_u32(0x10).target_unchecked
    assert "any key" not in _migration(0x10, "SEV")


@pytest.mark.parametrize(
    "make",
    [
        lambda: GuestPolicy.from_u32(-1),
        lambda: GuestPolicy.from_u32(1 << 32),
        lambda: GuestPolicy.from_u32("0x1"),  # type: ignore[arg-type]
        lambda: GuestPolicy.from_u32(1.0),  # type: ignore[arg-type]
        lambda: GuestPolicy(PolicyFlag(0), reserved=0x400),
        lambda: GuestPolicy(0x40),  # type: ignore[arg-type]
        lambda: GuestPolicy(api_major=256),
        lambda: GuestPolicy.parse("NODBG|NOSUCH"),
        lambda: GuestPolicy.parse("0xZZ"),
        lambda: GuestPolicy.parse("0x1ffffffff"),
        lambda: GuestPolicy.parse(None),  # type: ignore[arg-type]
    ],
    ids=["negative", "33 bits", "str", "float", "reserved 11 bits", "flag 0x40", "api 256",
         "unknown name", "bad hex", "too big", "not text"],
)
def test_bad_input_is_a_policy_error_with_a_sentence(make) -> None:
    with pytest.raises(PolicyError) as err:
        make()
    assert isinstance(err.value, ValueError) and len(str(err.value)) > 10


def test_unknown_name_lists_the_flags() -> None:
    with pytest.raises(PolicyError, match="NODBG, NOKS, ES, NOSEND, DOMAIN, SEV"):
        GuestPolicy.parse("NODEBUG")
