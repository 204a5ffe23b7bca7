"""Transport crypto: the reference's known answers, real ECDH P-384, sessions, packets, batches."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from sevconsole.sev import transport
from sevconsole.sev.transport import (
    HEADER_LEN,
    IntegrityError,
    PacketHeader,
    Session,
    TransportFormatError,
    build_session,
    ecdh_z,
    kdf,
    kek_kik,
    master_secret,
    open_packet,
    open_pages,
    open_session,
    packet_count,
    seal_packet,
    seal_pages,
)

ZERO16 = bytes(16)
TEK = bytes(range(16))
TIK = bytes(range(16, 32))


# ------------------------------------------------------------ known answers (reference, section 4)


def test_known_answers_of_the_key_schedule() -> None:
    master = master_secret(ZERO16, ZERO16)
    assert master.hex() == "ab4d269fcc62bedb4511d56c386ce706"
    kek, kik = kek_kik(master)
    assert kek.hex() == "b6abfbfb75ea1ea74ed8750b8afdb973"
    assert kik.hex() == "53b524bf5669a363f365c864acba8572"


def test_known_answers_of_the_session() -> None:
    session = build_session(ZERO16, ZERO16, ZERO16, 0, nonce=ZERO16, wrap_iv=ZERO16)
    assert session.wrap_tk.hex() == (
        "2137bc7f9bb8bd7c3e55a576a15d3454b3856b8ba27afadf46dcfee9f02c02c4"
    )
    assert session.wrap_mac.hex() == (
        "3176c0752738bd9d5e86689534020f528c088f16238826b000b327dee6aeed7d"
    )
    assert session.policy_mac.hex() == (
        "aa7855e13839dd767cd5da7c1ff5036540c9264b7a803029315e55375287b4af"
    )
    blob = session.to_bytes()
    assert len(blob) == 128
    # Layout: nonce @0, wrap_tk @0x10, wrap_iv @0x30, wrap_mac @0x40, policy_mac @0x60.
    assert blob[0x10:0x30] == session.wrap_tk
    assert blob[0x40:0x60] == session.wrap_mac
    assert blob[0x60:0x80] == session.policy_mac
    assert Session.from_bytes(blob) == session
    assert open_session(ZERO16, blob, 0) == (ZERO16, ZERO16)


def test_kdf_is_sp800_108_counter_mode_over_several_blocks() -> None:
    key, label, context = b"k" * 48, b"label", b"ctx"
    expected = b"".join(
        hmac.new(key, struct.pack("<I", i) + label + b"\0" + context + struct.pack("<I", 80 * 8),
                 hashlib.sha256).digest()
        for i in (1, 2, 3)
    )[:80]
    assert kdf(key, "label", context, length=80) == expected
    assert kdf(key, b"label", context, length=16) != expected[:16]  # L is part of every block


# ------------------------------------------------------------ real ECDH P-384


def _pair() -> tuple[ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    return key, key.public_key()


def test_ecdh_round_trip_gives_one_secret_and_the_session_opens_on_the_other_side() -> None:
    source, source_pub = _pair()
    target, target_pub = _pair()
    z_source = ecdh_z(source, target_pub)
    z_target = ecdh_z(target, source_pub)
    assert z_source == z_target and len(z_source) == 48
    tek, tik = os.urandom(16), os.urandom(16)
    session = build_session(z_source, tek, tik, 0x37)
    assert open_session(z_target, session.to_bytes(), 0x37) == (tek, tik)

    intruder, _ = _pair()
    with pytest.raises(IntegrityError) as wrong_key:
        open_session(ecdh_z(intruder, source_pub), session, 0x37)
    assert wrong_key.value.what == "wrap_mac" and "PDH" in str(wrong_key.value)
    with pytest.raises(IntegrityError) as wrong_policy:
        open_session(z_target, session, 0x36)
    assert wrong_policy.value.what == "policy_mac" and "0x00000036" in str(wrong_policy.value)


def test_ecdh_refuses_other_curves() -> None:
    source, _ = _pair()
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(TransportFormatError, match="P-384"):
        ecdh_z(source, other)


def _pdh_public_key(cert: bytes) -> ec.EllipticCurvePublicKey:
    # SEV certificate: curve u32 @0x10, qx[72] @0x14, qy[72] @0x5C, little-endian.
    assert struct.unpack_from("<I", cert, 0x10)[0] == 2
    qx = int.from_bytes(cert[0x14:0x14 + 72], "little")
    qy = int.from_bytes(cert[0x5C:0x5C + 72], "little")
    return ec.EllipticCurvePublicNumbers(qx, qy, ec.SECP384R1()).public_key()


@pytest.mark.parametrize("platform", ["naples", "rome"])
def test_session_for_a_real_platform_pdh(sev_certs: Path, platform: str) -> None:
    pdh = _pdh_public_key((sev_certs / "platforms" / platform / "pdh.cert").read_bytes())
    ours, ours_pub = _pair()
    z = ecdh_z(ours, pdh)
    assert len(z) == 48
    session = build_session(z, TEK, TIK, 0x1)
    assert open_session(z, session, 0x1) == (TEK, TIK)
    # Anyone without the platform's PDH private key derives another Z and fails the wrap MAC.
    stranger, _ = _pair()
    with pytest.raises(IntegrityError, match="wrap_mac") as err:
        open_session(ecdh_z(stranger, pdh), session, 0x1)
    assert err.value.what == "wrap_mac"


@pytest.mark.parametrize(
    "offset,what",
    [(0x00, "wrap_mac"), (0x0F, "wrap_mac"),  # nonce: another master secret
     (0x10, "wrap_mac"), (0x2F, "wrap_mac"),  # wrap_tk
     (0x30, "policy_mac"), (0x3F, "policy_mac"),  # wrap_iv: unwraps wrong keys, caught by policy_mac
     (0x40, "wrap_mac"), (0x5F, "wrap_mac"),
     (0x60, "policy_mac"), (0x7F, "policy_mac")],
)
def test_every_region_of_the_session_is_protected(offset: int, what: str) -> None:
    z = os.urandom(48)
    blob = bytearray(build_session(z, TEK, TIK, 0x5).to_bytes())
    blob[offset] ^= 0x01
    with pytest.raises(IntegrityError) as err:
        open_session(z, bytes(blob), 0x5)
    assert err.value.what == what


@pytest.mark.parametrize("bad", [b"", bytes(127), bytes(129)])
def test_session_of_the_wrong_length_is_a_format_error(bad: bytes) -> None:
    with pytest.raises(TransportFormatError, match="128"):
        open_session(bytes(48), bad, 0)


def test_build_session_checks_key_lengths() -> None:
    with pytest.raises(TransportFormatError, match="TEK"):
        build_session(bytes(48), bytes(15), TIK, 0)
    with pytest.raises(TransportFormatError, match="policy"):
        build_session(bytes(48), TEK, TIK, 1 << 32)


# ------------------------------------------------------------ packets


def _independent_packet(tek: bytes, tik: bytes, iv: bytes, plaintext: bytes) -> tuple[bytes, bytes]:
    """The reference's packet, built without the module (ECB keystream, hashlib HMAC)."""
    blocks = len(plaintext) // 16
    start = int.from_bytes(iv, "big")
    counters = b"".join(((start + i) % (1 << 128)).to_bytes(16, "big") for i in range(blocks))
    ecb = Cipher(algorithms.AES(tek), modes.ECB()).encryptor()
    stream = ecb.update(counters)
    ciphertext = bytes(a ^ b for a, b in zip(plaintext, stream, strict=True))
    aad = b"\x02" + struct.pack("<I", 0) + iv + struct.pack("<II", len(plaintext), len(plaintext))
    mac = hmac.new(tik, aad + ciphertext, hashlib.sha256).digest()
    return struct.pack("<I", 0) + iv + mac, ciphertext


