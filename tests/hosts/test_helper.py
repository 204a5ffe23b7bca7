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

from sevconsole.engine.argv_policy import Refusal, require_target_argv, target_argv
from sevconsole.hosts import helper
from sevconsole.hosts.remote import BOOTSTRAP, helper_blob, helper_command
from sevconsole.lab import argv as lab_argv

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


def test_incoming_command_takes_the_filtered_argv_and_adds_its_own_qmp() -> None:
    source = ["/nonexistent/qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "64", "-name", "web",
              "-chardev", "socket,id=mon0,path=/run/web.sock,server=on,wait=off",
              "-mon", "chardev=mon0,mode=control", "-chardev", "pty,id=con0", "-serial", "chardev:con0",
              "-qmp", "unix:/run/web.qmp,server=on,wait=off", "-pidfile", "/run/web.pid", "-daemonize", "-S"]
    filtered = require_target_argv(source).argv
    with pytest.raises(helper.HelperFailure, match="still has -mon"):
        helper.incoming_command(["qemu-system-x86_64", "-mon", "x"], "/x.qmp")
    out = helper.incoming_command(list(filtered), "/run/web-incoming.qmp")
    assert out[0].endswith("/qemu-system-x86_64") and out[0] != source[0]  # this host's own QEMU
    assert out[1:] == ["-machine", "q35,accel=tcg", "-m", "64", "-name", "web", "-chardev", "pty,id=con0",
                       "-serial", "chardev:con0", "-S",
                       "-qmp", "unix:/run/web-incoming.qmp,server=on,wait=off", "-incoming", "defer"]


@pytest.mark.parametrize("argv, named", [
    (["sh", "-c", "id"], "named without a folder"),
    (["qemu-system-x86_64", "-qmp", "unix:/x,server=on"], "still has -qmp"),
    (["qemu-system-x86_64", "--incoming", "defer"], "still has -incoming"),
    (["qemu-system-x86_64", "-plugin", "/tmp/x.so"], "refused -plugin"),
    (["qemu-system-x86_64", "-netdev", "bridge,id=x,br=br0,helper=touch /tmp/PWNED;"], "refused helper="),
    (["qemu-system-x86_64", "-device", '{"driver": "e1000", "romfile": "/etc/shadow"}'], "refused romfile="),
    (["qemu-system-x86_64", "-object", "memory-backend-file,id=m,mem-path=/dev/shm/x"], "refused mem-path="),
])
def test_helper_re_check_refuses_what_the_allow_list_never_sends(argv: list[str], named: str) -> None:
    with pytest.raises(helper.HelperFailure, match=named):
        helper.check_target_argv(argv)
    verdict = target_argv(argv)  # the console's allow-list refuses it, or leaves it behind
    assert isinstance(verdict, Refusal) or helper.check_target_argv(list(verdict.argv)) is None


def test_helper_runs_only_its_own_qemu_of_that_name() -> None:
    with pytest.raises(helper.HelperFailure, match="named without a folder"):
        helper.check_target_argv(["/tmp/qemu-system-x86_64", "-m", "64"])
    assert target_argv(["/tmp/qemu-system-x86_64", "-m", "64"]).argv[0] == "qemu-system-x86_64"  # type: ignore[union-attr]


def test_never_lists_match_the_lab_and_the_allow_list_refuses_each() -> None:
    assert (helper.NEVER_OPTIONS, helper.NEVER_KEYS) == (lab_argv.NEVER_OPTIONS, lab_argv.NEVER_KEYS)
    base = ["qemu-system-x86_64", "-name", "web"]
    for option in helper.NEVER_OPTIONS + helper.PLUMBING:
        verdict = target_argv([*base, option, "x"] if option != "-daemonize" else [*base, option])
        assert isinstance(verdict, Refusal) or option not in verdict.argv, option
    for key in helper.NEVER_KEYS:
        for carrier in ("-netdev user,id=n", "-device virtio-net-pci,id=d", "-object sev-guest,id=s",
                        "-chardev null,id=c", "-machine q35"):
            option, value = carrier.split(" ")
            verdict = target_argv([*base, option, f"{value},{key}=/etc/shadow"])
            # refused, or (sev-guest's launch files) dropped: never passed on to the target
            assert isinstance(verdict, Refusal) or not any(
                key in helper.option_keys(arg) for arg in verdict.argv), (key, carrier)


def test_safe_stem_keeps_names_out_of_folders() -> None:
    for name in ("../../x", "a/b", "vault[/]", ".hidden", "", None, "é/\x00"):
        stem = helper.safe_stem(name)
        assert "/" not in stem and not stem.startswith(".") and stem and len(stem) <= 48
    assert helper.safe_stem("web-1_a.b") == "web-1_a.b"


def test_split_opts_escapes() -> None:
    assert helper.split_opts("a,,b,c=d,,e,flag") == ("a,b", {"c": "d,e", "flag": "on"})


def test_sev_ioctl_numbers_match_the_kernel_uapi() -> None:
    # _IOWR('S', 0x0, struct sev_issue_cmd) with the 16-byte packed struct, as psp-sev.h defines it
    assert helper.SEV_ISSUE_CMD == 0xC0105300
    assert (helper.SEV_PLATFORM_STATUS, helper.SEV_PDH_CERT_EXPORT) == (1, 5)
    assert (helper.SEV_CERT_LEN, helper.PLATFORM_CHAIN_LEN) == (2084, 6252)
