"""Messages the workers post: each carries an immutable snapshot, never a live object."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from sevconsole.engine.progress import Progress
from sevconsole.hosts.report import HostReport
from sevconsole.tui.backend import CheckLine, HostKeyQuestion, Result


@dataclass
class HostProbed(Message):
    report: HostReport


@dataclass
class HostProbeFailed(Message):
    host: str
    sentence: str


@dataclass
class HostKeyAsked(Message):
    question: HostKeyQuestion


@dataclass
class PreflightDone(Message):
    target: str
    checks: tuple[CheckLine, ...]


@dataclass
class ProgressPosted(Message):
    progress: Progress


@dataclass
class MigrationEnded(Message):
    result: Result


@dataclass
class MigrationsListed(Message):
    entries: tuple[object, ...]  # engine.journal.Entry, newest first


@dataclass
class RecoverDone(Message):
    results: tuple[object, ...]  # engine.recover.Reconciled
    in_flight: tuple[object, ...]  # engine.journal.Entry of migrations other runners own


@dataclass
class AttentionFound(Message):
    items: tuple[object, ...]  # engine.attention.Attention
