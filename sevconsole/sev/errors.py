"""Typed errors of the SEV domain.

A parser lets exactly one exception escape, `SevFormatError`, and it says which certificate and
which byte was wrong, so the operator can tell a truncated download from a foreign format.
"""

from __future__ import annotations


class SevFormatError(ValueError):
    """Malformed bytes: `cert` names the certificate, `offset` the first byte that is wrong."""

    def __init__(self, cert: str, offset: int, message: str) -> None:
        self.cert = cert
        self.offset = offset
        self.message = message
        super().__init__(f"{cert}: byte {offset:#x}: {message}")

    def __reduce__(self) -> tuple[type[SevFormatError], tuple[str, int, str]]:  # keep pickling (multiprocessing, workers) working with three args
        return (type(self), (self.cert, self.offset, self.message))
