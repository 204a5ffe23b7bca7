#!/usr/bin/env bash
# Installs what the tests need, checks the code (ruff, mypy), then runs the whole suite (slow
# tests included).
# System packages come from apt-get when missing and running as root; elsewhere the tests
# that need them skip with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /usr/sbin/sshd ] || command -v sshd >/dev/null || need+=(openssh-server)
command -v socat >/dev/null || need+=(socat)
command -v tmux >/dev/null || need+=(tmux)
# two real libvirt daemons for tests/engine/test_libvirt.py (their own namespaces, see tests/hosts/libvirt_rig.py)
command -v libvirtd >/dev/null || [ -x /usr/sbin/libvirtd ] || need+=(libvirt-daemon-system)
command -v virsh >/dev/null || need+=(libvirt-clients)
command -v nc >/dev/null || need+=(netcat-openbsd)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

python3 -m pip install -q --root-user-action=ignore -e '.[test]'
python3 -m ruff check sevconsole tests benchmarks screenshots
python3 -m mypy sevconsole  # strict on sev/ and engine/, the default level elsewhere (pyproject.toml)
# Two workers (pytest-xdist), each given whole test files: a module's shared lab stays on one
# worker. Most of a serial run is spent waiting on labs, QEMUs and runners, not on the CPU.
exec python3 -m pytest -q -rs -n 2 --dist loadfile "$@"
