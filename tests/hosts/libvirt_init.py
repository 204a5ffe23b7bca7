"""PID 1 of one test libvirt "host": its own mount and PID namespaces (started by libvirt_rig.py
through `unshare -m -p --fork --mount-proc`), its own libvirtd, its own sshd.

Binds the host's folders over libvirt's system paths and its own /etc/machine-id, starts libvirtd
in the foreground, waits until it answers, starts sshd, prints "ready", then reaps every process
of the namespace at once (libvirt waits for each QEMU it stops to be reaped). SIGTERM stops
sshd and libvirtd; when this process exits the kernel ends everything left in the namespace.
"""

import json
import os
import signal
import subprocess
import sys
import time

FOLDERS = (("etc", "/etc/libvirt"), ("run", "/run/libvirt"), ("lib", "/var/lib/libvirt"),
           ("log", "/var/log/libvirt"), ("cache", "/var/cache/libvirt"))


def main() -> int:
    with open(sys.argv[1]) as handle:
        cfg = json.load(handle)
    base = cfg["base"]
    for src, dst in FOLDERS:
        os.makedirs(dst, exist_ok=True)
        subprocess.run(["mount", "--bind", os.path.join(base, src), dst], check=True)
    subprocess.run(["mount", "--bind", os.path.join(base, "machine-id"), "/etc/machine-id"], check=True)
    log = open(os.path.join(base, "host.log"), "ab")  # noqa: SIM115 (held for the host's whole life)
    children = [subprocess.Popen([cfg["libvirtd"], "--pid-file", os.path.join(base, "libvirtd.pid"),
                                  "--config", "/etc/libvirt/libvirtd.conf"], stdout=log, stderr=log)]
    deadline = time.monotonic() + 60
    while subprocess.run([cfg["virsh"], "-c", "qemu:///system", "uri"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL).returncode != 0:
        if children[0].poll() is not None or time.monotonic() > deadline:
            print("libvirtd did not start; see " + os.path.join(base, "host.log"), flush=True)
            return 1
        time.sleep(0.05)  # libvirtd has no readiness signal but its socket answering
    children.append(subprocess.Popen([cfg["sshd"], "-D", "-e", "-f", cfg["sshd_config"]], stdout=log, stderr=log))
    stopping = []

    def stop(*_: object) -> None:
        stopping.append(True)
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    while True:
        try:
            pid, _ = os.wait()  # any process of the namespace: we are its init
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue
        if stopping and all(child.poll() is not None for child in children):
            return 0
        if pid == children[-1].pid and not stopping:
            print("sshd exited", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
