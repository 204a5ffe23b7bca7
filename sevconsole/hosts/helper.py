"""The remote helper: runs ON a hypervisor host, sent inline over SSH (see docs/internals.md).

Standard library only, and Python 3.6 syntax (EL8 hosts ship 3.6): nothing is installed on a
host, so this file is the whole of what runs there. The console compresses it and runs

    python3 -c 'import base64,sys,zlib;exec(zlib.decompress(base64.b64decode(sys.argv.pop(1))))' BLOB CMD ARGS

Commands: `probe [--qmp-glob GLOB]...`, `qmp PATH`, `launch-incoming` (JSON on stdin), `stop PID`,
`files` (JSON on stdin: which disk images this host sees under its shared storage).
Results are one JSON object on stdout; failures are `{"error": "sentence"}` with exit 1; an
unknown command exits 127 with a message on stderr.
"""

import base64
import contextlib
import ctypes
import errno
import fcntl
import glob
import json
import os
import re
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time

HELPER_VERSION = 1

# include/uapi/linux/psp-sev.h: SEV_ISSUE_CMD = _IOWR('S', 0x0, struct sev_issue_cmd), where
# struct sev_issue_cmd { __u32 cmd; __u64 data; __u32 error; } __packed (16 bytes).
SEV_ISSUE_CMD = (3 << 30) | (16 << 16) | (ord("S") << 8) | 0
SEV_PLATFORM_STATUS = 1
SEV_PDH_CERT_EXPORT = 5
SEV_CERT_LEN = 2084
PLATFORM_CHAIN_LEN = 3 * SEV_CERT_LEN

# launch-incoming receives the command line the console built through its allow-list
# (engine/argv_policy.py), never the source's. This re-check is the cheap second line: options
# and keys that make QEMU run, load or open what the source named, and the plumbing this
# helper adds itself. lab/argv.py holds the same two NEVER lists (a test keeps them equal).
PLUMBING = ("-qmp", "-qmp-pretty", "-monitor", "-mon", "-incoming", "-daemonize", "-pidfile")
NEVER_OPTIONS = ("-readconfig", "-writeconfig", "-plugin", "-add-fd", "-fw_cfg", "-kernel", "-initrd",
                 "-dtb", "-L", "-mem-path", "-run-with", "-runas", "-chroot", "-drive", "-blockdev",
                 "-hda", "-hdb", "-hdc", "-hdd", "-cdrom", "-fda", "-fdb", "-pflash", "-mtdblock", "-sd",
                 "-loadvm", "-D", "-trace")
NEVER_KEYS = ("helper", "script", "downscript", "mem-path", "smb", "guestfwd", "hostfwd", "tftp",
              "bootfile", "file", "filename", "path", "logfile", "sysfsdev", "evdev", "dh-cert-file",
              "session-file", "firmware", "kernel", "initrd", "dtb", "dumpdtb", "splash", "romfile")
QEMU_PROGRAMS = ("qemu-system-x86_64", "qemu-kvm")
GREETING_WAIT_S = 2.0  # a QMP socket silent this long is held by another client
PROGRAM_DIRS = ("/usr/local/bin", "/usr/bin", "/bin", "/usr/libexec")


class HelperFailure(Exception):
    """A failure with a sentence for the operator; becomes {"error": ...} and exit 1."""


def emit(obj):
    sys.stdout.write(json.dumps(obj, sort_keys=True))
    sys.stdout.write("\n")
    sys.stdout.flush()


def read_text(path):
    try:
        with open(path) as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError):
        return None


# ---------------------------------------------------------------- probe


def kvm_amd_param(name):
    """Y/N for a kvm_amd module parameter; None when the module is not loaded."""
    value = read_text("/sys/module/kvm_amd/parameters/" + name)
    if value is None:
        return None
    value = value.strip()
    return "Y" if value in ("Y", "y", "1") else "N"


def one_line_id(path):
    """A machine or boot id: one line of hex (and dashes), else None."""
    text = (read_text(path) or "").strip()[:64]
    return text if text and all(ch in "0123456789abcdef-" for ch in text) else None


def cpu_model():
    text = read_text("/proc/cpuinfo") or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return os.uname().machine


def memory_mib():
    """MemTotal and MemAvailable of /proc/meminfo in MiB (None where unreadable)."""
    found = {}
    for line in (read_text("/proc/meminfo") or "").splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if key in ("MemTotal", "MemAvailable") and parts and parts[0].isdigit():
            found[key] = int(parts[0]) // 1024
    return {"total_mib": found.get("MemTotal"), "available_mib": found.get("MemAvailable")}


def sev_issue(fd, command, buf):
    """Issue one SEV platform command through the kernel's ioctl; return the firmware status."""
    arg = bytearray(struct.pack("<IQI", command, ctypes.addressof(buf), 0))
    try:
        fcntl.ioctl(fd, SEV_ISSUE_CMD, arg, True)
    except OSError as exc:
        fw_error = struct.unpack_from("<I", arg, 12)[0]
        raise HelperFailure(f"SEV command {command} failed: {exc.strerror or exc} (firmware status 0x{fw_error:x})") from None
    return struct.unpack_from("<I", arg, 12)[0]


