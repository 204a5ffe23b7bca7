"""The audit log: one JSON line per migration attempt, each carrying the SHA-256 of the line before.

Editing or removing a line breaks the chain at the next line; a small head file beside the log
(line count and hash of the last line) catches an edited or removed last line. With the audit key
(`paths.config_dir()/audit.key`, 32 random bytes made 0600 on first use, kept apart from the log's
data folder) every line and the head also carry an HMAC-SHA256, so rewriting the log and its head
consistently needs the key. The log is append-only under an exclusive lock, so two consoles never
interleave lines. A line torn by a crash (no newline at its end) is closed by the next append and
counted in the chain, and `verify` names it.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from sevconsole.boundedio import BoundedReadError, open_regular, read_bounded
from sevconsole.engine.checks import Check
from sevconsole.engine.plan import MigrationPlan

GENESIS = "0" * 64
LINE_LIMIT = 1024 * 1024  # one line the writer makes is about 1 KiB
KEY_FILE = "audit.key"
_DEFAULT: Any = object()  # "the console's audit key" (None means: no MAC)


class AuditError(OSError):
    """The audit log (or its key) cannot be read or written; `str()` is the sentence to show.

    An OSError, so code that already catches OSError around `record` keeps working."""

    def __init__(self, sentence: str) -> None:
        super().__init__(sentence)
        self.sentence = sentence

    def __str__(self) -> str:
        return self.sentence


@dataclass(frozen=True)
class AuditVerdict:
    ok: bool
    lines: int
    line: int | None = None  # 1-based line number of the first problem
    reason: str = ""
    notes: tuple[str, ...] = ()  # what is not a break but must be said (torn lines, no key)
    keyed: bool = False  # the MACs were checked with the audit key

    def sentence(self, path: Path) -> str:
        if self.ok:
            macs = ", MACs verified with the audit key" if self.keyed else ""
            return f"{path}: {self.lines} lines, hash chain intact{macs}"
        return f"{path}: line {self.line}: {self.reason}"


def line_hash(line: str | bytes) -> str:
    return hashlib.sha256(line.encode("utf-8") if isinstance(line, str) else line).hexdigest()


def head_file(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def key_file() -> Path:
    from sevconsole.paths import config_dir

    return config_dir() / KEY_FILE


def operator_name() -> str:
    try:
        return os.environ.get("SEVCONSOLE_OPERATOR") or getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


# ------------------------------------------------------------------ the key and the MACs


def audit_key(*, create: bool) -> bytes | None:
    """The console's audit key; made (0600) when `create` and absent. None: no key (and, when
    creating, none could be made: the log is then written without MACs)."""
    path = key_file()
    try:
        text = read_bounded(path, 4096, "audit key").decode("ascii", "replace").strip()
    except BoundedReadError as exc:
        if not exc.missing:
            raise AuditError(f"{exc}; the audit key must be a small file made by sevconsole") from None
        return _create_key(path) if create else None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise AuditError(f"audit key {path} is damaged (not the hex key sevconsole writes); restore it "
                         "from a backup, or move it aside to start unkeyed lines")
    return key


def _create_key(path: Path) -> bytes | None:
    key = secrets.token_bytes(32)
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key.hex() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # atomic, and never replaces a key another process just made
        except FileExistsError:
            return audit_key(create=False)
        return key
    except OSError:
        return None  # a read-only config folder: the log still works, without MACs
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _canonical(entry: dict[str, Any]) -> str:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"))


def _mac(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def _line_mac(key: bytes, entry: dict[str, Any]) -> str:
    return _mac(key, "line:" + _canonical({k: v for k, v in entry.items() if k != "mac"}))


def _head_mac(key: bytes, count: int, last: str) -> str:
    return _mac(key, f"head:{count}:{last}")


# ------------------------------------------------------------------ writing


def build_record(plan: MigrationPlan, checks: Sequence[Check], outcome: Any,
                 operator: str | None = None) -> dict[str, Any]:
    """The fields of one line (without seq/prev, which `append` adds). `outcome` is an Outcome."""
    return {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "operator": operator or operator_name(),
        "source": plan.source.name,
        "target": plan.target.name,
        "vm": plan.vm.name,
        "policy": None if plan.vm.policy is None else f"0x{plan.vm.policy:08x}",
        "sev": plan.sev,
        **_target_fingerprints(plan),
        "checks": [{"key": c.key, "status": c.status.value} for c in checks],
        "outcome": outcome.result,
        "message": outcome.message,
        "runnable": list(outcome.runnable),
        "bytes": outcome.bytes_transferred,
        "duration_s": round(outcome.duration_s, 3),
    }


def _target_fingerprints(plan: MigrationPlan) -> dict[str, str | None]:
    from sevconsole.sev.certs import SevCert, split_platform_chain
    from sevconsole.sev.errors import SevFormatError

    caps = plan.target.capabilities
    pdh = pek = None
    if caps is not None:
        with contextlib.suppress(SevFormatError, ValueError):
            pdh = SevCert.from_bytes(caps.pdh, "pdh.cert").fingerprint()
        with contextlib.suppress(SevFormatError, ValueError):
            pek = split_platform_chain(caps.cert_chain)[0].fingerprint()
    return {"target_pdh_sha256": pdh, "target_pek_sha256": pek}


def record(plan: MigrationPlan, checks: Sequence[Check], outcome: Any, path: Path | None = None,
           operator: str | None = None) -> dict[str, Any]:
    """Append the line for one migration attempt (refusals included) to `path` or the console's log.

    Raises AuditError (an OSError) with a sentence when the log cannot be written."""
    from sevconsole.paths import audit_log_file

    return append(path or audit_log_file(), build_record(plan, checks, outcome, operator))


def append(path: Path, record: dict[str, Any], *, key: bytes | None = _DEFAULT) -> dict[str, Any]:
    """Append `record` with its sequence number, the previous line's hash and (with the audit key)
    its MAC; returns the line's dict. Raises AuditError."""
    path = Path(path)
    if key is _DEFAULT:
        key = audit_key(create=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise _write_error(path, exc) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AuditError(f"audit log {path} is not a regular file; point SEVCONSOLE_DATA_DIR at a "
                         "folder where the log is a plain file")
    os.set_blocking(fd, True)
    with os.fdopen(fd, "a+b") as log:
        fcntl.flock(log, fcntl.LOCK_EX)
        try:
            log.seek(0)
            count, last, torn = 0, None, False
            for number, raw, complete in _read_lines(log, path):
                count, last, torn = number, raw, not complete
            if torn:
                log.write(b"\n")  # close a line a crash tore, so this one starts fresh
            prev = line_hash(last) if last is not None else GENESIS
            entry: dict[str, Any] = {"seq": count + 1, "prev": prev, **record}
            entry.pop("mac", None)
            if key is not None:
                entry["mac"] = _line_mac(key, entry)
            text = _canonical(entry)
            log.write(text.encode("utf-8") + b"\n")
            log.flush()
            os.fsync(log.fileno())
            _write_head(path, count + 1, line_hash(text), key)
        except OSError as exc:
            raise _write_error(path, exc) from None
        finally:
            fcntl.flock(log, fcntl.LOCK_UN)
    return entry


def _write_error(path: Path, exc: OSError) -> AuditError:
    if isinstance(exc, AuditError):
        return exc
    return AuditError(f"the audit log {path} cannot be written ({exc.strerror or exc}); fix its "
                      "folder's permissions, or set SEVCONSOLE_DATA_DIR to a writable folder")


def _write_head(path: Path, count: int, last: str, key: bytes | None) -> None:
    head = head_file(path)
    tmp = head.with_name(head.name + ".tmp")
    body: dict[str, Any] = {"lines": count, "last": last}
    if key is not None:
        body["mac"] = _head_mac(key, count, last)
    tmp.write_text(json.dumps(body) + "\n", encoding="utf-8")
    os.replace(tmp, head)


def _read_lines(handle: BinaryIO, path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, text without its newline, whether a newline ended it), one line in memory."""
    number = 0
    while True:
        raw = handle.readline(LINE_LIMIT + 1)
        if not raw:
            return
        number += 1
        complete = raw.endswith(b"\n")
        if not complete and len(raw) > LINE_LIMIT:
            raise AuditError(f"{path}: line {number} is longer than {LINE_LIMIT // (1024 * 1024)} MiB: "
                             "this is not an audit log sevconsole wrote; move it aside")
        yield number, raw[:-1] if complete else raw, complete


# ------------------------------------------------------------------ verifying


class _Break(Exception):
    def __init__(self, line: int, reason: str) -> None:
        super().__init__(reason)
        self.line, self.reason = line, reason


def verify(path: Path, *, key: bytes | None = _DEFAULT) -> AuditVerdict:
    """Walk the chain (and the MACs, when the audit key exists); the first broken link names its
    line. A missing log is fine only when its head file is missing too. Raises AuditError when the
    log cannot be read at all (not a regular file, unreadable, a line over 1 MiB)."""
    path = Path(path)
    if key is _DEFAULT:
        key = audit_key(create=False)
    try:
        handle = open_regular(path, "audit log")
    except BoundedReadError as exc:
        if not exc.missing:
            raise AuditError(str(exc)) from None
        if head_file(path).exists():
            return AuditVerdict(False, 0, 1, "the log is missing but its head file says it had lines")
        return AuditVerdict(True, 0)
    with handle:
        walk = _Walk(key)
        try:
            for number, raw, complete in _read_lines(handle, path):
                walk.line(number, raw, complete)
            walk.finish()
            verdict = _check_head(path, walk, key)
        except _Break as broken:
            return AuditVerdict(False, walk.count, broken.line, broken.reason, tuple(walk.notes), key is not None)
        except AuditError:
            raise
        except OSError as exc:
            raise AuditError(f"audit log {path} cannot be read: {exc.strerror or exc}") from None
    return verdict


class _Walk:
    """The chain's state while lines go by."""

    def __init__(self, key: bytes | None) -> None:
        self.key = key
        self.prev = GENESIS
        self.count = 0  # lines seen
        self.closed = 0  # lines with their newline (what the head counts)
        self.last_closed_hash = GENESIS
        self.suspect: int | None = None  # a line that did not parse: only a torn line may do that
        self.torn_tail = False  # the last line has no newline (a write in progress, or a crash)
        self.keyed_from: int | None = None  # first line carrying a MAC
        self.last_keyed = False
        self.closed_keyed = False  # the last line with its newline carries a MAC
        self.unkeyed = 0
        self.macs_unchecked = 0
        self.notes: list[str] = []

    def line(self, number: int, raw: bytes, complete: bool) -> None:
        self.count = number
        try:
            entry = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            entry = None
        if not isinstance(entry, dict):
            # A torn line is the start of a writer's line; the next line's `prev` must then be
            # its hash (checked below), which proves it was there, as it is, when that was written.
            if not raw.startswith(b'{"'):
                raise _Break(number, "not a JSON object (edited)" if entry is not None
                             else "not valid JSON (edited)")
            if self.suspect is not None:  # two in a row: nothing proves the first one
                raise _Break(self.suspect, "not valid JSON (edited)")
            self.suspect = number
        else:
            self._entry(number, entry)
        self.prev = line_hash(raw)
        self.torn_tail = not complete
        if complete:
            self.closed, self.last_closed_hash = number, self.prev
            self.closed_keyed = isinstance(entry, dict) and self.last_keyed

    def _entry(self, number: int, entry: dict[str, Any]) -> None:
        if entry.get("prev") != self.prev:
            if self.suspect == number - 1:
                raise _Break(number - 1, "not valid JSON (edited)")
            seq = entry.get("seq")
            if isinstance(seq, int) and seq > number:
                raise _Break(number, f"{seq - number} line(s) removed before it (it carries seq {seq})")
            if number == 1:
                raise _Break(1, "edited (the first line must carry the zero hash)")
            raise _Break(number - 1, f"edited: its hash no longer matches the one line {number} recorded")
        if entry.get("seq") != number:
            raise _Break(number, f"carries seq {entry.get('seq')} (edited)")
        if self.suspect == number - 1:
            self.notes.append(f"line {number - 1}: torn (a write cut short, e.g. by a crash); the next "
                              "append closed it and the chain runs through it")
            self.suspect = None
        mac = entry.get("mac")
        if mac is None:
            if self.keyed_from is not None:
                raise _Break(number, f"carries no MAC although line {self.keyed_from} and later ones do "
                             "(rewritten without the audit key)")
            self.unkeyed += 1
            self.last_keyed = False
            return
        if self.keyed_from is None:
            self.keyed_from = number
        self.last_keyed = True
        if self.key is None:
            self.macs_unchecked += 1
        elif not isinstance(mac, str) or not hmac.compare_digest(mac, _line_mac(self.key, entry)):
            raise _Break(number, "its MAC does not match (edited or rewritten without the audit key)")

    def finish(self) -> None:
        if self.suspect is not None and not (self.torn_tail and self.suspect == self.count):
            raise _Break(self.suspect, "not valid JSON (edited)")
        if self.torn_tail:
            self.notes.append(f"line {self.count}: torn (a write cut short, e.g. by a crash, or one in "
                              "progress); the next append starts a new line after it")
        if self.key is not None and self.closed and not self.closed_keyed:
            raise _Break(self.closed, f"carries no MAC though the audit key {key_file()} exists: the log "
                         "was rewritten without the key, or predates it")
        if self.macs_unchecked:
            self.notes.append(f"{self.macs_unchecked} line MAC(s) not checked: no audit key at {key_file()}")
        if self.unkeyed and self.keyed_from is not None:
            self.notes.append(f"lines 1-{self.keyed_from - 1} carry no MAC (written before the audit key existed)")


def _check_head(path: Path, walk: _Walk, key: bytes | None) -> AuditVerdict:
    notes = tuple(walk.notes)
    keyed = key is not None

    def bad(line: int, reason: str) -> AuditVerdict:
        return AuditVerdict(False, walk.count, line, reason, notes, keyed)

    try:
        head = json.loads(read_bounded(head_file(path), 4096, "audit head file"))
        count, head_last = int(head["lines"]), str(head["last"])
    except BoundedReadError as exc:
        if not exc.missing:
            return bad(walk.closed or 1, f"the head file cannot be read: {exc}")
        if walk.closed:
            return bad(walk.closed, "the head file is missing")
        return AuditVerdict(True, walk.count, notes=notes, keyed=keyed)
    except (ValueError, KeyError, TypeError) as exc:
        return bad(walk.closed or 1, f"the head file cannot be read: {exc}")
    if count > walk.closed:
        return bad(walk.closed + 1, f"missing: the log had {count} lines, {count - walk.closed} removed from its end")
    if count < walk.closed:
        return bad(count + 1, "appended without the audit writer")
    if walk.closed and head_last != walk.last_closed_hash:
        return bad(walk.closed, "the last line was edited")
    if keyed and walk.closed_keyed:
        mac = head.get("mac")
        if not isinstance(mac, str) or key is None or \
                not hmac.compare_digest(mac, _head_mac(key, count, head_last)):
            return bad(walk.closed, "the head file's MAC does not match (rewritten without the audit key)")
    return AuditVerdict(True, walk.count, notes=notes, keyed=keyed)
