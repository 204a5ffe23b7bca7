"""The end-of-migration invariant and digest comparison, shared by every view of an outcome."""

from __future__ import annotations


class GuestCopies:
    """Mixin for outcome dataclasses with `runnable`, `digest_source` and `digest_target`."""

    runnable: tuple[str, ...]
    digest_source: str | None
    digest_target: str | None

    @property
    def one_copy(self) -> bool:
        """The invariant: exactly one runnable copy of the guest."""
        return len(self.runnable) == 1

    @property
    def digest_match(self) -> bool | None:
        if self.digest_source is None or self.digest_target is None:
            return None
        return self.digest_source == self.digest_target
