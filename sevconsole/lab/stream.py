"""The lab's migration stream: a simple framed protocol over one TCP connection.

    stream  := MAGIC frame*                 (source -> target; the target answers on the same socket)
    MAGIC   := b"SEVLAB\\x00\\x01"
    frame   := type:u8  length:be32  payload[length]        (length <= MAX_FRAME)

Source -> target:
    HELLO      JSON {"vm", "mem", "page-size", "sev", "shared": [[first, count], ...], "dirty-rate",
               "pass"}: the guest's shape and its shared/private map (KVM's page encryption bitmap).
    SEV_START  the reference's wire framing (sev-reference.md section 6):
               be32 policy | be32 pdh_len | pdh (the SOURCE's PDH) | be32 session_len | session
    PRIVATE    be64 gpa | be32 n | n x (be32 hdr_len | hdr | be32 trans_len | trans)
               n SEV packets of the reference's framing for contiguous private memory from gpa;
               each packet at most 0x5000 bytes (the firmware's limit), all of one size.
    SHARED     be64 gpa | plaintext pages (shared pages travel in clear)
    PASS       be32 pass number (a dirty pass starts)
    COMPLETE   nothing: every page is sent and the source is stopped; target checks and answers READY
    FINISHED   nothing: SEND_FINISH succeeded on the source; the target may RECEIVE_FINISH
    ABORT      utf-8 reason: the source gives up (cancel or failure); the target discards its copy
    STATE      utf-8 run state of a source that was not running when it stopped (QEMU's global
               state: the target then ends in that state, e.g. paused, whatever its -S); sent
               just before COMPLETE, only when the state is not "running"
Target -> source:
    READY      every packet was accepted (MACs checked) and the target waits for FINISHED
    DONE       RECEIVE_FINISH succeeded: the guest runs on the target
    ERROR      utf-8 reason: the target refused the stream (e.g. BAD_MEASUREMENT)

The order COMPLETE -> READY -> SEND_FINISH -> FINISHED -> RECEIVE_FINISH is what keeps exactly one
runnable copy: the target never finishes unless the source has confirmed SEND_FINISH, and the
source never sends SEND_FINISH unless the target has everything.
"""

from __future__ import annotations

import socket
import struct
from enum import IntEnum
from typing import Protocol

import numpy as np

MAGIC = b"SEVLAB\x00\x01"
MAX_FRAME = 16 << 20
HDR = struct.Struct(">BI")
HDR_LEN = 52  # SEV packet header
MAX_PACKET = 0x5000


class Frame(IntEnum):
    HELLO = 0x01
    SEV_START = 0x02
    PRIVATE = 0x03
    SHARED = 0x04
    PASS = 0x05
    COMPLETE = 0x06
    FINISHED = 0x07
    ABORT = 0x08
    STATE = 0x09
    READY = 0x81
    DONE = 0x82
    ERROR = 0x83


class Reader(Protocol):
    """A buffered reader, as sock.makefile("rb") gives."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


class StreamError(Exception):
    """A malformed or truncated stream: fails this migration only."""


def frame_header(kind: Frame, length: int) -> bytes:
    return HDR.pack(int(kind), length)


def send_frame(sock: socket.socket, kind: Frame, payload: bytes | memoryview = b"") -> int:
    """Sends one frame with one gathered write; returns the bytes put on the wire."""
    return sendall_parts(sock, [frame_header(kind, len(payload)), payload])


def sendall_parts(sock: socket.socket, parts: list[bytes | memoryview]) -> int:
    """sendmsg() until every byte of `parts` is out (no concatenation copy of large buffers)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    total = sum(len(v) for v in views)
    while views:
        sent = sock.sendmsg(views)
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0
    return total


def recv_exact(src: socket.socket | Reader, n: int, what: str = "frame") -> bytearray:
    """n bytes from a socket or a buffered reader (sock.makefile("rb")), or StreamError."""
    buf = bytearray(n)
    view = memoryview(buf)
    read = src.recv_into if isinstance(src, socket.socket) else src.readinto
    got = 0
    while got < n:
        k = read(view[got:])
        if not k:
            raise StreamError(f"the stream ended in the middle of a {what} ({got} of {n} bytes)")
        got += k
    return buf