def platform_status(fd):
    # struct sev_user_data_status { u8 api_major, api_minor, state; u32 flags; u8 build;
    # u32 guest_count; } __packed -> 12 bytes
    buf = ctypes.create_string_buffer(12)
    sev_issue(fd, SEV_PLATFORM_STATUS, buf)
    major, minor, state, flags, build, guests = struct.unpack("<BBBIBI", buf.raw)
    return {"api_major": major, "api_minor": minor, "state": state, "flags": flags,
            "build": build, "guest_count": guests}


def pdh_cert_export(fd):
    pdh = ctypes.create_string_buffer(SEV_CERT_LEN)
    chain = ctypes.create_string_buffer(PLATFORM_CHAIN_LEN)
    # struct sev_user_data_pdh_cert_export { u64 pdh_addr; u32 pdh_len; u64 chain_addr;
    # u32 chain_len; } __packed -> 24 bytes
    req = ctypes.create_string_buffer(struct.pack(
        "<QIQI", ctypes.addressof(pdh), SEV_CERT_LEN, ctypes.addressof(chain), PLATFORM_CHAIN_LEN))
    sev_issue(fd, SEV_PDH_CERT_EXPORT, req)
    _, pdh_len, _, chain_len = struct.unpack("<QIQI", req.raw[:24])
    return pdh.raw[:pdh_len], chain.raw[:chain_len]


def probe_dev_sev(result):
    if not os.path.exists("/dev/sev"):
        return
    result["dev_sev"] = True
    fd = None
    for mode in (os.O_RDWR, os.O_RDONLY):
        try:
            fd = os.open("/dev/sev", mode)
            break
        except OSError as exc:
            last = exc
    if fd is None:
        result["errors"].append(f"/dev/sev exists but cannot be opened by this user ({last.strerror}); "
                                "firmware status and PDH need access to it")
        return
    try:
        try:
            result["platform_status"] = platform_status(fd)
        except HelperFailure as exc:
            result["errors"].append(f"PLATFORM_STATUS: {exc}")
        try:
            pdh, chain = pdh_cert_export(fd)
            result["pdh"] = base64.b64encode(pdh).decode()
            result["cert_chain"] = base64.b64encode(chain).decode()
        except HelperFailure as exc:
            result["errors"].append(f"PDH_CERT_EXPORT: {exc}")
    finally:
        os.close(fd)


def is_qemu(argv):
    if not argv:
        return False
    base = os.path.basename(argv[0])
    return base.startswith("qemu-system-") or base in ("qemu-kvm", "kvm") or base.startswith("qemu-kvm")


def split_opts(value):
    """QEMU option string 'a,b=c,d=e' -> (first bare word or None, {key: value}); ',,' escapes a comma."""
    parts, cur, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += value[i]
        i += 1
    parts.append(cur)
    bare, opts = None, {}
    for index, part in enumerate(parts):
        if "=" in part:
            key, _, val = part.partition("=")
            opts[key] = val
        elif index == 0:
            bare = part
        else:
            opts[part] = "on"
    return bare, opts


def option_values(argv, name):
    """Values of an option, accepting both `-opt value` and `--opt value` (and `-opt=value`)."""
    found = []
    i = 1
    while i < len(argv):
        arg = argv[i]
        for prefix in (name, "-" + name):
            if arg == prefix and i + 1 < len(argv):
                found.append(argv[i + 1])
                i += 1
                break
            if arg.startswith(prefix + "="):
                found.append(arg[len(prefix) + 1:])
                break
        i += 1
    return found


def vm_name(argv):
    for value in option_values(argv, "-name"):
        bare, opts = split_opts(value)
        name = opts.get("guest") or bare
        if name:
            return name
    return None


def qmp_path_from_argv(argv):
    """The QMP UNIX socket a QEMU listens on, from -qmp or -chardev + -mon mode=control."""
    for value in option_values(argv, "-qmp") + option_values(argv, "-qmp-pretty"):
        if value.startswith("unix:"):
            bare, opts = split_opts(value[len("unix:"):])
            if bare and opts.get("server", "on") not in ("off", "no"):
                return bare
    chardevs = {}
    for value in option_values(argv, "-chardev"):
        backend, opts = split_opts(value)
        if backend == "socket" and "path" in opts and "id" in opts:
            chardevs[opts["id"]] = opts["path"]
    for value in option_values(argv, "-mon"):
        bare, opts = split_opts(value)
        if opts.get("mode") == "control":
            chardev = opts.get("chardev") or bare
            if chardev in chardevs:
                return chardevs[chardev]
    return None


