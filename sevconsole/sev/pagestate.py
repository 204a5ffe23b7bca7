"""Per-page migration state of a guest, and its compact wire encoding.

One uint8 per page. zlib squeezes the long runs a real guest has (a 64 GiB guest is 16M
pages; mostly one state at a time), so the lab can answer a poll with the whole map.
"""

from __future__ import annotations

import base64
import zlib
from enum import IntEnum

import numpy as np

PAGE_SIZE = 4096
ENCODING = "zlib-u8-base64"


class PageState(IntEnum):
    PRIVATE_UNSENT = 0
    PRIVATE_SENT = 1
    PRIVATE_DIRTY = 2  # dirtied since it was sent
    SHARED_UNSENT = 3
    SHARED_SENT = 4
    SHARED_DIRTY = 5


STATE_COUNT = len(PageState)


class PageStateError(ValueError):
    """A page-state answer that cannot be decoded."""


def encode_states(states: np.ndarray) -> str:
    raw = np.ascontiguousarray(states, dtype=np.uint8).tobytes()
    return base64.b64encode(zlib.compress(raw, 1)).decode("ascii")


def decode_states(data: str, count: int) -> np.ndarray:
    try:
        raw = zlib.decompress(base64.b64decode(data, validate=True), bufsize=max(count, 1))
    except (ValueError, zlib.error) as exc:
        raise PageStateError(f"page state is not valid {ENCODING}: {exc}") from exc
    if len(raw) != count:
        raise PageStateError(f"page state holds {len(raw)} pages, expected {count}")
    states = np.frombuffer(raw, dtype=np.uint8)
    if count and int(states.max()) >= STATE_COUNT:
        raise PageStateError(f"page state has an unknown state {int(states.max())}")
    return states


def counts(states: np.ndarray) -> dict[PageState, int]:
    hist = np.bincount(states, minlength=STATE_COUNT)
    return {s: int(hist[s]) for s in PageState}
