"""The remote helper's pure parts (argv parsing, the incoming command line), its Python 3.6
syntax, and its probe run locally exactly as a host runs it (the inline bootstrap)."""

from __future__ import annotations

import ast
import json
import shlex
import subprocess
import sys
from importlib import resources

import pytest

from sevconsole.hosts import helper
from sevconsole.hosts.remote import BOOTSTRAP, helper_blob, helper_command

SOURCE = resources.files("sevconsole.hosts").joinpath("helper.py").read_text()


def test_helper_is_python36_syntax_and_stdlib_only() -> None:
    tree = ast.parse(SOURCE, feature_version=(3, 6))  # EL8 hosts ship Python 3.6
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)
    assert not any(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in ast.walk(tree))


def test_invocation_is_the_documented_one() -> None:
    words = shlex.split(helper_command("stop", "42"))
    assert words[:3] == ["python3", "-c", BOOTSTRAP] and words[4:] == ["stop", "42"]
    assert BOOTSTRAP == "import base64,sys,zlib;exec(zlib.decompress(base64.b64decode(sys.argv.pop(1))))"
    assert len(helper_blob()) < len(SOURCE)  # compressed


def test_probe_runs_inline_like_on_a_host() -> None:
    words = shlex.split(helper_command("probe", "--qmp-glob", "/nonexistent/*.qmp"))
    out = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["helper"] == 1 and data["kernel"] and isinstance(data["vms"], list)
    assert data["kvm_amd"].keys() == {"sev", "sev_es"} and isinstance(data["dev_sev"], bool)
    mem = data["memory"]
    assert 0 < mem["available_mib"] <= mem["total_mib"]



def test_unknown_command_exits_127() -> None:
    words = shlex.split(helper_command("nope"))
    out = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True, timeout=30)
    assert out.returncode == 127 and "unknown command 'nope'" in out.stderr


@pytest.mark.parametrize("argv, name, qmp", [
    (["qemu-system-x86_64", "-name", "web", "-qmp", "unix:/run/web.qmp,server=on,wait=off"], "web", "/run/web.qmp"),
    (["/usr/bin/qemu-system-x86_64", "-name", "guest=db,debug-threads=on", "-chardev",
      "socket,id=charmonitor,path=/var/lib/db.sock,server=on,wait=off", "-mon",
      "chardev=charmonitor,id=monitor,mode=control"], "db", "/var/lib/db.sock"),
    (["qemu-kvm", "--name", "x,,y", "-qmp", "unix:/tmp/a,,b.qmp,server"], "x,y", "/tmp/a,b.qmp"),
    (["qemu-system-x86_64", "-qmp", "tcp:127.0.0.1:4444,server"], None, None),
    (["qemu-system-x86_64", "-chardev", "socket,id=c,fd=3,server=on", "-mon", "chardev=c,mode=control"], None, None),
])
def test_name_and_qmp_from_argv(argv: list[str], name: str | None, qmp: str | None) -> None:
    assert helper.vm_name(argv) == name
    assert helper.qmp_path_from_argv(argv) == qmp


def test_is_qemu() -> None:
    assert helper.is_qemu(["/usr/bin/qemu-system-x86_64"]) and helper.is_qemu(["qemu-kvm"])
    assert not helper.is_qemu(["python3", "qemu-system-x86_64"]) and not helper.is_qemu([])


def test_incoming_argv_keeps_devices_and_drops_what_would_clash() -> None:
    source = ["/nonexistent/qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "64", "-name", "web",
              "-chardev", "socket,id=mon0,path=/run/web.sock,server=on,wait=off",
              "-mon", "chardev=mon0,mode=control", "-chardev", "file,id=log0,path=/tmp/serial.log",
              "-serial", "chardev:log0", "-qmp", "unix:/run/web.qmp,server=on,wait=off",
              "-pidfile", "/run/web.pid", "-daemonize", "-S", "--incoming=tcp:0:4444"]
    out = helper.incoming_argv(source, "/run/web-incoming.qmp")
    assert out[0].endswith("qemu-system-x86_64") and out[0] != source[0]  # found on PATH instead
    assert out[1:] == ["-machine", "q35,accel=tcg", "-m", "64", "-name", "web",
                       "-chardev", "file,id=log0,path=/tmp/serial.log", "-serial", "chardev:log0",
                       "-qmp", "unix:/run/web-incoming.qmp,server=on,wait=off", "-incoming", "defer"]


def test_split_opts_escapes() -> None:
    assert helper.split_opts("a,,b,c=d,,e,flag") == ("a,b", {"c": "d,e", "flag": "on"})


def test_sev_ioctl_numbers_match_the_kernel_uapi() -> None:
    # _IOWR('S', 0x0, struct sev_issue_cmd) with the 16-byte packed struct, as psp-sev.h defines it
    assert helper.SEV_ISSUE_CMD == 0xC0105300
    assert (helper.SEV_PLATFORM_STATUS, helper.SEV_PDH_CERT_EXPORT) == (1, 5)
    assert (helper.SEV_CERT_LEN, helper.PLATFORM_CHAIN_LEN) == (2084, 6252)
