"""Typed errors of the engine; each carries a sentence an operator can act on."""

from __future__ import annotations


class EngineError(Exception):
    """Base of the engine's errors. `str()` is the sentence shown to the operator."""


class LinkError(EngineError):
    """A host could not be reached or did not do what was asked (SSH, QMP, helper)."""

    def __init__(self, host: str, message: str) -> None:
        super().__init__(f"{host}: {message}")
        self.host = host