def test_packet_matches_the_reference_construction() -> None:
    iv = bytes.fromhex("00112233445566778899aabbccddeeff")
    plaintext = os.urandom(4096)
    header, ciphertext = seal_packet(TEK, TIK, plaintext, iv=iv)
    assert (header, ciphertext) == _independent_packet(TEK, TIK, iv, plaintext)
    parsed = PacketHeader.from_bytes(header)
    assert parsed.flags == 0 and parsed.iv == iv and parsed.to_bytes() == header
    assert len(header) == HEADER_LEN
    assert open_packet(TEK, TIK, header, ciphertext) == plaintext


def test_each_packet_gets_a_fresh_iv() -> None:
    page = bytes(4096)
    (h1, c1), (h2, c2) = seal_packet(TEK, TIK, page), seal_packet(TEK, TIK, page)
    assert h1[4:20] != h2[4:20] and c1 != c2


def test_a_header_longer_than_52_bytes_is_read_by_its_first_52() -> None:
    header, ciphertext = seal_packet(TEK, TIK, bytes(32))
    assert open_packet(TEK, TIK, header + b"extra", ciphertext) == bytes(32)


@pytest.mark.parametrize("where", ["iv", "mac", "ciphertext", "length", "tik"])
def test_tampering_is_caught_before_anything_is_decrypted(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    header, ciphertext = bytearray(), bytearray()
    h, c = seal_packet(TEK, TIK, os.urandom(4096))
    header[:], ciphertext[:] = h, c
    tik = TIK
    if where == "iv":
        header[4] ^= 0x80
    elif where == "mac":
        header[0x33] ^= 0x01
    elif where == "ciphertext":
        ciphertext[2000] ^= 0x04
    elif where == "length":
        del ciphertext[-16:]
    else:
        tik = bytes(16)
    decrypted: list[object] = []
    # The only two ways a keystream reaches data: one packet, or a vectorised chunk.
    real_one, real_chunk = transport._xor_one, transport._Keystream.xor
    monkeypatch.setattr(transport, "_xor_one", lambda *a: decrypted.append(a) or real_one(*a))
    monkeypatch.setattr(
        transport._Keystream, "xor", lambda self, *a: decrypted.append(a) or real_chunk(self, *a)
    )
    assert open_packet(TEK, TIK, h, c) and decrypted  # the probe does see a good packet
    decrypted.clear()
    with pytest.raises(IntegrityError) as err:
        open_packet(TEK, tik, bytes(header), bytes(ciphertext))
    assert err.value.what == "packet_mac" and "nothing was decrypted" in str(err.value)
    assert decrypted == []


@pytest.mark.parametrize("flags,message", [(1, "COMPRESSED"), (0x100, "unknown flag")])
def test_flagged_packets_are_refused(flags: int, message: str) -> None:
    header, ciphertext = seal_packet(TEK, TIK, bytes(64))
    bad = struct.pack("<I", flags) + header[4:]
    with pytest.raises(TransportFormatError, match=message):
        open_packet(TEK, TIK, bad, ciphertext)


@pytest.mark.parametrize("length", [0, 15, 17, 0x5010])
def test_packet_lengths_outside_the_firmware_rules_are_refused(length: int) -> None:
    with pytest.raises(TransportFormatError, match="multiple of 16"):
        seal_packet(TEK, TIK, bytes(length))


def test_largest_packet_is_0x5000_bytes() -> None:
    plaintext = os.urandom(0x5000)
    header, ciphertext = seal_packet(TEK, TIK, plaintext)
    assert open_packet(TEK, TIK, header, ciphertext) == plaintext


@settings(max_examples=200, deadline=None)
@given(header=st.binary(max_size=80), ciphertext=st.binary(max_size=200))
def test_garbage_never_escapes_as_anything_but_the_typed_errors(header: bytes, ciphertext: bytes) -> None:
    with pytest.raises((TransportFormatError, IntegrityError)):
        open_packet(TEK, TIK, header, ciphertext)


# ------------------------------------------------------------ batches


def _ivs(count: int, last_wraps: bool = False) -> bytes:
    ivs = bytearray(os.urandom(16 * count))
    if last_wraps:  # low 64 bits of the counter wrap inside the page: must carry into the high half
        ivs[-16:] = bytes.fromhex("0123456789abcdef" "fffffffffffffff0")
    return bytes(ivs)


@pytest.mark.parametrize(
    "length,page_size",
    [(4096 * 40, 4096), (4096 * 3 + 48, 4096), (16, 4096), (0x5000 * 3, 0x5000), (64 * 5, 64)],
)
def test_batch_equals_one_packet_at_a_time(length: int, page_size: int) -> None:
    plaintext = os.urandom(length)
    count = packet_count(length, page_size)
    ivs = _ivs(count, last_wraps=True)
    headers, ciphertext = seal_pages(TEK, TIK, plaintext, page_size, ivs=ivs)
    assert len(headers) == count and len(ciphertext) == length
    for p in range(count):
        page = plaintext[p * page_size : (p + 1) * page_size]
        expected = seal_packet(TEK, TIK, page, iv=ivs[16 * p : 16 * p + 16])
        assert (headers[p], ciphertext[p * page_size : (p + 1) * page_size]) == expected
    assert open_pages(TEK, TIK, headers, ciphertext, page_size) == plaintext
    assert open_pages(TEK, TIK, b"".join(headers), ciphertext, page_size) == plaintext


def test_wrapping_counter_matches_the_reference_construction() -> None:
    plaintext = os.urandom(4096 * 2)
    ivs = _ivs(2, last_wraps=True)
    headers, ciphertext = seal_pages(TEK, TIK, plaintext, ivs=ivs)
    assert (headers[1], ciphertext[4096:]) == _independent_packet(TEK, TIK, ivs[16:], plaintext[4096:])


def test_batch_writes_into_caller_buffers() -> None:
    plaintext = np.frombuffer(os.urandom(4096 * 17), np.uint8)
    sent = bytearray(plaintext.size)
    headers, ciphertext = seal_pages(TEK, TIK, plaintext, out=sent)
    assert ciphertext is sent
    received = np.zeros(plaintext.size, np.uint8)
    assert open_pages(TEK, TIK, headers, sent, out=received) is received
    assert np.array_equal(received, plaintext)


def test_open_pages_checks_every_mac_before_writing_anything() -> None:
    plaintext = os.urandom(4096 * 20)
    headers, ciphertext = seal_pages(TEK, TIK, plaintext)
    tampered = bytearray(ciphertext)
    tampered[4096 * 19 + 5] ^= 0x01  # the last page only
    out = bytearray(b"\xaa" * len(plaintext))
    with pytest.raises(IntegrityError) as err:
        open_pages(TEK, TIK, headers, bytes(tampered), out=out)
    assert err.value.what == "packet_mac" and err.value.page == 19
    assert "packet 19" in str(err.value)
    assert out == bytearray(b"\xaa" * len(plaintext))


def test_swapped_headers_are_caught() -> None:
    headers, ciphertext = seal_pages(TEK, TIK, os.urandom(4096 * 3))
    with pytest.raises(IntegrityError) as err:
        open_pages(TEK, TIK, [headers[1], headers[0], headers[2]], ciphertext)
    assert err.value.page == 0


_GOOD_HEADERS, _GOOD_CIPHERTEXT = seal_pages(TEK, TIK, bytes(4096 * 2))
_BAD_BATCHES = {
    "empty": lambda: seal_pages(TEK, TIK, b""),
    "not a multiple of 16": lambda: seal_pages(TEK, TIK, bytes(4100)),
    "page size not a multiple of 16": lambda: seal_pages(TEK, TIK, bytes(4096), page_size=4008),
    "page size over 0x5000": lambda: seal_pages(TEK, TIK, bytes(4096), page_size=0x6000),
    "short ivs": lambda: seal_pages(TEK, TIK, bytes(4096), ivs=bytes(15)),
    "out too small": lambda: seal_pages(TEK, TIK, bytes(4096), out=bytearray(10)),
    "out read-only": lambda: seal_pages(TEK, TIK, bytes(4096), out=bytes(4096)),
    "not a buffer": lambda: seal_pages(TEK, TIK, 42),  # type: ignore[arg-type]
    "too few headers": lambda: open_pages(TEK, TIK, _GOOD_HEADERS[:1], _GOOD_CIPHERTEXT),
    "short header": lambda: open_pages(
        TEK, TIK, [_GOOD_HEADERS[0], _GOOD_HEADERS[1][:40]], _GOOD_CIPHERTEXT
    ),
    "short header blob": lambda: open_pages(
        TEK, TIK, b"".join(_GOOD_HEADERS)[:-1], _GOOD_CIPHERTEXT
    ),
    "compressed flag": lambda: open_pages(
        TEK, TIK, [_GOOD_HEADERS[0], b"\x01" + _GOOD_HEADERS[1][1:]], _GOOD_CIPHERTEXT
    ),
}


@pytest.mark.parametrize("case", sorted(_BAD_BATCHES))
def test_batch_bad_input_is_a_format_error(case: str) -> None:
    with pytest.raises(TransportFormatError):
        _BAD_BATCHES[case]()


@settings(max_examples=30, deadline=None)
@given(pages=st.integers(1, 40), tail=st.integers(0, 15), seed=st.binary(min_size=32, max_size=32))
def test_batch_round_trips(pages: int, tail: int, seed: bytes) -> None:
    tek, tik = seed[:16], seed[16:]
    plaintext = os.urandom(pages * 256 + tail * 16)  # a shorter last packet when tail > 0
    headers, ciphertext = seal_pages(tek, tik, plaintext, page_size=256)
    assert open_pages(tek, tik, headers, ciphertext, page_size=256) == plaintext


def test_threads_sealing_with_their_own_keys_do_not_mix() -> None:
    """Batches keep per-thread scratch buffers and AES contexts; results must not leak across."""
    import threading

    results: dict[int, bool] = {}
    start = threading.Barrier(4)

    def work(n: int) -> None:
        tek, tik = bytes([n]) * 16, bytes([n + 100]) * 16
        plaintext = bytes([n]) * (4096 * 70)  # more than one 256 KiB chunk
        ivs = _ivs(70)
        start.wait(timeout=10)
        ok = True
        for _ in range(5):
            headers, ciphertext = seal_pages(tek, tik, plaintext, ivs=ivs)
            expected = seal_packet(tek, tik, plaintext[:4096], iv=ivs[:16])
            ok &= (headers[0], ciphertext[:4096]) == expected
            ok &= open_pages(tek, tik, headers, ciphertext) == plaintext
        results[n] = ok

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == {0: True, 1: True, 2: True, 3: True}


def test_many_keys_in_turn_each_get_their_own_keystream() -> None:
    """More TEKs than the per-thread AES context cache holds, revisited: still exact."""
    plaintext = os.urandom(4096 * 2)
    keys = [os.urandom(16) for _ in range(transport._ECB_CACHE + 3)]
    ivs = _ivs(2)
    first = [seal_pages(k, TIK, plaintext, ivs=ivs) for k in keys]
    again = [seal_pages(k, TIK, plaintext, ivs=ivs) for k in reversed(keys)]
    assert first == list(reversed(again))
    for key, (headers, ciphertext) in zip(keys, first, strict=True):
        assert (headers[1], ciphertext[4096:]) == _independent_packet(key, TIK, ivs[16:], plaintext[4096:])


@settings(max_examples=100, deadline=None)
@given(z=st.binary(min_size=1, max_size=64), blob=st.binary(min_size=128, max_size=128),
       policy=st.integers(0, 0xFFFF_FFFF))
def test_random_sessions_fail_only_as_integrity_errors(z: bytes, blob: bytes, policy: int) -> None:
    with pytest.raises(IntegrityError) as err:
        open_session(z, blob, policy)
    assert err.value.what in ("wrap_mac", "policy_mac")


@settings(max_examples=50, deadline=None)
@given(z=st.binary(min_size=16, max_size=48), keys=st.binary(min_size=32, max_size=32),
       policy=st.integers(0, 0xFFFF_FFFF))
def test_sessions_round_trip(z: bytes, keys: bytes, policy: int) -> None:
    from sevconsole.sev.policy import GuestPolicy

    session = build_session(z, keys[:16], keys[16:], GuestPolicy.from_u32(policy))
    assert open_session(z, Session.from_bytes(session.to_bytes()), policy) == (keys[:16], keys[16:])


_BAD_CALLS = {
    "session of None": lambda: Session.from_bytes(None),  # type: ignore[arg-type]
    "session of str": lambda: open_session(bytes(48), "x" * 128, 0),  # type: ignore[arg-type]
    "policy of str": lambda: build_session(bytes(48), TEK, TIK, "0x1"),  # type: ignore[arg-type]
    "key of int": lambda: seal_packet(16, TIK, bytes(16)),  # type: ignore[arg-type]
    "header of int": lambda: open_packet(TEK, TIK, 52, bytes(16)),  # type: ignore[arg-type]
    "headers of ints": lambda: open_pages(TEK, TIK, [1, 2], bytes(8192)),  # type: ignore[list-item]
    "headers of None": lambda: open_pages(TEK, TIK, None, bytes(8192)),  # type: ignore[arg-type]
    "non-ASCII label": lambda: kdf(bytes(16), "sév"),
    "zero kdf length": lambda: kdf(bytes(16), "x", length=0),
    "ecdh with an RSA-like object": lambda: ecdh_z(object(), object()),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("case", sorted(_BAD_CALLS))
def test_wrong_types_are_format_errors(case: str) -> None:
    with pytest.raises(TransportFormatError):
        _BAD_CALLS[case]()


def test_in_place_seal_and_open_even_with_a_wrapping_counter() -> None:
    plaintext = os.urandom(4096 * 3 + 32)
    ivs = bytearray(_ivs(4))
    ivs[16:32] = bytes.fromhex("00000000000000aa" "ffffffffffffffff")  # page 1 wraps at once
    expected_headers, expected = seal_pages(TEK, TIK, plaintext, ivs=bytes(ivs))
    buffer = bytearray(plaintext)
    headers, result = seal_pages(TEK, TIK, buffer, ivs=bytes(ivs), out=buffer)
    assert result is buffer and bytes(buffer) == expected and headers == expected_headers
    assert expected[4096:8192] == _independent_packet(TEK, TIK, bytes(ivs[16:32]), plaintext[4096:8192])[1]
    open_pages(TEK, TIK, headers, buffer, out=buffer)
    assert bytes(buffer) == plaintext


@pytest.mark.parametrize("pages", [1, 2, 3, 5, 70])  # the short-run and the numpy layouts
@pytest.mark.parametrize(
    "iv_hex",
    ["ffffffffffffffffffffffffffffff80",  # the whole 128-bit counter wraps inside the page
     "0000000000000001ffffffffffffff00",  # the low 64 bits wrap: carry into the high half
     "00000000000000000000000000000000"],
)
def test_counter_edges_match_the_reference_in_every_layout(pages: int, iv_hex: str) -> None:
    plaintext = os.urandom(4096 * pages)
    ivs = bytearray(_ivs(pages))
    ivs[-16:] = bytes.fromhex(iv_hex)
    headers, ciphertext = seal_pages(TEK, TIK, plaintext, ivs=bytes(ivs))
    last = slice(4096 * (pages - 1), 4096 * pages)
    assert (headers[-1], ciphertext[last]) == _independent_packet(TEK, TIK, bytes(ivs[-16:]), plaintext[last])
    assert open_pages(TEK, TIK, headers, ciphertext) == plaintext
