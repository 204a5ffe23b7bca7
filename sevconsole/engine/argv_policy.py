"""The target's QEMU command line, built from the source's through an allow-list.

The source host tells us its VM's argv (the probe). A compromised source can put anything
there, and the target runs what we hand it: `-netdev bridge,helper=CMD` runs CMD on the target.
So the target's command line is never the source's: each option is looked up here and is
- kept, when it is on the allow-list and every value passes its check (sizes, counts, ids,
  machine and CPU models, the sev-guest object's numbers, devices by driver and property);
- left behind, when it is the source host's own plumbing the target replaces with its own
  (-qmp, -monitor, -mon and its chardev, -pidfile, -daemonize, -incoming, -D, -d, -trace, -loadvm);
- rewritten, where the source names a file the target has no use for: a file-backed guest RAM
  (memory-backend-file) becomes anonymous RAM of the same id and size (its pages come from the
  migration stream), and sev-guest's launch inputs (dh-cert-file, session-file) are dropped
  (an incoming guest gets its keys from RECEIVE_START, not LAUNCH_START);
- refused, naming the option, for everything else: anything that would make the target run,
  load or open what the source named (helpers, scripts, plugins, config files, disk images,
  kernels, file or socket chardevs, fw_cfg files, tap/bridge/socket networks, ROM files),
  change who QEMU runs as, or is simply not known here.

Disks are refused unless the inventory declares shared storage for the target (`storage`: its
folders): a `-drive`/`-blockdev` path chosen by the source would let the migrated guest read or
write that path on the target, so only raw images under those folders pass (a qcow2 image names
its backing file inside itself, and a probed format lets the guest choose one). Firmware is the
other path allowed: `-bios` naming a plain file name or a file under the system firmware folders
(read-only, public, and its contents are overwritten by the migration stream anyway).

Pure: no I/O, standard library only. The engine applies it before any launch (the HostLinks in
tests/engine/local.py and engine/ssh.py); preflight reports the same verdict (engine/checks.py).
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sevconsole.hosts.diskpaths import folders, under_storage
from sevconsole.textsafe import redact_arg

# QEMU binaries that may run an SEV guest; the target resolves the name in its own folders.
PROGRAMS = ("qemu-system-x86_64", "qemu-kvm")
FIRMWARE_DIRS = ("/usr/share/OVMF/", "/usr/share/ovmf/", "/usr/share/edk2/", "/usr/share/edk2-ovmf/",
                 "/usr/share/qemu/", "/usr/share/seabios/")

RUN = "which would make {target} run a program the source named"
OPEN = "which would make {target} open a path the source named"
DISK = ("which would make {target} open a disk image the source named (sevconsole carries no "
        "disks: a guest with disks cannot be migrated by it)")
NET = "which would make {target} open a network connection, port or device the source named"
PRIV = "which would change the user, root folder or privileges QEMU runs with on {target}"
UNKNOWN = "which is not on the list of options sevconsole carries to {target}"
VALUE = "a value sevconsole does not carry to {target}"


@dataclass(frozen=True)
class Refusal:
    """Why the source's command line cannot become the target's: the option and the harm."""

    option: str  # as the source has it, shortened: "-netdev bridge with helper="
    reason: str  # "which would make {target} ..." ({target} is filled in by sentence())

    def sentence(self, target: str = "the target") -> str:
        return f"the source's command line has {self.option}, {self.reason.replace('{target}', target)}; refused"


@dataclass(frozen=True)
class TargetArgv:
    argv: tuple[str, ...]  # without -qmp and -incoming: the launcher adds its own
    left_behind: tuple[str, ...] = ()  # the source host's own plumbing, e.g. "-pidfile"
    rewritten: tuple[str, ...] = ()  # sentences: what the target gets instead of what the source named


class ArgvRefused(ValueError):
    """Raised by require_target_argv; `str()` is the refusal's sentence for that target."""

    def __init__(self, refusal: Refusal, target: str) -> None:
        super().__init__(refusal.sentence(target))
        self.refusal = refusal


def require_target_argv(source: Sequence[str], target: str = "the target", *,
                        storage: Sequence[str] = ()) -> TargetArgv:
    verdict = target_argv(source, storage=storage)
    if isinstance(verdict, Refusal):
        raise ArgvRefused(verdict, target)
    return verdict


def target_argv(source: Sequence[str], *, storage: Sequence[str] = ()) -> TargetArgv | Refusal:
    """The command line the target may run for the source's VM, or why there is none. `storage`:
    the target's shared storage folders (absolute), the only place a disk image may be."""
    try:
        return _Builder(list(source), folders(storage)).build()
    except _Refuse as exc:
        return exc.refusal