def process_argv(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    if not raw:
        return None
    return [part.decode("utf-8", "replace") for part in raw.rstrip(b"\0").split(b"\0")]


def listening_socket_inodes():
    """UNIX socket path -> inode of the listening socket, from /proc/net/unix."""
    inodes = {}
    text = read_text("/proc/net/unix") or ""
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[5] == "01":  # state 01: listening
            inodes[fields[7]] = fields[6]
    return inodes


def socket_owner(inode, pids):
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None


def stale_socket(path):
    """A socket file nobody listens on (its QEMU exited without removing it): not a VM."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        return exc.errno in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        sock.close()
    return False


def find_vms(globs):
    vms = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = process_argv(entry)
        if argv is None or not is_qemu(argv):
            continue
        vms.append({"pid": int(entry), "name": vm_name(argv), "qmp": qmp_path_from_argv(argv),
                    "argv": argv})
    known = {vm["qmp"] for vm in vms if vm["qmp"]}
    extra = sorted({path for pattern in globs for path in glob.glob(pattern)} - known)
    if extra:
        # Sockets named by the inventory: match each to its QEMU through the socket inode.
        inodes = listening_socket_inodes()
        by_pid = {vm["pid"]: vm for vm in vms}
        for path in extra:
            pid = socket_owner(inodes[path], by_pid) if path in inodes else None
            if pid is not None and by_pid[pid]["qmp"] is None:
                by_pid[pid]["qmp"] = path
            elif pid is None and not stale_socket(path):
                stem = os.path.splitext(os.path.basename(path))[0]
                vms.append({"pid": None, "name": stem, "qmp": path, "argv": []})
    for vm in vms:
        if not vm["name"]:
            vm["name"] = "pid-{}".format(vm["pid"])
    vms.sort(key=lambda vm: (vm["name"], vm["pid"] or 0))
    return vms


def cmd_probe(args):
    globs = []
    i = 0
    while i < len(args):
        if args[i] == "--qmp-glob" and i + 1 < len(args):
            globs.append(args[i + 1])
            i += 2
        else:
            raise HelperFailure(f"probe: unexpected argument {args[i]!r}")
    uname = os.uname()
    result = {
        "helper": HELPER_VERSION, "hostname": socket.gethostname(), "kernel": uname.release,
        "cpu": cpu_model(), "kvm_amd": {"sev": kvm_amd_param("sev"), "sev_es": kvm_amd_param("sev_es")},
        "dev_sev": False, "platform_status": None, "pdh": None, "cert_chain": None, "errors": [],
        "python": "{}.{}".format(*sys.version_info[:2]), "memory": memory_mib(),
        # which machine this is, whatever name the console reached it by
        "machine_id": one_line_id("/etc/machine-id") or one_line_id("/var/lib/dbus/machine-id"),
        "boot_id": one_line_id("/proc/sys/kernel/random/boot_id"),
    }
    probe_dev_sev(result)
    result["vms"] = find_vms(globs)
    probe_libvirt(result)
    emit(result)
    return 0


# ---------------------------------------------------------------- qmp bridge


def cmd_qmp(args):
    if len(args) != 1:
        raise HelperFailure("qmp: expected one socket path")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(args[0])
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            # no socket, or a socket file nobody listens on: the QEMU that made it has exited
            emit({"error": f"nothing listens on the QMP socket {args[0]}: its QEMU is not running",
                  "gone": True})
            return 1
        raise HelperFailure(f"cannot connect to the QMP socket {args[0]}: {exc.strerror or exc}") from None
    # QEMU greets at once unless another client holds its only monitor connection (libvirt holds
    # every domain's): say so and leave, rather than wait on a socket that will never talk
    ready, _, _ = select.select([sock], [], [], GREETING_WAIT_S)
    if not ready:
        sock.close()
        emit({"error": f"the QMP socket {args[0]} sent no greeting within {GREETING_WAIT_S:g} s: it is held "
                       "by another client, probably libvirt (QEMU serves one QMP client at a time)",
              "held": True})
        return 1
    bridge(sock, sys.stdin.fileno(), sys.stdout.fileno())
    return 0


def bridge(sock, infd, outfd):
    """Copy bytes both ways until either side closes."""
    sfd = sock.fileno()
    while True:
        ready, _, _ = select.select([infd, sfd], [], [])
        if infd in ready:
            data = os.read(infd, 65536)
            if not data:
                return
            sock.sendall(data)
        if sfd in ready:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            view = memoryview(data)
            while view:
                written = os.write(outfd, view)
                view = view[written:]


# ---------------------------------------------------------------- launch-incoming / stop


def option_keys(value):
    """The keys of one option value, in QEMU's key=value form or its JSON form."""
    if value.startswith("{"):
        try:
            data = json.loads(value)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}
    return split_opts(value)[1]


def check_target_argv(argv, storage=()):
    """Refuse what the console's allow-list never lets through; raise HelperFailure naming it.
    With `storage` (this host's shared storage folders, from the console's inventory), -drive and
    -blockdev may name image files there, and each must exist here."""
    if not argv or argv[0] not in QEMU_PROGRAMS:
        raise HelperFailure("the program must be one of {}, named without a folder; "
                            "got {!r}".format(", ".join(QEMU_PROGRAMS), argv[0] if argv else None))
    disk_option = None
    for arg in argv[1:]:
        if disk_option is not None:
            check_disk(disk_option, arg, storage)
            disk_option = None
            continue
        name = arg[1:] if arg.startswith("--") else arg
        if name in PLUMBING:
            raise HelperFailure(f"the command line still has {name}; this helper adds its own "
                                "QMP socket and -incoming, and takes the console's filtered command "
                                "line only")
        if name in DISK_OPTIONS and storage:
            disk_option = name
            continue
        if name in NEVER_OPTIONS:
            raise HelperFailure(f"refused {name}, which would make this host open or run "
                                "what the source named")
        for key, val in option_keys(arg).items():
            if key in NEVER_KEYS and val != "":
                raise HelperFailure(f"refused {key}= in {arg[:80]!r}, which would make this host "
                                    "open or run what the source named")


DISK_OPTIONS = ("-drive", "-blockdev")
DISK_KEYS = ("file", "filename")


