"""Messages the workers post: each carries an immutable snapshot, never a live object."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from sevconsole.engine.attention import Attention
from sevconsole.engine.checks import Check
from sevconsole.engine.journal import Entry
from sevconsole.engine.progress import Progress
from sevconsole.engine.recover import Reconciled
from sevconsole.engine.run import Outcome
from sevconsole.hosts.report import HostReport
from sevconsole.tui.backend import HostKeyQuestion


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
    checks: tuple[Check, ...]


@dataclass
class ProgressPosted(Message):
    progress: Progress


@dataclass
class MigrationEnded(Message):
    result: Outcome


@dataclass
class MigrationsListed(Message):
    entries: tuple[Entry, ...]  # newest first


@dataclass
class RecoverDone(Message):
    results: tuple[Reconciled, ...]
    in_flight: tuple[Entry, ...]  # migrations other runners own


@dataclass
class AttentionFound(Message):
    items: tuple[Attention, ...]