# ---------------------------------------------------------------------------- values

_CTRL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_TOKEN = re.compile(r"^[A-Za-z0-9_.:+-]{1,128}$")  # no '/', ',', '=', spaces: never a path
_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$")  # QEMU's id_wellformed()
_INT = re.compile(r"^(0x[0-9a-fA-F]{1,16}|\d{1,19})$")
_SIZE = re.compile(r"^\d{1,19}(\.\d{1,6})?[bBkKmMgGtTpPeE]?$")
_IPNET = re.compile(r"^[0-9A-Fa-f:.]{1,45}(/\d{1,3})?$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_MACHINE = re.compile(r"^(pc|q35|pc-(q35|i440fx)-[A-Za-z0-9.]{1,32})$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,127}$")
_FIRMWARE_PATH = re.compile(r"^/[A-Za-z0-9._/+-]{1,255}$")

Check = Callable[[str], bool]


def _re(pattern: re.Pattern[str]) -> Check:
    return lambda v: bool(pattern.match(v))


def _one_of(*values: str) -> Check:
    return lambda v: v in values


TOKEN, ID, INT, SIZE, IPNET = _re(_TOKEN), _re(_ID), _re(_INT), _re(_SIZE), _re(_IPNET)
BOOL = _one_of("on", "off", "yes", "no", "true", "false", "y", "n")


def _int_in(low: int, high: int) -> Check:
    def check(v: str) -> bool:
        return bool(_INT.match(v)) and low <= int(v, 0) <= high
    return check


def _show(value: str) -> str:
    """An argv word as a refusal sentence quotes it: secrets redacted, short (control characters
    are refused, and quoted with repr, before they get here)."""
    value = redact_arg(value)
    return value if len(value) <= 60 else value[:57] + "..."


class _Refuse(Exception):
    def __init__(self, option: str, reason: str) -> None:
        super().__init__(option)
        self.refusal = Refusal(_show(option), reason)


# ---------------------------------------------------------------------------- QEMU option strings


_JSON_OPTIONS = ("-object", "-device", "-netdev", "-blockdev")


@dataclass(frozen=True)
class _Opts:
    """One option's value as QEMU reads it: key=value pairs (QemuOpts/keyval) or a JSON object."""

    values: dict[str, str]
    json: bool


def _parse(option: str, value: str, implied: str | None) -> _Opts:
    """'kind,a=b,flag' -> {implied: kind, a: b, flag: on}, read the way QEMU's option parser
    reads it: a parameter is key=value when '=' comes before any ',', else the implied key's
    value (first parameter only) or a flag; in values ',,' is a literal comma. A key given twice
    is refused: QEMU's parsers differ on which one wins, so we never guess. Only the options
    QEMU reads as JSON when they start with '{' are read as JSON here (_JSON_OPTIONS)."""
    if option in _JSON_OPTIONS and value.startswith("{"):
        return _Opts(_parse_json(option, value), True)
    out: dict[str, str] = {}
    pos, first = 0, True
    while pos < len(value):
        stop = pos
        while stop < len(value) and value[stop] not in "=,":
            stop += 1
        if stop < len(value) and value[stop] == "=":
            key = value[pos:stop]
            val, pos = _opt_value(value, stop + 1)
        elif first and implied is not None:
            key = implied
            val, pos = _opt_value(value, pos)
        else:
            key, val, pos = value[pos:stop], "on", stop
        if key in out:
            raise _Refuse(f"{option} {value}", f"which gives {key}= twice (QEMU's parsers disagree on which one counts)")
        out[key] = val
        first = False
        pos += 1  # the comma that ended this parameter
    return _Opts(out, False)


def _opt_value(text: str, pos: int) -> tuple[str, int]:
    """A value from `pos` up to a single comma; ',,' is a comma. Returns it and where it ended."""
    chars = []
    while pos < len(text):
        if text[pos] == ",":
            if text[pos + 1:pos + 2] != ",":
                break
            pos += 1
        chars.append(text[pos])
        pos += 1
    return "".join(chars), pos


