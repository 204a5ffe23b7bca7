"""The QEMU-like command line a lab VM shows (probe) and the one launch-incoming reads.

Lab VMs are not processes, but they show the argv a real SEV guest would have, so the
console's code that reads real QEMU command lines works on them unchanged:

    qemu-system-x86_64 -name web -machine q35,confidential-guest-support=sev0 -m 64
        -object sev-guest,id=sev0,policy=0x18000033,cbitpos=51,reduced-phys-bits=1
        -qmp unix:/.../web.qmp,server=on,wait=off -display none
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

CBITPOS = 51
REDUCED_PHYS_BITS = 1

# A lab host serves the helper protocol natively, so its launch-incoming refuses what the helper's
# re-check refuses (hosts/helper.py holds the same two lists; a test keeps them equal). The lab
# reads only the options it models and ignores the source's plumbing (-qmp, -pidfile, ...).
NEVER_OPTIONS = ("-readconfig", "-writeconfig", "-plugin", "-add-fd", "-fw_cfg", "-kernel", "-initrd",
                 "-dtb", "-L", "-mem-path", "-run-with", "-runas", "-chroot", "-drive", "-blockdev",
                 "-hda", "-hdb", "-hdc", "-hdd", "-cdrom", "-fda", "-fdb", "-pflash", "-mtdblock", "-sd",
                 "-loadvm", "-D", "-trace")
NEVER_KEYS = ("helper", "script", "downscript", "mem-path", "smb", "guestfwd", "hostfwd", "tftp",
              "bootfile", "file", "filename", "path", "logfile", "sysfsdev", "evdev", "dh-cert-file",
              "session-file", "firmware", "kernel", "initrd", "dtb", "dumpdtb", "splash", "romfile")


class ArgvError(ValueError):
    """A command line launch-incoming cannot use; the sentence says which option."""


@dataclass(frozen=True)
class VmConfig:
    name: str
    mem_mib: int
    sev: bool
    policy: int
    autostart: bool = True  # no -S
    cbitpos: int | None = None
    reduced_phys_bits: int | None = None


def build_argv(name: str, mem_mib: int, sev: bool, policy: int, qmp_path: str, *,
               incoming: bool = False, autostart: bool = True) -> list[str]:
    # QEMU's escape for a comma; guest= keeps a name with '=' from reading as key=value
    shown = name.replace(",", ",,")
    argv = ["qemu-system-x86_64", "-name", f"guest={shown}" if "=" in name else shown]
    if sev:
        argv += ["-machine", "q35,confidential-guest-support=sev0", "-m", str(mem_mib),
                 "-object", f"sev-guest,id=sev0,policy=0x{policy:x},cbitpos={CBITPOS},"
                            f"reduced-phys-bits={REDUCED_PHYS_BITS}"]
    else:
        argv += ["-machine", "q35", "-m", str(mem_mib)]
    if not autostart:
        argv.append("-S")
    argv += ["-qmp", f"unix:{qmp_path},server=on,wait=off", "-display", "none"]
    if incoming:
        argv += ["-incoming", "defer"]
    return argv


_SIZE = re.compile(r"^(\d+)([KMGT]?)B?$", re.IGNORECASE)
_SCALE_MIB = {"": 1.0, "K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0 * 1024}


def _mem_mib(value: str) -> int:
    # -m 64 | -m 64M | -m 1G | -m size=1G,slots=...,maxmem=...
    first = value.split(",")[0]
    first = first.removeprefix("size=")
    m = _SIZE.match(first.strip())
    if not m:
        raise ArgvError(f"-m {value!r} is not a memory size such as 64, 512M or 1G")
    mib = int(m.group(1)) * _SCALE_MIB[m.group(2).upper()]
    if mib < 1 or mib != int(mib):
        raise ArgvError(f"-m {value!r}: the lab needs a whole number of MiB, at least 1")
    return int(mib)


def _opts(value: str, implied: str | None = None, *, json_form: bool = True) -> dict[str, str]:
    """An option string read as QEMU reads it: a parameter is key=value when '=' comes before any
    ',', else the implied key's value (first parameter only) or a flag; ',,' in a value is a comma.
    With `json_form`, a value starting with '{' is JSON (as -object and -device take it)."""
    if json_form and value.startswith("{"):
        try:
            data = json.loads(value)
        except ValueError:
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    out: dict[str, str] = {}
    pos, first = 0, True
    while pos < len(value):
        stop = pos
        while stop < len(value) and value[stop] not in "=,":
            stop += 1
        if stop < len(value) and value[stop] == "=":
            key, (val, pos) = value[pos:stop], _value(value, stop + 1)
        elif first and implied is not None:
            key, (val, pos) = implied, _value(value, pos)
        else:
            key, val, pos = value[pos:stop], "on", stop
        out[key] = val
        first = False
        pos += 1
    return out


def _value(text: str, pos: int) -> tuple[str, int]:
    chars = []
    while pos < len(text):
        if text[pos] == ",":
            if text[pos + 1:pos + 2] != ",":
                break
            pos += 1
        chars.append(text[pos])
        pos += 1
    return "".join(chars), pos


def refuse_never(argv: list[str]) -> None:
    """What the helper's re-check refuses (see NEVER_OPTIONS), as an ArgvError naming it."""
    for arg in argv[1:]:
        name = arg[1:] if arg.startswith("--") else arg
        if name in NEVER_OPTIONS:
            raise ArgvError(f"refused {name}, which would make this host open or run what the source named")
        for key, val in _opts(arg).items():
            if key in NEVER_KEYS and val != "":
                raise ArgvError(f"refused {key}= in {arg[:80]!r}, which would make this host open or run "
                                "what the source named")


def parse_argv(argv: list[str]) -> VmConfig:
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ArgvError("argv must be a list of strings")
    refuse_never(argv)
    name: str | None = None
    mem = 128  # QEMU's default
    sev = False
    policy = 0x1  # QEMU's default SEV policy
    cbit = rpb = None
    autostart = True
    i = 0
    while i < len(argv):
        opt = argv[i]
        val = argv[i + 1] if i + 1 < len(argv) else None
        if opt in ("-name", "-m", "-object"):
            if val is None:
                raise ArgvError(f"{opt} has no value")
            if opt == "-name":
                name = _opts(val, "guest", json_form=False).get("guest")
            elif opt == "-m":
                mem = _mem_mib(val)
            else:
                props = _opts(val, "qom-type")
                if props.get("qom-type") == "sev-guest":
                    sev = True
                    try:
                        policy = int(props.get("policy", "0x1"), 0)
                        cbit = int(props["cbitpos"]) if "cbitpos" in props else None
                        rpb = int(props["reduced-phys-bits"]) if "reduced-phys-bits" in props else None
                    except ValueError:
                        raise ArgvError(f"-object {val}: policy, cbitpos and reduced-phys-bits must be numbers") from None
                    if not 0 <= policy <= 0xFFFFFFFF:
                        raise ArgvError(f"-object {val}: policy does not fit in 32 bits")
            i += 2
        elif opt == "-S":
            autostart = False
            i += 1
        else:
            i += 1
    if not name:
        raise ArgvError("the source command line has no -name, so the incoming VM cannot be named")
    return VmConfig(name=name, mem_mib=mem, sev=sev, policy=policy, autostart=autostart,
                    cbitpos=cbit, reduced_phys_bits=rpb)