def recv_frame(sock: socket.socket | Reader) -> tuple[Frame, bytearray]:
    head = recv_exact(sock, HDR.size, "frame header")
    kind, length = HDR.unpack(head)
    try:
        frame = Frame(kind)
    except ValueError:
        raise StreamError(f"unknown frame type 0x{kind:02x}") from None
    if length > MAX_FRAME:
        raise StreamError(f"frame of {length} bytes is larger than the limit of {MAX_FRAME}")
    return frame, recv_exact(sock, length, frame.name) if length else bytearray()


# --- SEV_START (reference framing) ---------------------------------------------------------

def pack_sev_start(policy: int, pdh: bytes, session: bytes) -> bytes:
    return (struct.pack(">II", policy, len(pdh)) + pdh + struct.pack(">I", len(session)) + session)


def unpack_sev_start(payload: bytes | bytearray) -> tuple[int, bytes, bytes]:
    try:
        policy, pdh_len = struct.unpack_from(">II", payload, 0)
        pdh = bytes(payload[8:8 + pdh_len])
        (session_len,) = struct.unpack_from(">I", payload, 8 + pdh_len)
        session = bytes(payload[12 + pdh_len:12 + pdh_len + session_len])
    except struct.error:
        raise StreamError("SEV_START frame is truncated") from None
    if len(pdh) != pdh_len or len(session) != session_len or 12 + pdh_len + session_len != len(payload):
        raise StreamError("SEV_START frame lengths do not add up")
    return policy, pdh, session


# --- PRIVATE (n packets of reference framing) -----------------------------------------------

def packet_dtype(trans_len: int) -> np.dtype:
    return np.dtype([("hl", ">u4"), ("hdr", "u1", (HDR_LEN,)), ("tl", ">u4"), ("trans", "u1", (trans_len,))])


def pack_private(gpa: int, headers: bytes, trans: bytes | bytearray, packet_size: int) -> list[bytes | memoryview]:
    """One PRIVATE frame payload as parts for `sendall_parts`; vectorised so a batch costs one
    copy, not a Python loop per packet."""
    n = len(headers) // HDR_LEN
    if n * HDR_LEN != len(headers) or n * packet_size != len(trans):
        raise ValueError("headers and ciphertext do not match the packet count")
    rec = np.empty(n, dtype=packet_dtype(packet_size))
    rec["hl"] = HDR_LEN
    rec["hdr"] = np.frombuffer(headers, dtype=np.uint8).reshape(n, HDR_LEN)
    rec["tl"] = packet_size
    rec["trans"] = np.frombuffer(trans, dtype=np.uint8).reshape(n, packet_size)
    return [struct.pack(">QI", gpa, n), rec.view(np.uint8).data]


def unpack_private(payload: bytes | bytearray) -> tuple[int, bytes, bytes, int]:
    """-> (gpa, headers, trans, packet_size). Packets of unequal size or odd lengths are refused."""
    if len(payload) < 12 + 4:
        raise StreamError("PRIVATE frame is truncated")
    gpa, n = struct.unpack_from(">QI", payload, 0)
    if n == 0:
        raise StreamError("PRIVATE frame carries no packet")
    (hdr_len,) = struct.unpack_from(">I", payload, 12)
    if hdr_len != HDR_LEN:
        raise StreamError(f"SEV packet header length {hdr_len}, expected {HDR_LEN}")
    if len(payload) < 12 + 4 + HDR_LEN + 4:
        raise StreamError("PRIVATE frame is truncated")
    (trans_len,) = struct.unpack_from(">I", payload, 12 + 4 + HDR_LEN)
    if trans_len == 0 or trans_len > MAX_PACKET or trans_len % 16:
        raise StreamError(f"SEV packet length {trans_len} is not 1..0x5000 and a multiple of 16")
    dtype = packet_dtype(trans_len)
    if len(payload) - 12 != n * dtype.itemsize:
        raise StreamError(f"PRIVATE frame holds {len(payload) - 12} bytes, not {n} packets of {trans_len}")
    rec = np.frombuffer(payload, dtype=dtype, offset=12, count=n)
    if (rec["hl"] != HDR_LEN).any() or (rec["tl"] != trans_len).any():
        raise StreamError("SEV packets of one frame differ in length")
    return gpa, rec["hdr"].tobytes(), rec["trans"].tobytes(), trans_len