def _parse_json(option: str, value: str) -> dict[str, str]:
    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        found: dict[str, object] = {}
        for key, val in items:
            if key in found:
                raise _Refuse(f"{option} {value}", f"which gives \"{key}\" twice (QEMU's parsers disagree on which one counts)")
            found[key] = val
        return found

    try:
        data = json.loads(value, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        raise _Refuse(f"{option} {value}", "whose JSON does not parse") from None
    if not isinstance(data, dict):
        raise _Refuse(f"{option} {value}", UNKNOWN)
    out: dict[str, str] = {}
    for key, val in data.items():
        if isinstance(val, bool):
            out[key] = "on" if val else "off"
        elif isinstance(val, int):
            out[key] = str(val)
        elif isinstance(val, str):
            out[key] = val
        else:  # nested objects and lists are never needed by what we allow
            raise _Refuse(f"{option} with {key}={_show(json.dumps(val))}", UNKNOWN)
    return out


def _emit(opts: dict[str, str], kind_key: str, as_json: bool) -> str:
    if as_json:
        return json.dumps(opts, separators=(",", ":"))
    kind = opts[kind_key]
    rest = [f"{k}={v.replace(',', ',,')}" for k, v in opts.items() if k != kind_key]
    return ",".join([kind.replace(",", ",,"), *rest])


# ---------------------------------------------------------------------------- what may pass

# Keys that name something to run, load or open: their own sentence wherever they appear.
_RUN_KEYS = {"helper", "script", "downscript"}
_PATH_KEYS = {"file", "filename", "path", "mem-path", "logfile", "romfile", "sysfsdev", "evdev", "dir",
              "firmware", "kernel", "initrd", "dtb", "dumpdtb", "splash", "tftp", "bootfile",
              "dh-cert-file", "session-file", "sev-device", "events", "x509-dir", "fd", "fds", "vhostfd",
              "vhostfds", "host", "hostdevice"}

_MEMORY_KEYS: dict[str, Check] = {
    "id": ID, "size": SIZE, "share": BOOL, "prealloc": BOOL, "prealloc-threads": INT, "merge": BOOL,
    "dump": BOOL, "host-nodes": TOKEN, "policy": _one_of("default", "preferred", "bind", "interleave"),
    "reserve": BOOL, "x-use-canonical-path-for-ramblock-id": BOOL,
}
_OBJECTS: dict[str, dict[str, Check]] = {
    "sev-guest": {"id": ID, "cbitpos": _int_in(0, 63), "reduced-phys-bits": _int_in(0, 63),
                  "policy": _int_in(0, 0xFFFFFFFF), "handle": _int_in(0, 0xFFFFFFFF), "kernel-hashes": BOOL,
                  "sev-device": _one_of("/dev/sev")},
    "memory-backend-ram": _MEMORY_KEYS,
    "memory-backend-memfd": {**_MEMORY_KEYS, "seal": BOOL, "hugetlb": BOOL, "hugetlbsize": SIZE},
    "secret": {"id": ID, "data": lambda v: bool(v), "format": _one_of("raw", "base64"), "keyid": ID,
               "iv": TOKEN},
    "rng-builtin": {"id": ID},
    "iothread": {"id": ID, "poll-max-ns": INT, "poll-grow": INT, "poll-shrink": INT, "aio-max-batch": INT},
}
# sev-guest's LAUNCH_START inputs: an incoming guest never reads them (RECEIVE_START keys it).
_SEV_LAUNCH_FILES = ("dh-cert-file", "session-file")

_PCI = {"bus": TOKEN, "addr": TOKEN, "multifunction": BOOL, "rombar": _one_of("0", "1"),
        "romfile": _one_of("")}  # romfile= (empty) turns the option ROM off; any file is refused
_VIRTIO = {**_PCI, "disable-legacy": _one_of("on", "off", "auto"), "disable-modern": BOOL,
           "iommu_platform": BOOL, "ats": BOOL, "packed": BOOL, "event_idx": BOOL, "indirect_desc": BOOL,
           "ioeventfd": BOOL, "vectors": INT}
_NIC = {"netdev": ID, "mac": _re(_MAC)}
_DISK_DEVICE = {"drive": ID, "bus": TOKEN, "bootindex": INT, "serial": TOKEN, "share-rw": BOOL,
                "write-cache": _one_of("on", "off", "auto"), "logical_block_size": INT,
                "physical_block_size": INT}
# -drive and -blockdev under shared storage: raw images only, every key known
_CACHE = _one_of("none", "writeback", "writethrough", "directsync", "unsafe")
_DRIVE_KEYS: dict[str, Check] = {
    "format": _one_of("raw"), "if": _one_of("none", "virtio", "ide", "scsi"), "id": ID, "index": INT,
    "bus": INT, "unit": INT, "media": _one_of("disk", "cdrom"), "readonly": BOOL, "cache": _CACHE,
    "aio": _one_of("threads", "native", "io_uring"), "discard": _one_of("ignore", "unmap", "off", "on"),
    "detect-zeroes": _one_of("off", "on", "unmap"), "werror": TOKEN, "rerror": TOKEN,
    "snapshot": _one_of("off", "no", "false"), "serial": TOKEN, "node-name": ID, "auto-read-only": BOOL,
    "copy-on-read": _one_of("off", "no", "false"),
}
_BLOCKDEV_COMMON: dict[str, Check] = {
    "node-name": ID, "read-only": BOOL, "auto-read-only": BOOL, "discard": _one_of("ignore", "unmap", "off", "on"),
    "detect-zeroes": _one_of("off", "on", "unmap"), "cache.direct": BOOL, "cache.no-flush": BOOL,
    "force-share": BOOL,
}
_BLOCKDEVS: dict[str, dict[str, Check]] = {
    "file": {**_BLOCKDEV_COMMON, "aio": _one_of("threads", "native", "io_uring"),
             "locking": _one_of("auto", "on", "off")},
    "host_device": {**_BLOCKDEV_COMMON, "aio": _one_of("threads", "native", "io_uring"),
                    "locking": _one_of("auto", "on", "off")},
    "raw": {**_BLOCKDEV_COMMON, "file": ID, "offset": INT, "size": INT},
}
_DEVICES: dict[str, dict[str, Check]] = {
    "virtio-net-pci": {**_VIRTIO, **_NIC, "mq": BOOL, "rx_queue_size": INT, "tx_queue_size": INT},
    "e1000": {**_PCI, **_NIC}, "e1000e": {**_PCI, **_NIC}, "rtl8139": {**_PCI, **_NIC},
    "virtio-serial-pci": {**_VIRTIO, "max_ports": INT},
    "virtconsole": {"chardev": ID, "name": TOKEN, "nr": INT, "bus": TOKEN},
    "virtserialport": {"chardev": ID, "name": TOKEN, "nr": INT, "bus": TOKEN},
    "isa-serial": {"chardev": ID, "index": INT, "iobase": INT, "irq": INT},
    "isa-debugcon": {"chardev": ID, "iobase": INT},
    "virtio-balloon-pci": {**_VIRTIO, "deflate-on-oom": BOOL, "free-page-reporting": BOOL},
    "virtio-rng-pci": {**_VIRTIO, "rng": ID, "max-bytes": INT, "period": INT},
    "virtio-scsi-pci": {**_VIRTIO, "num_queues": INT, "iothread": ID},
    "pcie-root-port": {**_PCI, "port": INT, "chassis": INT, "slot": INT},
    "pci-bridge": {**_PCI, "chassis_nr": INT},
    "qemu-xhci": {**_PCI, "p2": INT, "p3": INT}, "usb-ehci": _PCI, "ich9-usb-ehci1": _PCI,
    "usb-tablet": {"bus": TOKEN, "port": TOKEN}, "usb-kbd": {"bus": TOKEN, "port": TOKEN},
    "usb-mouse": {"bus": TOKEN, "port": TOKEN},
    "VGA": {**_PCI, "vgamem_mb": INT}, "virtio-vga": _VIRTIO, "virtio-gpu-pci": _VIRTIO,
    "pvpanic": {"ioport": INT, "events": INT},
    # disks: `drive=` names a -drive id or -blockdev node-name, itself checked against storage
    "virtio-blk-pci": {**_VIRTIO, **_DISK_DEVICE, "num-queues": INT, "iothread": ID},
    "scsi-hd": {**_DISK_DEVICE, "channel": INT, "scsi-id": INT, "lun": INT},
    "scsi-cd": {**_DISK_DEVICE, "channel": INT, "scsi-id": INT, "lun": INT},
    "ide-hd": {**_DISK_DEVICE, "unit": INT}, "ide-cd": {**_DISK_DEVICE, "unit": INT},
}
_USER_NET: dict[str, Check] = {
    "id": ID, "net": IPNET, "host": IPNET, "restrict": BOOL, "ipv4": BOOL, "ipv6": BOOL, "ipv6-net": IPNET,
    "ipv6-host": IPNET, "ipv6-prefix": IPNET, "ipv6-prefixlen": INT, "hostname": TOKEN,
    "dhcpstart": IPNET, "dns": IPNET, "ipv6-dns": IPNET, "domainname": TOKEN,
}
_MACHINE_KEYS: dict[str, Check] = {
    "accel": _re(re.compile(r"^(kvm|tcg)(:(kvm|tcg))*$")), "confidential-guest-support": ID,
    "memory-backend": ID, "kernel-irqchip": _one_of("on", "off", "split"), "smm": _one_of("on", "off", "auto"),
    "vmport": _one_of("on", "off", "auto"), "usb": BOOL, "graphics": BOOL, "dump-guest-core": BOOL,
    "mem-merge": BOOL, "sata": BOOL, "hpet": BOOL, "pit": BOOL, "pic": BOOL, "acpi": _one_of("on", "off", "auto"),
    "smbus": BOOL, "i8042": BOOL, "suppress-vmdesc": BOOL, "kvm-shadow-mem": SIZE, "max-ram-below-4g": SIZE,
}
_ACCEL_KEYS: dict[str, Check] = {
    "accel": _one_of("kvm", "tcg"), "thread": _one_of("single", "multi"), "tb-size": INT,
    "kernel-irqchip": _one_of("on", "off", "split"), "kvm-shadow-mem": SIZE, "dirty-ring-size": INT,
    "split-wx": BOOL,
}
_NET_KINDS = {"tap", "socket", "stream", "dgram", "vde", "vhost-user", "vhost-vdpa", "l2tpv3", "netmap",
              "af-xdp", "vmnet-host", "vmnet-shared", "vmnet-bridged"}
_GLOBALS = {("kvm-pit", "lost_tick_policy"), ("ICH9-LPC", "disable_s3"), ("ICH9-LPC", "disable_s4"),
            ("PIIX4_PM", "disable_s3"), ("PIIX4_PM", "disable_s4")}

# Options that take no value and are kept as they are.
_FLAGS = {"-S", "-nodefaults", "-no-user-config", "-enable-kvm", "-nographic", "-no-reboot",
          "-no-shutdown", "-no-hpet", "-no-acpi", "-mem-prealloc"}
# The source host's own plumbing: the target gets its own QMP socket and is not daemonized.
_LEFT_ALONE = {"-daemonize"}
_LEFT_WITH_VALUE = {"-qmp", "-qmp-pretty", "-monitor", "-mon", "-pidfile", "-incoming", "-D", "-d",
                    "-trace", "-loadvm"}
# Refused with their own sentence (the value is not looked at).
_REFUSED: dict[str, str] = {
    **dict.fromkeys(("-readconfig", "-writeconfig", "-kernel", "-initrd", "-dtb", "-L", "-mem-path",
                     "-fw_cfg", "-add-fd", "-k"), OPEN),
    **dict.fromkeys(("-hda", "-hdb", "-hdc", "-hdd", "-cdrom", "-fda", "-fdb",
                     "-pflash", "-mtdblock", "-sd", "-snapshot"), DISK),
    "-plugin": RUN,
    **dict.fromkeys(("-run-with", "-runas", "-chroot"), PRIV),
}


class _Builder:
    def __init__(self, source: list[str], storage: tuple[str, ...] = ()) -> None:
        self.source = source
        self.storage = storage
        self.out: list[str] = []
        self.left: list[str] = []
        self.notes: list[str] = []
        self.monitor_chardevs: set[str] = set()

    def build(self) -> TargetArgv:
        src = self.source
        if not src or not all(isinstance(a, str) for a in src):
            raise _Refuse("no QEMU program", "so there is nothing to start on {target}")
        for arg in src:
            if _CTRL.search(arg):
                raise _Refuse(repr(_show(arg)), "which holds a control character")
        program = posixpath.basename(src[0])
        if program not in PROGRAMS:
            raise _Refuse(f"the program {src[0]!r}", "which is not " + " or ".join(PROGRAMS)
                          + ", so {target} would run a program the source named")
        self.out.append(program)  # the target runs its own QEMU of that name, never a source path
        self.monitor_chardevs = self._monitor_chardevs()
        i = 1
        while i < len(src):
            raw = src[i]
            if not raw.startswith("-") or raw == "-":
                raise _Refuse(f"the bare word {raw!r}", "which QEMU opens as a disk image, so {target} would open a path the source named")
            opt = raw[1:] if raw.startswith("--") else raw
            if opt in _FLAGS:
                self.out.append(opt)
                i += 1
                continue
            if opt in _LEFT_ALONE:
                self.left.append(opt)
                i += 1
                continue
            if opt in _REFUSED:
                raise _Refuse(opt, _REFUSED[opt])
            handler = _HANDLERS.get(opt)
            if handler is None and opt not in _LEFT_WITH_VALUE:
                raise _Refuse(opt, UNKNOWN)
            if i + 1 >= len(src):
                raise _Refuse(f"{opt} without a value", UNKNOWN)
            value = src[i + 1]
            if value.startswith("-") and opt not in _LEFT_WITH_VALUE:
                # QEMU takes it as the value; a reader that does not know the option's arity
                # (the helper's re-check) would take it as an option: never let the two differ
                raise _Refuse(f"{opt} {value}", "whose value looks like an option")
            if opt in _LEFT_WITH_VALUE:
                self.left.append(opt)
            else:
                assert handler is not None
                kept = handler(self, opt, value)
                if kept is not None:
                    self.out += [opt, kept]
            i += 2
        return TargetArgv(tuple(self.out), tuple(dict.fromkeys(self.left)), tuple(self.notes))

    def _monitor_chardevs(self) -> set[str]:
        """Chardevs a -mon uses: the source's monitor sockets, left behind with the -mon."""
        found = set()
        src = self.source
        for i, arg in enumerate(src[:-1]):
            if arg in ("-mon", "--mon"):
                with_value = _parse("-mon", src[i + 1], "chardev").values
                if "chardev" in with_value:
                    found.add(with_value["chardev"])
        return found

    # -- option handlers: return the value to keep (maybe rewritten), None to leave it behind

    def name(self, opt: str, value: str) -> str:
        opts = _parse(opt, value, "guest")
        self._keys(opt, value, opts.values, {"guest": lambda v: 0 < len(v) <= 256, "debug-threads": BOOL,
                                             "process": TOKEN})
        return value

    def memory(self, opt: str, value: str) -> str:
        opts = _parse(opt, value, "size")
        self._keys(opt, value, opts.values, {"size": SIZE, "slots": INT, "maxmem": SIZE})
        return value

    def smp(self, opt: str, value: str) -> str:
        opts = _parse(opt, value, "cpus")
        keys = ("cpus", "sockets", "dies", "clusters", "cores", "threads", "maxcpus", "books", "drawers")
        self._keys(opt, value, opts.values, dict.fromkeys(keys, _int_in(1, 4096)))
        return value

    def machine(self, opt: str, value: str) -> str:
        opts = _parse(opt, value, "type").values
        self._keys(opt, value, opts, {"type": _re(_MACHINE), **_MACHINE_KEYS})
        return value

    def accel(self, opt: str, value: str) -> str:
        self._keys(opt, value, _parse(opt, value, "accel").values, _ACCEL_KEYS)
        return value

    def cpu(self, opt: str, value: str) -> str:
        model, _, rest = value.partition(",")
        if not _TOKEN.match(model):
            raise _Refuse(f"{opt} {value}", "whose CPU model is not a plain name")
        for feature in rest.split(",") if rest else ():
            key, eq, val = feature.partition("=")
            bare = key[1:] if key[:1] in "+-" and not eq else key
            if not _TOKEN.match(bare) or (eq and not _TOKEN.match(val)):
                raise _Refuse(f"{opt} {value}", f"whose feature {feature!r} is not a plain name")
        return value

    def object(self, opt: str, value: str) -> str | None:
        parsed = _parse(opt, value, "qom-type")
        opts = dict(parsed.values)
        kind = opts.get("qom-type", "")
        what = f"-object {kind}"
        if kind == "memory-backend-file":
            self._no_run_keys(what, opts)
            kept = {k: v for k, v in opts.items() if k in _MEMORY_KEYS}
            self._keys(what, value, kept, _MEMORY_KEYS)
            self.notes.append(f"memory-backend-file {kept.get('id', '')} becomes anonymous RAM of the same "
                              "size (memory-backend-ram): its pages come from the migration stream, "
                              "the source's mem-path is not opened")
            return _emit({"qom-type": "memory-backend-ram", **kept}, "qom-type", parsed.json)
        dropped = [k for k in _SEV_LAUNCH_FILES if k in opts] if kind == "sev-guest" else []
        for key in dropped:
            del opts[key]
        if dropped:
            self.notes.append(f"sev-guest's {' and '.join(dropped)} (launch inputs) are not given to the "
                              "incoming guest: its keys come from RECEIVE_START")
        allowed = _OBJECTS.get(kind)
        if allowed is None:
            self._no_run_keys(what, opts)
            raise _Refuse(what, OPEN if "mem-path" in opts or "filename" in opts else UNKNOWN)
        self._keys(what, value, opts, {"qom-type": TOKEN, **allowed})
        return _emit(opts, "qom-type", parsed.json) if dropped else value

    def device(self, opt: str, value: str) -> str:
        opts = _parse(opt, value, "driver").values
        driver = opts.get("driver", "")
        allowed = _DEVICES.get(driver)
        what = f"-device {driver}"
        if allowed is None:
            self._no_run_keys(what, opts)
            raise _Refuse(what, UNKNOWN)
        self._keys(what, value, opts, {"driver": TOKEN, "id": ID, **allowed})
        return value

    def netdev(self, opt: str, value: str) -> str:
        opts = _parse(opt, value, "type").values
        kind = opts.get("type", "")
        what = f"{opt} {kind}"
        if opt == "-nic" and kind == "none" and len(opts) == 1:
            return value
        if kind == "user":
            if "hostfwd" in opts:
                raise _Refuse(f"{what} with hostfwd=", "which would open a port on {target}")
            if "guestfwd" in opts:
                raise _Refuse(f"{what} with guestfwd=", RUN if "cmd:" in opts["guestfwd"] else NET)
            if "smb" in opts:
                raise _Refuse(f"{what} with smb=", "which would make {target} run smbd on a folder the source named")
            self._no_run_keys(what, opts)
            extra = {"model": lambda v: v in _DEVICES, "mac": _re(_MAC)} if opt == "-nic" else {}
            self._keys(what, value, opts, {"type": TOKEN, **_USER_NET, **extra})
            return value
        self._no_run_keys(what, opts)
        if kind == "bridge":
            raise _Refuse(what, RUN)  # qemu-bridge-helper runs even when helper= is not given
        raise _Refuse(what, NET if kind in _NET_KINDS else UNKNOWN)

    def net(self, opt: str, value: str) -> str:
        if value == "none":
            return value
        return self.netdev(opt, value)

    def chardev(self, opt: str, value: str) -> str | None:
        opts = _parse(opt, value, "backend").values
        backend = opts.get("backend", "")
        if opts.get("id") in self.monitor_chardevs:
            self.left.append(f"-chardev {opts['id']}")  # the source's monitor: the target has its own
            return None
        what = f"-chardev {backend}"
        self._no_run_keys(what, opts)
        if backend not in ("null", "pty", "ringbuf", "memory"):
            raise _Refuse(what, NET if backend in ("socket", "udp", "dbus", "spicevmc", "spiceport") else
                          OPEN if backend in ("file", "pipe", "serial", "tty", "parallel", "parport") else UNKNOWN)
        self._keys(what, value, opts, {"backend": TOKEN, "id": ID, "mux": BOOL, "size": SIZE})
        return value

    def serial(self, opt: str, value: str) -> str:
        if value in ("none", "null", "pty", "stdio") or (value.startswith("chardev:") and _ID.match(value[8:])):
            return value
        scheme = value.split(":", 1)[0]
        if scheme in ("tcp", "udp", "telnet", "websocket", "unix", "vc"):
            raise _Refuse(f"{opt} {value}", NET)
        if "/" in value or scheme in ("file", "pipe", "mon"):
            raise _Refuse(f"{opt} {value}", OPEN)
        raise _Refuse(f"{opt} {value}", UNKNOWN)

    def parallel(self, opt: str, value: str) -> str:
        if value == "none":
            return value
        raise _Refuse(f"{opt} {value}", OPEN if "/" in value or ":" in value else UNKNOWN)

    def display(self, opt: str, value: str) -> str:
        if value == "none":
            return value
        raise _Refuse(f"{opt} {value}", "which would open a display or listen on {target}")

    def vga(self, opt: str, value: str) -> str:
        if value in ("none", "std", "virtio", "cirrus"):
            return value
        raise _Refuse(f"{opt} {value}", UNKNOWN)

    def uuid(self, opt: str, value: str) -> str:
        if _UUID.match(value):
            return value
        raise _Refuse(f"{opt} {value}", "which is not a UUID")

    def rtc(self, opt: str, value: str) -> str:
        date = _re(re.compile(r"^\d{4}-\d\d-\d\d(T\d\d:\d\d:\d\d)?$"))
        self._keys(opt, value, _parse(opt, value, None).values, {
            "base": lambda v: v in ("utc", "localtime") or date(v), "clock": _one_of("host", "rt", "vm"),
            "driftfix": _one_of("none", "slew")})
        return value

    def boot(self, opt: str, value: str) -> str:
        self._keys(opt, value, _parse(opt, value, "order").values, {
            "order": TOKEN, "once": TOKEN, "menu": BOOL, "strict": BOOL, "reboot-timeout": INT,
            "splash-time": INT})
        return value

    def global_(self, opt: str, value: str) -> str:
        opts = _parse(opt, value, None).values
        if set(opts) == {"driver", "property", "value"}:
            driver, prop, val = opts["driver"], opts["property"], opts["value"]
        elif len(opts) == 1:
            (key, val), = opts.items()
            driver, _, prop = key.partition(".")
        else:
            raise _Refuse(f"{opt} {value}", UNKNOWN)
        if (driver, prop) not in _GLOBALS or not _TOKEN.match(val):
            raise _Refuse(f"{opt} {driver}.{prop}", UNKNOWN)
        return value

    def sandbox(self, opt: str, value: str) -> str:
        keys = dict.fromkeys(("obsolete", "elevateprivileges", "spawn", "resourcecontrol"), _one_of("deny"))
        self._keys(opt, value, _parse(opt, value, "enable").values, {"enable": _one_of("on"), **keys})
        return value

    def overcommit(self, opt: str, value: str) -> str:
        self._keys(opt, value, _parse(opt, value, None).values,
                   {"mem-lock": _one_of("on", "off", "on-fault"), "cpu-pm": BOOL})
        return value

    def msg(self, opt: str, value: str) -> str:
        self._keys(opt, value, _parse(opt, value, None).values, {"timestamp": BOOL, "guest-name": BOOL})
        return value

    def audiodev(self, opt: str, value: str) -> str:
        self._keys(opt, value, _parse(opt, value, "driver").values, {"driver": _one_of("none"), "id": ID})
        return value

    def vnc(self, opt: str, value: str) -> str:
        if value == "none":
            return value
        raise _Refuse(f"{opt} {value}", "which would open a display or listen on {target}")

    def drive(self, opt: str, value: str) -> str:
        opts = _parse(opt, value, None).values
        self._disk(opt, value, opts.get("file"))
        self._keys(opt, value, {k: v for k, v in opts.items() if k != "file"}, _DRIVE_KEYS)
        if opts.get("format") != "raw":
            raise _Refuse(f"{opt} {value} without format=raw", "which would let QEMU on {target} guess the "
                          "image format from its contents, which the guest controls; give format=raw")
        return value

    def blockdev(self, opt: str, value: str) -> str:
        opts = _parse(opt, value, "driver").values
        driver = opts.get("driver", "")
        allowed = _BLOCKDEVS.get(driver)
        if allowed is None:
            self._no_run_keys(f"{opt} {driver}", opts)
            raise _Refuse(f"{opt} driver={driver}", DISK if not self.storage else (
                "which is not a raw image or a plain file (a qcow2 image names its backing file "
                "inside itself, which {target} would open)"))
        if driver in ("file", "host_device"):
            self._disk(opt, value, opts.get("filename"))
            opts = {k: v for k, v in opts.items() if k != "filename"}
        self._keys(f"{opt} {driver}", value, opts, {"driver": TOKEN, **allowed})
        return value

    def _disk(self, opt: str, value: str, path: str | None) -> None:
        if not self.storage:
            raise _Refuse(opt, DISK + "; declare the folder as shared_storage of {target} in the inventory")
        if path is None:
            raise _Refuse(f"{opt} {value}", "which names no image file (only files under {target}'s shared "
                          "storage are carried)")
        if not under_storage(path, self.storage):
            raise _Refuse(f"{opt} with {path}", "which would make {target} open a disk image outside its "
                          "shared storage (" + ", ".join(self.storage) + ")")

    def bios(self, opt: str, value: str) -> str:
        # A plain name is found in QEMU's own data folders; a path only under the system firmware folders.
        if _FILE_NAME.match(value):
            return value
        if _FIRMWARE_PATH.match(value) and posixpath.normpath(value) == value and \
                value.startswith(FIRMWARE_DIRS):
            return value
        raise _Refuse(f"{opt} {value}", OPEN + " (firmware must be a file name or lie under "
                      + ", ".join(FIRMWARE_DIRS) + ")")

    # -- value checks

    def _keys(self, what: str, value: str, opts: dict[str, str], allowed: dict[str, Check]) -> None:
        self._no_run_keys(what, opts)
        for key, val in opts.items():
            check = allowed.get(key)
            if check is not None and check(val):
                continue
            if key in _PATH_KEYS:
                raise _Refuse(f"{what} with {key}={val}", OPEN)
            if check is None:
                raise _Refuse(f"{what} with {key}=", UNKNOWN)
            raise _Refuse(f"{what} with {key}={val}", VALUE)

    @staticmethod
    def _no_run_keys(what: str, opts: dict[str, str]) -> None:
        for key in opts:
            if key in _RUN_KEYS and not (key in ("script", "downscript") and opts[key] == "no"):
                raise _Refuse(f"{what} with {key}=", RUN)


_HANDLERS: dict[str, Callable[[_Builder, str, str], str | None]] = {
    "-name": _Builder.name, "-m": _Builder.memory, "-smp": _Builder.smp, "-machine": _Builder.machine,
    "-M": _Builder.machine, "-accel": _Builder.accel, "-cpu": _Builder.cpu, "-object": _Builder.object,
    "-device": _Builder.device, "-netdev": _Builder.netdev, "-nic": _Builder.netdev, "-net": _Builder.net,
    "-chardev": _Builder.chardev, "-serial": _Builder.serial, "-parallel": _Builder.parallel,
    "-display": _Builder.display, "-vga": _Builder.vga, "-vnc": _Builder.vnc, "-uuid": _Builder.uuid,
    "-rtc": _Builder.rtc, "-boot": _Builder.boot, "-global": _Builder.global_, "-sandbox": _Builder.sandbox,
    "-overcommit": _Builder.overcommit, "-msg": _Builder.msg, "-audiodev": _Builder.audiodev,
    "-bios": _Builder.bios, "-drive": _Builder.drive, "-blockdev": _Builder.blockdev,
}