def check_disk(option, value, storage):
    path = None
    for key, val in option_keys(value).items():
        if key in DISK_KEYS and val != "":
            if key == "file" and option == "-blockdev":  # raw's file= names a node, not a path
                continue
            path = val
        elif key in NEVER_KEYS and val != "":
            raise HelperFailure(f"refused {key}= in {value[:80]!r}, which would make this host "
                                "open or run what the source named")
    if path is None:
        return
    state = disk_state(path, storage)
    if state != "present":
        raise HelperFailure(f"the disk image {path} {state}")


def inside(path, folders):
    return any(path.startswith(folder.rstrip("/") + "/") for folder in folders if folder.startswith("/"))


def disk_state(path, storage):
    """'present', or the rest of a sentence saying why this host cannot use the image."""
    if not path.startswith("/") or os.path.normpath(path) != path or not inside(path, storage):
        return "is not under this host's shared storage ({})".format(", ".join(storage) or "none declared")
    real = os.path.realpath(path)
    if not inside(real, [os.path.realpath(folder) for folder in storage]):
        return f"leads out of this host's shared storage (to {real})"
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return "does not exist on this host (is its folder shared storage here?)"
    except OSError as exc:
        return f"cannot be used on this host ({exc.strerror})"
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        return "is not a regular file or block device on this host"
    if not os.access(real, os.R_OK):
        return "is not readable by this user on this host"
    return "present"


def cmd_files(args):
    """{"paths": [...], "storage": [...]} on stdin -> {"files": {path: state}} (bounded)."""
    try:
        request = json.loads(sys.stdin.read(1 << 20))
        paths = [str(p) for p in request["paths"]][:256]
        storage = [str(f) for f in request.get("storage", [])][:64]
    except (ValueError, KeyError, TypeError):
        raise HelperFailure('files expects {"paths": [...], "storage": [...]} on stdin') from None
    emit({"files": {path: disk_state(path, storage) for path in paths}})
    return 0


def find_program(name):
    """The QEMU of that name in this host's own program folders (never the caller's folder)."""
    folders = [d for d in os.environ.get("PATH", "").split(os.pathsep) if os.path.isabs(d)]
    for directory in folders + list(PROGRAM_DIRS):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise HelperFailure("no {} on this host (looked in PATH and {})".format(
        name, ", ".join(PROGRAM_DIRS)))


def incoming_command(argv, qmp_path, storage=()):
    """The console's target command line, checked, with this host's QEMU, a new QMP socket and
    -incoming defer."""
    check_target_argv(argv, storage)
    return [find_program(argv[0])] + list(argv[1:]) + [
        "-qmp", f"unix:{qmp_path},server=on,wait=off", "-incoming", "defer"]


def safe_stem(name):
    """A VM name as a file name: no folder separators, no dot-files, bounded length."""
    text = "".join(ch if (ch.isalnum() and ord(ch) < 128) or ch in "-_." else "_" for ch in name or "")
    text = text.lstrip(".")[:48]
    return text or "vm"


