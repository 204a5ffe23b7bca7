"""The allow-list that turns a source's QEMU command line into the target's (engine/argv_policy.py):
what passes, what is left behind, what is rewritten, and that every refusal names the option."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevconsole.engine.argv_policy import (
    FIRMWARE_DIRS,
    ArgvRefused,
    Refusal,
    TargetArgv,
    require_target_argv,
    target_argv,
)
from sevconsole.engine.errors import LinkError
from sevconsole.engine.links import incoming_argv
from sevconsole.hosts import helper
from sevconsole.lab import argv as lab_argv

QEMU = "/usr/bin/qemu-system-x86_64"
SEV_VM = [QEMU, "-name", "guest=web,debug-threads=on", "-machine",
          "q35,accel=kvm,confidential-guest-support=sev0,memory-backend=ram0,kernel-irqchip=split",
          "-cpu", "EPYC-v4,+sev,host-phys-bits=on", "-smp", "cpus=4,sockets=1,cores=4", "-m", "4G",
          "-object", "memory-backend-memfd,id=ram0,size=4G,share=on",
          "-object", "sev-guest,id=sev0,policy=0x33,cbitpos=51,reduced-phys-bits=1",
          "-bios", "/usr/share/OVMF/OVMF.amdsev.fd", "-nodefaults", "-no-user-config", "-display", "none",
          "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0,id=nic0,mac=52:54:00:12:34:56",
          "-chardev", "pty,id=con0", "-device", "virtio-serial-pci,id=vs0",
          "-device", "virtconsole,chardev=con0,id=console0,name=org.qemu.console.0",
          "-object", "rng-builtin,id=rng0", "-device", "virtio-rng-pci,rng=rng0",
          "-rtc", "base=utc,driftfix=slew", "-global", "kvm-pit.lost_tick_policy=delay",
          "-sandbox", "on,obsolete=deny,spawn=deny", "-uuid", "8d6f3c5e-35ac-4b4e-9d5a-0e4f3c9b2a11",
          "-device", '{"driver":"virtio-balloon-pci","id":"balloon0"}', "-serial", "none", "-S",
          # the source host's own plumbing: left behind
          "-chardev", "socket,id=charmon,path=/run/qemu/web.mon,server=on,wait=off",
          "-mon", "chardev=charmon,id=monitor,mode=control", "-qmp", "unix:/run/qemu/web.qmp,server=on,wait=off",
          "-pidfile", "/run/qemu/web.pid", "-daemonize", "-D", "/var/log/qemu/web.log"]


def _sentence(argv: list[str], target: str = "lab-2") -> str:
    verdict = target_argv(argv)
    assert isinstance(verdict, Refusal), verdict
    return verdict.sentence(target)


def test_a_hand_started_sev_guest_passes_without_its_plumbing() -> None:
    out = target_argv(SEV_VM)
    assert isinstance(out, TargetArgv), out
    assert out.argv[0] == "qemu-system-x86_64"  # the target's own QEMU, never the source's path
    assert out.left_behind == ("-chardev charmon", "-mon", "-qmp", "-pidfile", "-daemonize", "-D")
    assert out.rewritten == ()
    kept = list(out.argv[1:])
    for gone in ("-qmp", "-mon", "-pidfile", "-daemonize", "-D", "/run/qemu/web.mon"):
        assert not any(gone in arg for arg in kept), gone
    # everything else is carried word for word, in the source's order
    expected = [a for a in SEV_VM[1:SEV_VM.index("socket,id=charmon,path=/run/qemu/web.mon,server=on,wait=off") - 1]]
    assert kept == expected
    helper.check_target_argv(list(out.argv))  # the helper's re-check agrees
    lab_argv.refuse_never(list(out.argv))


def test_the_lab_guest_passes_unchanged_but_for_its_qmp() -> None:
    src = lab_argv.build_argv("web", 64, True, 0x18000033, "/state/run/lab-1/web-1000.qmp")
    out = require_target_argv(src)
    assert list(out.argv) == [a for a in src if "qmp" not in a]
    assert lab_argv.parse_argv(list(out.argv)).policy == 0x18000033


@pytest.mark.parametrize("injected, option, harm", [
    (["-netdev", "bridge,id=x,br=br0,helper=touch /tmp/PWNED;"], "-netdev bridge with helper=", "run a program"),
    (["-netdev", "bridge,id=x,br=br0"], "-netdev bridge", "run a program"),
    (["-netdev", "tap,id=t,script=/tmp/up.sh"], "-netdev tap with script=", "run a program"),
    (["-netdev", "tap,id=t,ifname=tap0,script=no,downscript=/tmp/down"], "-netdev tap with downscript=",
     "run a program"),
    (["-netdev", "tap,id=t,ifname=tap0,script=no,downscript=no"], "-netdev tap", "network connection"),
    (["-netdev", "user,id=n,guestfwd=tcp:10.0.2.100:1-cmd:/bin/sh"], "-netdev user with guestfwd=", "run a program"),
    (["-netdev", "user,id=n,smb=/etc"], "-netdev user with smb=", "run smbd"),
    (["-netdev", "user,id=n,tftp=/etc"], "-netdev user with tftp=/etc", "open a path"),
    (["-netdev", "user,id=n,hostfwd=tcp::2222-:22"], "-netdev user with hostfwd=", "open a port on lab-2"),
    (["-netdev", '{"type":"bridge","id":"x","helper":"/tmp/evil"}'], "-netdev bridge with helper=", "run a program"),
    (["-netdev", "socket,id=s,connect=10.0.0.1:1234"], "-netdev socket", "network connection"),
    (["-nic", "tap,script=/tmp/x"], "-nic tap with script=", "run a program"),
    (["-plugin", "/tmp/evil.so"], "-plugin", "run a program"),
    (["-readconfig", "/tmp/evil.cfg"], "-readconfig", "open a path"),
    (["-add-fd", "fd=3,set=1"], "-add-fd", "open a path"),
    (["-fw_cfg", "name=opt/x,file=/etc/shadow"], "-fw_cfg", "open a path"),
    (["-object", "memory-backend-file,id=m,size=1G,mem-path=/x,helper=y"], "-object memory-backend-file with helper=",
     "run a program"),
    (["-object", "rng-random,id=r,filename=/dev/random"], "-object rng-random", "open a path"),
    (["-object", "secret,id=s,file=/etc/shadow"], "-object secret with file=/etc/shadow", "open a path"),
    (["-object", "input-linux,id=i,evdev=/dev/input/event0"], "-object input-linux", "not on the list"),
    (["-object", "sev-guest,id=sev0,sev-device=/tmp/fake-sev"], "-object sev-guest with sev-device=/tmp/fake-sev",
     "open a path"),
    (["-drive", "file=/var/lib/images/web.qcow2,if=virtio"], "-drive", "disk image"),
    (["-blockdev", '{"driver":"file","filename":"/etc/shadow","node-name":"f"}'], "-blockdev", "disk image"),
    (["-cdrom", "/tmp/x.iso"], "-cdrom", "disk image"),
    (["/var/lib/images/web.img"], "the bare word '/var/lib/images/web.img'", "disk image"),
    (["-chardev", "file,id=c,path=/etc/cron.d/x"], "-chardev file", "open a path"),
    (["-chardev", "socket,id=c,path=/run/x.sock,server=on"], "-chardev socket", "network connection"),
    (["-chardev", "pty,id=c,logfile=/etc/x"], "-chardev pty with logfile=", "open a path"),
    (["-serial", "file:/etc/x"], "-serial file:/etc/x", "open a path"),
    (["-serial", "/dev/ttyS0"], "-serial /dev/ttyS0", "open a path"),
    (["-serial", "tcp:10.0.0.1:4444"], "-serial tcp:10.0.0.1:4444", "network connection"),
    (["-kernel", "/boot/vmlinuz"], "-kernel", "open a path"),
    (["-initrd", "/boot/initrd"], "-initrd", "open a path"),
    (["-L", "/tmp/roms"], "-L", "open a path"),
    (["-bios", "/etc/shadow"], "-bios /etc/shadow", "open a path"),
    (["-bios", "/usr/share/OVMF/../../../etc/shadow"], "-bios /usr/share/OVMF/../../../etc/shadow", "open a path"),
    (["-machine", "q35,firmware=/tmp/x.fd"], "-machine with firmware=/tmp/x.fd", "open a path"),
    (["-machine", "q35,dumpdtb=/etc/x"], "-machine with dumpdtb=/etc/x", "open a path"),
    (["-device", "virtio-net-pci,netdev=n,romfile=/etc/shadow"], "-device virtio-net-pci with romfile=/etc/shadow",
     "open a path"),
    (["-device", '{"driver":"e1000","romfile":"/etc/shadow"}'], "-device e1000 with romfile=/etc/shadow",
     "open a path"),
    (["-device", "vfio-pci,host=0000:01:00.0"], "-device vfio-pci", "not on the list"),
    (["-device", "loader,file=/etc/shadow,addr=0x1000"], "-device loader", "not on the list"),
    (["-global", "e1000.romfile=/etc/shadow"], "-global e1000.romfile", "not on the list"),
    (["-runas", "root"], "-runas", "privileges"),
    (["-run-with", "user=root"], "-run-with", "privileges"),
    (["-chroot", "/"], "-chroot", "privileges"),
    (["-sandbox", "off"], "-sandbox with enable=off", "a value sevconsole does not carry"),
    (["-display", "vnc=0.0.0.0:0"], "-display vnc=0.0.0.0:0", "open a display"),
    (["-vnc", ":0"], "-vnc :0", "open a display"),
    (["-mem-path", "/dev/hugepages"], "-mem-path", "open a path"),
    (["-smbios", "file=/etc/x"], "-smbios", "not on the list"),
    (["-m", "lots"], "-m with size=lots", "a value sevconsole does not carry"),
    (["-smp", "0"], "-smp with cpus=0", "a value sevconsole does not carry"),
    (["-machine", "q35,accel=kvm,accel=tcg"], "-machine q35,accel=kvm,accel=tcg", "twice"),
    (["-device", '{"driver":"e1000","id":"a","id":"b"}'], "-device", "twice"),
    (["-object", "sev-guest,id=sev0,cbitpos=64"], "-object sev-guest with cbitpos=64", "a value"),
    (["-cpu", "EPYC,x=/etc/shadow"], "-cpu EPYC,x=/etc/shadow", "not a plain name"),
    (["-name", "ok", "-name", "evil\x1b]0;x\x07"], "'evil\\x1b]0;x\\x07'", "control character"),
    (["-machine"], "-machine without a value", "not on the list"),
    (["-name", "-daemonize"], "-name -daemonize", "looks like an option"),
])
def test_refusals_name_the_option_and_the_harm(injected: list[str], option: str, harm: str) -> None:
    sentence = _sentence([QEMU, "-name", "web", "-m", "64", *injected])
    assert sentence.startswith(f"the source's command line has {option}"), sentence
    assert harm in sentence and sentence.endswith("; refused"), sentence
    assert "{target}" not in sentence


def test_refused_program() -> None:
    assert "would run a program the source named" in _sentence(["/bin/sh", "-c", "touch /tmp/x"])
    assert "nothing to start" in _sentence([])


def test_rewrites_are_said() -> None:
    out = require_target_argv([QEMU, "-name", "web", "-machine", "q35,memory-backend=ram0",
                               "-object", "memory-backend-file,id=ram0,size=64M,mem-path=/srv/web.ram,share=off",
                               "-object", "sev-guest,id=sev0,policy=0x33,dh-cert-file=/srv/dh,session-file=/srv/s"])
    assert out.argv[out.argv.index("-object") + 1] == "memory-backend-ram,id=ram0,size=64M,share=off"
    assert out.argv[-1] == "sev-guest,id=sev0,policy=0x33"
    assert any("mem-path is not opened" in n for n in out.rewritten)
    assert any("dh-cert-file and session-file" in n for n in out.rewritten)
    json_form = require_target_argv([QEMU, "-object", json.dumps(
        {"qom-type": "memory-backend-file", "id": "m", "size": 1 << 26, "mem-path": "/srv/x"})])
    assert json.loads(json_form.argv[-1]) == {"qom-type": "memory-backend-ram", "id": "m", "size": str(1 << 26)}


def test_firmware_names_and_system_folders_pass() -> None:
    for bios in ("OVMF.fd", "/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/qemu/bios-256k.bin"):
        assert isinstance(target_argv([QEMU, "-bios", bios]), TargetArgv), bios
    for bios in ("/usr/share/OVMF//x", "/usr/share/OVMFX/x.fd", "../OVMF.fd", ".OVMF.fd", "/tmp/OVMF.fd"):
        assert isinstance(target_argv([QEMU, "-bios", bios]), Refusal), bios


def test_double_dash_options_and_flags() -> None:
    out = require_target_argv([QEMU, "--name", "web", "--enable-kvm", "--daemonize", "-S"])
    assert out.argv == ("qemu-system-x86_64", "-name", "web", "-enable-kvm", "-S")
    assert isinstance(target_argv([QEMU, "--incoming=tcp:0:4444"]), Refusal)  # QEMU has no -opt=value


def test_incoming_argv_adds_the_targets_own_socket_or_raises_link_error() -> None:
    assert incoming_argv([QEMU, "-name", "web", "-qmp", "unix:/src.qmp,server=on"], "/dst.qmp", "h2") == [
        "qemu-system-x86_64", "-name", "web", "-qmp", "unix:/dst.qmp,server=on,wait=off", "-incoming", "defer"]
    with pytest.raises(LinkError) as info:
        incoming_argv([QEMU, "-plugin", "/x.so"], "/dst.qmp", "h2")
    assert info.value.host == "h2" and "-plugin" in str(info.value) and "h2 run a program" in str(info.value)
    with pytest.raises(ArgvRefused) as refused:
        require_target_argv([QEMU, "-plugin", "/x.so"], "h3")
    assert refused.value.refusal.option == "-plugin" and "h3" in str(refused.value)


# ---- property: whatever passes is a fixed point and carries no path but firmware

SAFE = [["-name", "web"], ["-name", "a/b,,c"], ["-m", "64"], ["-m", "size=1G,slots=2,maxmem=4G"],
        ["-machine", "q35,accel=tcg"], ["-smp", "2"], ["-cpu", "EPYC-v4,+sev"], ["-S"], ["-nodefaults"],
        ["-object", "sev-guest,id=sev0,policy=0x33,cbitpos=51,reduced-phys-bits=1"],
        ["-object", "memory-backend-file,id=r,size=64M,mem-path=/srv/r"], ["-display", "none"],
        ["-qmp", "unix:/run/x.qmp,server=on,wait=off"], ["-pidfile", "/run/x.pid"], ["-daemonize"],
        ["-netdev", "user,id=n,net=10.0.2.0/24"], ["-device", "virtio-net-pci,netdev=n,romfile="],
        ["-bios", "/usr/share/OVMF/OVMF.fd"],
        ["-chardev", "socket,id=m,path=/run/m.sock", "-mon", "chardev=m,mode=control"]]
HOSTILE = [["-netdev", "bridge,id=x,helper=/x"], ["-plugin", "/x"], ["-drive", "file=/x"], ["/x"],
           ["-device", "e1000,romfile=/x"], ["-chardev", "file,id=f,path=/x"], ["-object", "secret,id=s,file=/x"],
           ["-name"], ["-machine", "q35,kernel=/x"], ["-serial", "pipe:/x"], ["-global", "VGA.romfile=/x"]]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(SAFE + HOSTILE), max_size=12), st.lists(st.sampled_from(SAFE), max_size=4))
def test_what_passes_is_a_fixed_point_without_source_paths(parts: list[list[str]], tail: list[list[str]]) -> None:
    argv = [QEMU] + [word for part in parts + tail for word in part]
    verdict = target_argv(argv)
    if isinstance(verdict, Refusal):
        assert any(part in HOSTILE for part in parts)
        return
    out = list(verdict.argv)
    helper.check_target_argv(out)  # the helper's re-check and the lab's agree with what passes
    lab_argv.refuse_never(out)
    again = require_target_argv(out)
    assert again.argv == verdict.argv and again.rewritten == ()
    for i, word in enumerate(out[1:], 1):
        if "/" in word:
            allowed = (out[i - 1] == "-bios" and word.startswith(FIRMWARE_DIRS)) or \
                (out[i - 1] == "-name") or word.startswith("user,id=n,net=")
            assert allowed, (out[i - 1], word)


def test_a_refusal_never_quotes_a_secret() -> None:
    """A refused word is quoted in preflight, `migrate` output and the audit log: redacted."""
    from sevconsole.engine.argv_policy import _show

    assert "hunter2" not in _show("secret,id=s0,data=hunter2,file=/etc/x")
    assert "hunter2" not in _show("iscsi,password=hunter2")
