"""Reading files an operator names (certificates, inventories, configs, audit logs) safely.

`/dev/zero` given as a certificate must not eat the memory, and a FIFO must not hang the command:
every such file is opened without blocking, must be a regular file, and is read up to a limit.
Errors are `BoundedReadError` (an OSError, so existing `except OSError` still catch them) whose
`str()` is one sentence naming the file. Stdlib only: every layer uses it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

KIB = 1024
MIB = 1024 * KIB

# Limits by kind of file: far above anything real, far below what hurts.
CERT_LIMIT = 64 * KIB  # a platform chain is 6252 bytes, 8.4 KiB in base64
INVENTORY_LIMIT = 4 * MIB  # thousands of hosts
CONFIG_LIMIT = 1 * MIB  # console.toml, themes, ~/.ssh/config
KNOWN_HOSTS_LIMIT = 16 * MIB  # ~100k keys


class BoundedReadError(OSError):
    """A file that cannot be read as asked: missing, not a regular file, too large, unreadable.

    `str()` is "<what> <path>: <reason>"; `.reason` alone suits messages that name the file already."""

    def __init__(self, path: str | os.PathLike[str], what: str, reason: str, *, missing: bool = False) -> None:
        self.path = Path(path)
        self.reason = reason
        self.sentence = f"{what} {path}: {reason}"
        super().__init__(self.sentence)
        self.missing = missing  # no such file (callers may treat that as "nothing yet")

    def __str__(self) -> str:
        return self.sentence


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _size(n: int) -> str:
    return f"{n / MIB:g} MiB" if n >= MIB else f"{n / KIB:g} KiB" if n >= KIB else f"{n} bytes"


def open_regular(path: str | os.PathLike[str], what: str) -> BinaryIO:
    """Open `path` for reading in binary mode; refuse anything but a regular file without blocking.

    O_NONBLOCK makes opening a FIFO return at once (a blocking open waits for a writer); the
    flag is cleared again once fstat shows a regular file, where it changes nothing anyway."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise BoundedReadError(path, what, "no such file", missing=True) from None
    except IsADirectoryError:
        raise BoundedReadError(path, what, "is a folder, not a regular file; give a file") from None
    except OSError as exc:
        raise BoundedReadError(path, what, f"cannot be read ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise BoundedReadError(path, what, f"is {_kind(mode)}, not a regular file; give a file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: str | os.PathLike[str], limit: int, what: str) -> bytes:
    """The whole of a regular file of at most `limit` bytes. `what` names it in errors
    ("certificate", "inventory", ...)."""
    with open_regular(path, what) as handle:
        try:
            size = os.fstat(handle.fileno()).st_size
            if size > limit:
                raise BoundedReadError(path, what, f"{_size(size)}, more than the {_size(limit)} such a "
                                       "file can be; is it the right file?")
            data = handle.read(limit + 1)  # /proc-like files say size 0: the read is the bound
        except BoundedReadError:
            raise
        except OSError as exc:
            raise BoundedReadError(path, what, f"cannot be read ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise BoundedReadError(path, what, f"more than the {_size(limit)} such a file can be; is it "
                               "the right file?")
    return data


def read_text_bounded(path: str | os.PathLike[str], limit: int, what: str) -> str:
    """Like read_bounded, decoded as UTF-8; a file that is not UTF-8 is a BoundedReadError too."""
    data = read_bounded(path, limit, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise BoundedReadError(path, what, f"not UTF-8 text (line {line}, byte {exc.start}); save it "
                               "as UTF-8") from None