def private_dir():
    """This user's own folder for incoming sockets and logs (0700, checked, never a symlink)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    if not os.path.isabs(base) or not os.path.isdir(base):
        base = tempfile.gettempdir()
    path = os.path.join(base, f"sevconsole-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat_is_private_dir(st):
        raise HelperFailure(f"{path} is not a private folder of this user (owner, mode or a symlink); "
                            "remove it or set XDG_RUNTIME_DIR")
    return path


def stat_is_private_dir(st):
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def alive(pid):
    text = read_text(f"/proc/{pid}/stat")
    if text is None:
        return False
    state = text.rpartition(")")[2].split()[0]
    return state not in ("Z", "X")


def detach(argv, log_path):
    """Start argv detached from this session (double fork + setsid); return its pid."""
    rfd, wfd = os.pipe()
    child = os.fork()
    if child == 0:  # intermediate: new session, start QEMU, report its pid, vanish
        try:
            os.close(rfd)
            os.setsid()
            with open(os.devnull, "rb") as devnull, open(log_path, "ab") as log:
                proc = subprocess.Popen(argv, stdin=devnull, stdout=log, stderr=subprocess.STDOUT,
                                        close_fds=True, cwd="/")
            os.write(wfd, json.dumps({"pid": proc.pid}).encode())
        except BaseException as exc:  # any failure must reach the parent
            os.write(wfd, json.dumps({"error": str(exc)}).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    chunks = []
    while True:
        data = os.read(rfd, 4096)
        if not data:
            break
        chunks.append(data)
    os.close(rfd)
    os.waitpid(child, 0)
    answer = json.loads(b"".join(chunks).decode() or '{"error": "no answer from the launcher"}')
    if "error" in answer:
        raise HelperFailure("could not start {}: {}".format(argv[0], answer["error"]))
    return answer["pid"]


def qemu_error(log_path, program):
    """QEMU's own reason for exiting, from its log: the last line that is not a warning, without
    the program-name prefix QEMU puts on each, bounded (it goes into one sentence)."""
    lines = [line.strip() for line in (read_text(log_path) or "").splitlines() if line.strip()]
    prefix = os.path.basename(program) + ": "
    lines = [line[len(prefix):] if line.startswith(prefix) else line for line in lines]
    errors = [line for line in lines if not line.startswith("warning:")]
    text = (errors or lines or ["no output"])[-1]
    return text if len(text) <= 400 else text[:397] + "..."


def wait_for_qmp(path, pid, deadline):
    """Until the new QEMU answers a command on its QMP socket: None then, "exited" when it died
    first, "timeout". The socket file and even the greeting (sent by the monitor's own thread)
    come before QEMU has opened its drives and devices; a command's answer comes from the main
    loop, which QEMU reaches only once they are all open."""
    while True:
        if not alive(pid):
            return "exited"
        if time.monotonic() > deadline:
            return "timeout"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                sock.connect(path)
            except OSError:
                time.sleep(0.02)  # not bound or not listening yet: nothing to wait on but time
                continue
            answer = qmp_answer(sock, pid, deadline)
            if answer != "closed":
                return answer
        finally:
            sock.close()


def qmp_answer(sock, pid, deadline):
    """Greeting, qmp_capabilities, its answer: None; "closed" when QEMU hung up first."""
    received = b""
    sent = False
    while True:
        ready, _, _ = select.select([sock], [], [], 0.1)
        if not ready:
            if not alive(pid):
                return "exited"
            if time.monotonic() > deadline:
                return "timeout"
            continue
        try:
            data = sock.recv(4096)
        except OSError:
            data = b""
        if not data or len(received) > 65536:
            return "closed"
        received += data
        lines = received.split(b"\n")
        if not sent and lines[0].lstrip().startswith(b'{"QMP"'):
            sock.sendall(b'{"execute": "qmp_capabilities"}\n')
            sent = True
        if sent and any(b'"return"' in line or b'"error"' in line for line in lines[1:]):
            return None


INCOMING_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*-incoming-[0-9]+-[0-9]+[.]qmp$")


def remove_incoming_files(qmp_path):
    """Remove an incoming VM's socket and log: only files this helper made (its private folder, its
    naming), so a path named by anyone else is never touched."""
    if not qmp_path or not INCOMING_NAME.match(os.path.basename(qmp_path)):
        return []
    try:
        folder = private_dir()
    except HelperFailure:
        return []
    if os.path.dirname(os.path.abspath(qmp_path)) != folder:
        return []
    removed = []
    for path in (qmp_path, qmp_path[:-len(".qmp")] + ".log"):
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                os.unlink(path)
                removed.append(path)
        except OSError:
            pass
    return removed


def kill_and_wait(pid, waits=((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0))):
    for sig, wait in waits:
        try:
            os.kill(pid, sig)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                return True
            raise HelperFailure(f"cannot stop process {pid}: {exc.strerror}") from None
        deadline = time.monotonic() + wait
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)  # a non-child's exit can only be polled
        if not alive(pid):
            return True
    return not alive(pid)


def cmd_launch_incoming(args):
    try:
        request = json.loads(sys.stdin.read())
        source = [str(a) for a in request["argv"]]
    except (ValueError, KeyError, TypeError):
        raise HelperFailure('launch-incoming expects {"argv": [...]} on stdin') from None
    storage = [str(f) for f in request.get("storage") or []]
    check_target_argv(source, storage)
    # The folder is the console's choice or this user's own, never one the source named; the
    # VM name is made a plain file name.
    directory = request.get("dir") or private_dir()
    if not os.path.isdir(directory):
        raise HelperFailure(f"the folder {directory} does not exist on this host")
    stem = f"{safe_stem(vm_name(source))}-incoming-{os.getpid()}-{int(time.time() * 1000) % 10 ** 9}"
    qmp_path = os.path.join(directory, stem + ".qmp")
    log_path = os.path.join(directory, stem + ".log")
    argv = incoming_command(source, qmp_path, storage)
    pid = detach(argv, log_path)
    timeout = float(request.get("timeout", 20))
    why = wait_for_qmp(qmp_path, pid, time.monotonic() + timeout)
    if why is not None:
        if why == "exited":
            sentence = "the incoming QEMU exited at start: " + qemu_error(log_path, argv[0])
        else:
            kill_and_wait(pid)
            sentence = f"the incoming QEMU did not answer on its QMP socket within {timeout:g} s; stopped it"
        for path in (qmp_path, log_path):  # a failed start leaves nothing behind to look like a VM
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise HelperFailure(sentence)
    emit({"pid": pid, "qmp": qmp_path, "log": log_path, "argv": argv})
    return 0


def read_stop_request():
    """`stop` may get {"qmp": path} on stdin: the incoming VM's socket, whose files go with it."""
    try:
        if os.isatty(0):
            return {}
        data = json.loads(sys.stdin.read(65536) or "{}")
    except (ValueError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def cmd_stop(args):
    if len(args) != 1 or not args[0].isdigit():
        raise HelperFailure("stop: expected one process id")
    pid = int(args[0])
    request = read_stop_request()
    named = request.get("qmp") if isinstance(request.get("qmp"), str) else None
    argv = process_argv(pid)
    if argv is None or not alive(pid):
        removed = remove_incoming_files(named)
        emit({"stopped": False, "reason": "no such process", "removed": removed})
        return 0
    if not is_qemu(argv):
        raise HelperFailure(f"process {pid} is not a QEMU ({argv[0]}); refusing to stop it")
    own = qmp_path_from_argv(argv)
    stopped = kill_and_wait(pid)
    removed = []
    if stopped:
        for path in {p for p in (own, named) if p}:
            removed += remove_incoming_files(path)
    emit({"stopped": stopped, "removed": removed})
    return 0


# ---------------------------------------------------------------- libvirt
#
# A host whose QEMUs libvirt manages: libvirt holds each domain's monitor, so QMP goes through
# `virsh qemu-monitor-command`, and a domain migrates through libvirt's own live migration.

LIBVIRT_URI = "qemu:///system"
LIBVIRT_SOCKETS = ("/run/libvirt/libvirt-sock", "/run/libvirt/virtqemud-sock", "/var/run/libvirt/libvirt-sock")
VIRSH_OUTPUT_LIMIT = 4 * 1024 * 1024
XML_LIMIT = 512 * 1024
LIBVIRT_QUERIES = ("query-status", "query-sev", "query-migrate")
JOB_TYPES = {0: "none", 1: "bounded", 2: "unbounded", 3: "completed", 4: "failed", 5: "cancelled"}


def virsh_program():
    try:
        return find_program("virsh")
    except HelperFailure:
        return None


def virsh(args, timeout=30.0, program=None):
    """(rc, stdout, one sentence from stderr) of `virsh -q -c qemu:///system ARGS`."""
    program = program or virsh_program()
    if program is None:
        return 127, "", "virsh is not installed"
    try:
        proc = subprocess.run(  # noqa: UP022 (capture_output is Python 3.7; hosts may run 3.6)
            [program, "-q", "-c", LIBVIRT_URI] + list(args), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "", f"virsh {args[0]} did not answer within {timeout:g} s"
    except OSError as exc:
        return 126, "", f"virsh could not run: {exc.strerror or exc}"
    out = proc.stdout[:VIRSH_OUTPUT_LIMIT].decode("utf-8", "replace")
    return proc.returncode, out, virsh_sentence(proc.stderr[:65536].decode("utf-8", "replace"))


def virsh_sentence(text):
    """virsh's `error: ...` lines as one sentence, in libvirt's own words."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line[len("error: "):] if line.startswith("error: ") else line for line in lines]
    return "; ".join(lines)[:600]


def xml_text(xml, pattern):
    match = re.search(pattern, xml, re.S)
    return match.group(1).strip() if match else None


def domain_from_xml(xml):
    """What the console needs of a domain's XML (by pattern: no parser for a hostile document)."""
    memory = xml_text(xml, r"<memory(?: unit=['\"]KiB['\"])?[^>]*>\s*(\d+)\s*</memory>")
    sev = re.search(r"<launchSecurity[^>]*type=['\"](sev|sev-snp|s390-pv)['\"]", xml)
    policy = xml_text(xml, r"<launchSecurity.*?<policy>\s*(0x[0-9a-fA-F]+|\d+)\s*</policy>")
    disks = re.findall(r"<disk\b.*?<source\b[^>]*\b(?:file|dev)=['\"]([^'\"]+)['\"]", xml, re.S)
    return {"name": xml_text(xml, r"<name>([^<]*)</name>"), "uuid": xml_text(xml, r"<uuid>([^<]*)</uuid>"),
            "memory_kib": int(memory) if memory and memory.isdigit() else None,
            "launch_security": sev.group(1) if sev else None,
            "policy": int(policy, 0) if policy else None, "disks": disks[:32]}


def libvirt_pid(name, uuid):
    """The domain's QEMU: libvirt's pid file, else the QEMU whose -uuid is the domain's."""
    text = (read_text(f"/run/libvirt/qemu/{name}.pid") or "").strip()
    if text.isdigit() and alive(int(text)):
        return int(text)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            argv = process_argv(entry)
            if argv and is_qemu(argv) and uuid in option_values(argv, "-uuid"):
                return int(entry)
    return None


def libvirt_qmp(program, domain, command, arguments=None):
    """One QMP command through libvirt: QEMU's answer object, or {"error": {"desc": why}}."""
    message = {"execute": command}
    if arguments:
        message["arguments"] = arguments
    rc, out, err = virsh(["qemu-monitor-command", domain, json.dumps(message)], program=program)
    if rc != 0:
        return {"error": {"class": "LibvirtError", "desc": err or f"virsh exit {rc}"}}
    try:
        answer = json.loads(out)
    except ValueError:
        return {"error": {"class": "LibvirtError", "desc": "an answer that is not JSON"}}
    return answer if isinstance(answer, dict) else {"error": {"class": "LibvirtError", "desc": "not an object"}}


def probe_libvirt(result):
    """libvirt's view of this host (result["libvirt"]) and its domains (added to result["vms"]);
    nothing when virsh is not installed."""
    program = virsh_program()
    if program is None or not any(os.path.exists(path) for path in LIBVIRT_SOCKETS):
        return  # no virsh, or no libvirt daemon's socket (virsh alone is not a libvirt host)
    rc, out, err = virsh(["version", "--daemon"], program=program)
    if rc != 0:
        result["libvirt"] = {"uri": LIBVIRT_URI, "error": err or f"virsh exit {rc}"}
        result["errors"].append(f"libvirt ({LIBVIRT_URI}) did not answer: {err}")
        return
    info = {"uri": LIBVIRT_URI, "version": xml_text(out, r"Running hypervisor:\s*([^\n]+)")
            or xml_text(out, r"Using library:\s*([^\n]+)"), "sev": probe_libvirt_sev(program, result)}
    rc, out, err = virsh(["list", "--all", "--uuid"], program=program)
    uuids = [line.strip() for line in out.splitlines() if line.strip()][:256] if rc == 0 else []
    if rc != 0:
        result["errors"].append("libvirt could not list its domains: " + err)
    info["domains"] = len(uuids)
    result["libvirt"] = info
    taken = set()
    for uuid in uuids:
        entry = probe_domain(program, uuid)
        if entry is not None:
            taken.add(uuid)
            result["vms"].append(entry)
    # a QEMU libvirt manages is listed once, as its domain
    result["vms"] = [vm for vm in result["vms"] if "libvirt" in vm
                     or not set(option_values(vm.get("argv") or [], "-uuid")) & taken]


def probe_domain(program, uuid):
    rc, xml, err = virsh(["dumpxml", uuid], program=program)
    if rc != 0:
        return None  # gone since the list
    dom = domain_from_xml(xml[:XML_LIMIT])
    rc, state, _ = virsh(["domstate", uuid], program=program)
    state = state.strip() if rc == 0 else "unknown"
    rc, persistent, _ = virsh(["dominfo", uuid], program=program)
    dom.update({"state": state, "persistent": xml_text(persistent, r"Persistent:\s*(\w+)") == "yes",
                "qmp": {}})
    name = dom["name"] or uuid
    pid = None
    if state in ("running", "paused", "idle", "in shutdown", "blocked", "pmsuspended"):
        for command in LIBVIRT_QUERIES:
            dom["qmp"][command] = libvirt_qmp(program, uuid, command)
        pid = libvirt_pid(name, uuid)
    argv = process_argv(pid) if pid else None
    return {"pid": pid, "name": name, "qmp": "libvirt:" + uuid, "argv": argv or [], "libvirt": dom}


def probe_libvirt_sev(program, result):
    """SEV as libvirt sees it: domcapabilities' <sev>, and the PDH and chain from nodesevinfo."""
    rc, caps, err = virsh(["domcapabilities"], program=program)
    sev = {"supported": None}
    if rc == 0:
        block = re.search(r"<sev supported=['\"](yes|no)['\"]\s*/?>(.*?)(?:</sev>|$)", caps, re.S)
        if block:
            sev["supported"] = block.group(1) == "yes"
            for key, tag in (("cbitpos", "cbitpos"), ("reduced_phys_bits", "reducedPhysBits")):
                value = xml_text(block.group(2), rf"<{tag}>\s*(\d+)\s*</{tag}>")
                sev[key] = int(value) if value else None
    else:
        sev["error"] = err
    rc, out, err = virsh(["nodesevinfo"], program=program)
    if rc != 0:
        sev["nodesevinfo"] = err  # libvirt's own sentence, e.g. QEMU does not support SEV guest
        return sev
    fields = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    if result.get("pdh") is None and fields.get("pdh"):
        result["pdh"] = fields["pdh"]
    if result.get("cert_chain") is None and fields.get("cert-chain"):
        result["cert_chain"] = fields["cert-chain"]
    for key, name in (("cbitpos", "cbitpos"), ("reduced_phys_bits", "reduced-phys-bits")):
        if fields.get(name, "").isdigit():
            sev[key] = int(fields[name])
    return sev


def read_request():
    try:
        request = json.loads(sys.stdin.read(1 << 20) or "{}")
    except ValueError:
        raise HelperFailure("expected a JSON object on stdin") from None
    if not isinstance(request, dict):
        raise HelperFailure("expected a JSON object on stdin")
    return request


def need_virsh():
    program = virsh_program()
    if program is None:
        raise HelperFailure("virsh is not installed on this host; libvirt's domains cannot be reached")
    return program


def domain_arg(args, what):
    if len(args) != 1 or not re.match(r"^[A-Za-z0-9_.:+-]{1,200}$", args[0]):
        raise HelperFailure(f"{what}: expected one domain name or UUID")
    return args[0]


def cmd_libvirt_qmp(args):
    """`libvirt-qmp DOMAIN`, {"execute", "arguments"} on stdin -> {"qmp": QEMU's answer}."""
    domain = domain_arg(args, "libvirt-qmp")
    request = read_request()
    if not isinstance(request.get("execute"), str):
        raise HelperFailure('libvirt-qmp expects {"execute": ..., "arguments": ...} on stdin')
    arguments = request.get("arguments") if isinstance(request.get("arguments"), dict) else None
    emit({"qmp": libvirt_qmp(need_virsh(), domain, request["execute"], arguments)})
    return 0


MIGRATE_NAME = re.compile(r"^libvirt-migrate-[0-9]+-[0-9]+$")


def cmd_libvirt_migrate(args):
    """Start libvirt's live migration of a domain, detached from this session (it outlives the
    console's SSH connection); {"pid", "stem"}: its output and exit status land in the private
    folder under that stem, read by libvirt-job."""
    program = need_virsh()
    request = read_request()
    domain = domain_arg([str(request.get("domain", ""))], "libvirt-migrate")
    dest = str(request.get("dest_uri") or "")
    if not re.match(r"^[a-z0-9+]+://[^\s'\"]*$", dest):
        raise HelperFailure(f"libvirt-migrate: the destination is not a libvirt URI: {dest[:100]!r}")
    argv = [program, "-q", "-c", LIBVIRT_URI, "migrate", "--live"]
    if request.get("p2p"):
        argv.append("--p2p")
    if request.get("undefine_source"):
        argv += ["--persistent", "--undefinesource"]
    for key, option in (("migrate_uri", "--migrateuri"), ("listen_address", "--listen-address"),
                        ("bandwidth_mib", "--bandwidth")):
        if request.get(key) not in (None, ""):
            argv += [option, str(request[key])]
    argv += [domain, dest]
    downtime = request.get("downtime_ms")
    if isinstance(downtime, int) and downtime > 0:  # QEMU's downtime-limit, set before the job starts
        virsh(["migrate-setmaxdowntime", domain, str(downtime)], program=program)
    stem = f"libvirt-migrate-{os.getpid()}-{int(time.time() * 1000) % 10 ** 9}"
    folder = private_dir()
    watcher = [sys.executable, "-c", WATCHER, os.path.join(folder, stem)] + argv
    pid = detach(watcher, os.path.join(folder, stem + ".log"))
    emit({"pid": pid, "stem": stem, "argv": argv})
    return 0


# Runs virsh and writes its exit status next to its output, so whoever asks later (libvirt-job)
# learns how it ended even when nobody waited for it.
WATCHER = ("import subprocess,sys,os\n"
           "rc=subprocess.call(sys.argv[2:],stdin=subprocess.DEVNULL)\n"
           "tmp=sys.argv[1]+'.rc.tmp'\n"
           "open(tmp,'w').write(str(rc))\n"
           "os.rename(tmp,sys.argv[1]+'.rc')\n")


def migrate_files(stem):
    if not isinstance(stem, str) or not MIGRATE_NAME.match(stem):
        return None
    base = os.path.join(private_dir(), stem)
    return base + ".log", base + ".rc"


def cmd_libvirt_job(args):
    """`libvirt-job DOMAIN`, optional {"stem"} on stdin: the job's statistics (domjobinfo --rawstats),
    the domain's state, and how a detached `virsh migrate` ended (exit status, libvirt's words)."""
    program = need_virsh()
    domain = domain_arg(args, "libvirt-job")
    request = read_request()
    rc, out, err = virsh(["domjobinfo", domain, "--rawstats"], program=program)
    job = rawstats(out)
    if job.get("job_type") in (None, "none"):  # it ended between polls: its final figures, if kept
        rc_done, done, _ = virsh(["domjobinfo", domain, "--completed", "--anystats", "--rawstats"],
                                 program=program)
        if rc_done == 0 and rawstats(done).get("job_type") not in (None, "none"):
            job = rawstats(done)
    rc_state, state, state_err = virsh(["domstate", domain], program=program)
    answer = {"job": job, "job_error": err if rc != 0 else None,
              "state": state.strip() if rc_state == 0 else None, "state_error": state_err if rc_state else None}
    files = migrate_files(request.get("stem"))
    if files is not None:
        log_path, rc_path = files
        ended = (read_text(rc_path) or "").strip()
        answer["migrate_rc"] = int(ended) if ended.lstrip("-").isdigit() else None
        answer["migrate_said"] = virsh_sentence(read_text(log_path) or "")[-600:]
        if answer["migrate_rc"] is not None and request.get("tidy"):
            for path in files:
                with contextlib.suppress(OSError):
                    os.unlink(path)
    emit(answer)
    return 0


def rawstats(text):
    """`domjobinfo --rawstats` as a dict: numbers as ints, the job type as a word."""
    job = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            value = value.strip()
            job[key.strip().replace(" ", "_").lower()] = int(value) if value.lstrip("-").isdigit() else value
    if isinstance(job.get("job_type"), int):
        job["job_type"] = JOB_TYPES.get(job["job_type"], str(job["job_type"]))
    return job


def cmd_libvirt_abort(args):
    """`libvirt-abort DOMAIN`: domjobabort; {"aborted": bool, "said": libvirt's sentence}."""
    domain = domain_arg(args, "libvirt-abort")
    rc, _, err = virsh(["domjobabort", domain], program=need_virsh())
    emit({"aborted": rc == 0, "said": err})
    return 0


def cmd_libvirt_state(args):
    """`libvirt-state DOMAIN`: {"state": domstate or None (no such domain), "persistent", "said"}."""
    domain = domain_arg(args, "libvirt-state")
    program = need_virsh()
    rc, out, err = virsh(["domstate", domain], program=program)
    _, info, _ = virsh(["dominfo", domain], program=program) if rc == 0 else (1, "", "")
    emit({"state": out.strip() if rc == 0 else None, "said": err if rc else None,
          "persistent": xml_text(info, r"Persistent:\s*(\w+)") == "yes"})
    return 0


COMMANDS = {"probe": cmd_probe, "qmp": cmd_qmp, "launch-incoming": cmd_launch_incoming,
            "stop": cmd_stop, "files": cmd_files, "libvirt-qmp": cmd_libvirt_qmp,
            "libvirt-migrate": cmd_libvirt_migrate, "libvirt-job": cmd_libvirt_job,
            "libvirt-abort": cmd_libvirt_abort, "libvirt-state": cmd_libvirt_state}


def main(argv):
    if not argv or argv[0] not in COMMANDS:
        sys.stderr.write("sevconsole helper: unknown command {!r}; known: {}\n".format(
            argv[0] if argv else "", ", ".join(sorted(COMMANDS))))
        return 127
    try:
        return COMMANDS[argv[0]](argv[1:])
    except HelperFailure as exc:
        emit({"error": str(exc)})
        return 1
    except Exception as exc:  # any surprise still becomes one sentence
        emit({"error": f"helper {argv[0]} failed: {type(exc).__name__}: {exc}"})
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
