"""The TOML inventory, ~/.ssh/config resolution, and ProxyJump through a real sshd."""

from __future__ import annotations

import getpass
from pathlib import Path

import paramiko
import pytest

from sevconsole.hosts.errors import InventoryError
from sevconsole.hosts.inventory import hosts_from_ssh_config, load_inventory, parse_inventory
from sevconsole.hosts.ssh import SshPool, resolve
from tests.hosts.conftest import Sshd

GOOD = """\
# two hosts and a bastion
[[host]]
name = "bastion"
address = "203.0.113.1"
user = "ops"

[[host]]
name = "epyc-1"
address = "10.0.0.11"
port = 2222
identity = "keys/id_ed25519"
jump = "bastion"
qmp_sockets = ["/run/qemu/*.qmp"]
labels = ["rack-a", "rome"]

[[host]]
name = "lab-1"
address = "127.0.0.1"
port = 40001
lab = true
identity = ["keys/id_ed25519"]
"""


def write(tmp_path: Path, text: str, key: bool = True) -> Path:
    if key:
        (tmp_path / "keys").mkdir(exist_ok=True)
        (tmp_path / "keys" / "id_ed25519").write_text("not read here\n")
    path = tmp_path / "inventory.toml"
    path.write_text(text)
    return path


def test_good_inventory(tmp_path: Path) -> None:
    inv = load_inventory(write(tmp_path, GOOD))
    by = inv.by_name()
    assert list(by) == ["bastion", "epyc-1", "lab-1"]
    epyc = by["epyc-1"]
    assert (epyc.address, epyc.port, epyc.user, epyc.jump) == ("10.0.0.11", 2222, None, "bastion")
    assert epyc.identity == ((tmp_path / "keys" / "id_ed25519").resolve(),)  # relative to the file
    assert epyc.qmp_sockets == ("/run/qemu/*.qmp",) and epyc.labels == ("rack-a", "rome")
    assert by["lab-1"].lab and not epyc.lab
    assert epyc.origin == f"{tmp_path / 'inventory.toml'}:7"
    endpoint = resolve(epyc, inventory=by)
    assert [(j.name, j.user, j.address, j.port) for j in endpoint.jump] == [("bastion", "ops", "203.0.113.1", 22)]
    assert endpoint.user == getpass.getuser()


def test_every_problem_is_one_line_with_file_line_and_key(tmp_path: Path) -> None:
    text = """\
[[host]]
name = "a"
adress = "10.0.0.1"
port = 70000

[[host]]
name = "a"
address = "10.0.0.2"
lab = "yes"
identity = "keys/missing"
qmp_sockets = ["relative/*.qmp"]

[[host]]
address = "10.0.0.3"
jump = "no such thing!"
"""
    with pytest.raises(InventoryError) as info:
        load_inventory(write(tmp_path, text))
    lines = str(info.value).splitlines()
    name = str(tmp_path / "inventory.toml")
    assert all(line.startswith(name + ":") for line in lines)
    expected = [
        (3, "adress: unknown key (did you mean 'address'?)"),
        (4, "port: must be a whole number from 1 to 65535, not 70000"),
        (1, "address: missing"),
        (9, "lab: must be true or false"),
        (10, "identity: no such key file"),
        (11, "qmp_sockets: 'relative/*.qmp' must be an absolute path"),
        (13, "name: missing"),
    ]
    for lineno, words in expected:
        assert any(line.startswith(f"{name}:{lineno}: {words}") for line in lines), (lineno, words, lines)
    assert any(":7: name: duplicate host name 'a' (first at line 2)" in line for line in lines), lines


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(InventoryError) as info:
        load_inventory(write(tmp_path, '[[host]]\nname = "a"\naddress = 10.0.0.1.5\n', key=False))
    [problem] = info.value.problems
    assert problem.line == 3 and "not valid TOML" in problem.message


@pytest.mark.parametrize("text, words", [
    ("", "no hosts"),
    ("host = 3\n", "must be an array of tables"),
    ('hosts = []\n[[host]]\nname="a"\naddress="b"\n', "hosts: unknown top-level key"),
    ('[[host]]\nname = "a b"\naddress = "x"\n', "use letters, digits"),
    ('[[host]]\nname = "a"\naddress = "x"\njump = "a"\n', "its own jump host"),
    ('[[host]]\nname = "a"\naddress = "x"\nlabels = [1, 2]\n', "labels: must be a string or a list"),
])
def test_more_bad_inventories(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(InventoryError) as info:
        parse_inventory(text, tmp_path / "inv.toml")
    assert words in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InventoryError) as info:
        load_inventory(tmp_path / "nope.toml")
    assert str(info.value) == f"{tmp_path / 'nope.toml'}: no such file"


@pytest.mark.parametrize("content, words", [
    ("x = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("[[host]]\nname = \"caf\xe9\"\n".encode("latin-1"), "not UTF-8 text (line 2"),
    (b"a" * (5 * 1024 * 1024), "more than the 4 MiB"),
])
def test_hostile_inventory_files_are_one_problem(tmp_path: Path, content: str | bytes, words: str) -> None:
    path = tmp_path / "inv.toml"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    assert str(info.value).startswith(f"{path}: ") and words in str(info.value)


def test_devices_fifos_and_folders_are_refused_without_reading(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # opening it the usual way would wait for a writer forever
    for path, kind in ((Path("/dev/zero"), "a device"), (fifo, "a FIFO"), (tmp_path, "a folder")):
        with pytest.raises(InventoryError) as info:
            load_inventory(path)
        assert kind in str(info.value) and "not a regular file" in str(info.value)


def test_discover_with_an_unusable_inventory_says_one_line(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    deep = tmp_path / "deep.toml"
    deep.write_text("[[host]]\nname = " + "[" * 5000 + "]" * 5000 + "\n")
    env = {**os.environ, "HOME": str(tmp_path), "SEVCONSOLE_DATA_DIR": str(tmp_path / "data"),
           "SEVCONSOLE_CONFIG_DIR": str(tmp_path / "config")}
    for inventory in ("/dev/zero", str(deep)):
        result = subprocess.run([sys.executable, "-m", "sevconsole", "discover", "--inventory", inventory],
                                capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert inventory in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_bad_ssh_config_is_an_inventory_problem(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("Host web1\n  BadLineWithoutValue\n")
    with pytest.raises(InventoryError) as info:
        hosts_from_ssh_config(path=config)
    assert str(info.value).startswith(f"{config}: not a valid ssh config")


SSH_CONFIG = """\
Host web1
    HostName 10.1.0.5
    User admin
    Port 2200
    IdentityFile ~/keys/web
    ProxyJump hop1,hop2

Host hop1
    HostName 10.0.0.1
    User jumper

Host hop2
    HostName 10.0.0.2
    ProxyJump edge

Host edge
    HostName 198.51.100.7
    Port 2022

Host *.internal !bad.internal
    User svc
"""


def test_ssh_config_applies_recursively(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text(SSH_CONFIG)
    config = paramiko.SSHConfig.from_path(str(path))
    [web] = hosts_from_ssh_config("web*", path)
    endpoint = resolve(web, config=config)
    assert (endpoint.address, endpoint.port, endpoint.user) == ("10.1.0.5", 2200, "admin")
    assert endpoint.identities == (Path.home() / "keys" / "web",)
    # edge first (hop2's own jump), then hop1... no: hop1, then edge -> hop2, in ProxyJump order
    assert [(j.address, j.port, j.user) for j in endpoint.jump] == [
        ("10.0.0.1", 22, "jumper"), ("198.51.100.7", 2022, getpass.getuser()), ("10.0.0.2", 22, getpass.getuser())]
    names = [h.name for h in hosts_from_ssh_config(None, path)]
    assert names == ["edge", "hop1", "hop2", "web1"]  # no wildcard or negated patterns
    with pytest.raises(InventoryError) as info:
        hosts_from_ssh_config("db*", path)
    assert "no Host entry matches 'db*'" in str(info.value)


def test_proxyjump_loop_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text("Host a\n    ProxyJump b\nHost b\n    ProxyJump a\n")
    [a, _] = hosts_from_ssh_config(None, path)
    from sevconsole.hosts.errors import SshError

    with pytest.raises(SshError) as info:
        resolve(a, config=paramiko.SSHConfig.from_path(str(path)))
    assert "loop" in str(info.value)


@pytest.mark.needs_sshd
def test_jump_through_a_real_sshd(sshd: Sshd, pool: SshPool, tmp_path: Path) -> None:
    """ssh config with ProxyJump: the target is reached through a direct-tcpip channel of the
    jump host's transport, and both transports are pooled."""
    path = tmp_path / "config"
    path.write_text(f"""\
Host target
    HostName 127.0.0.1
    Port {sshd.port}
    User {sshd.user}
    IdentityFile {sshd.client_key}
    ProxyJump {sshd.user}@jumpbox:{sshd.port}
Host jumpbox
    HostName 127.0.0.1
    IdentityFile {sshd.client_key}
""")
    config = paramiko.SSHConfig.from_path(str(path))
    [target] = [h for h in hosts_from_ssh_config("target", path)]
    endpoint = resolve(target, config=config)
    assert len(endpoint.jump) == 1
    conn = pool.get(endpoint)
    assert conn.via is not None and conn.via.endpoint.address == "127.0.0.1"
    assert isinstance(conn.transport.sock, paramiko.Channel)  # rides on the jump host's transport
    assert conn.run("echo through").stdout == b"through\n"


@pytest.mark.needs_sshd
def test_inventory_jump_names_another_host(sshd: Sshd, tmp_path: Path) -> None:
    """`jump = "bastion"` rides on the bastion's own transport, which discovery also reports on."""
    from sevconsole.hosts.discovery import DiscoveryOptions, discover

    inv = tmp_path / "inv.toml"
    inv.write_text(f"""\
[[host]]
name = "bastion"
address = "127.0.0.1"
port = {sshd.port}
user = "{sshd.user}"
identity = "{sshd.client_key}"

[[host]]
name = "inner"
address = "127.0.0.1"
port = {sshd.port}
user = "{sshd.user}"
identity = "{sshd.client_key}"
jump = "bastion"
""")
    kh = tmp_path / "kh"
    kh.write_text(sshd.known_hosts_line())
    options = DiscoveryOptions(known_hosts=kh, system_known_hosts=(), ssh_config=tmp_path / "none",
                               amd_roots=tmp_path / "none", use_agent=False, query_vms=False)
    with options.pool() as pool:
        reports = discover(load_inventory(inv).hosts, options, pool=pool)
        assert [r.errors for r in reports] == [(), ()] and all(r.reachable for r in reports)
        inner = pool.get(resolve(load_inventory(inv).by_name()["inner"], inventory=load_inventory(inv).by_name()))
        assert inner.via is not None and inner.via.endpoint.name == "bastion"
        assert inner.via is pool.get(resolve(load_inventory(inv).by_name()["bastion"]))  # one transport each


def test_a_lab_folder_with_a_fifo_for_its_inventory_is_refused(tmp_path: Path) -> None:
    import os

    from sevconsole.hosts.labdir import load_lab

    os.mkfifo(tmp_path / "inventory.toml")
    (tmp_path / "known_hosts").write_text("")
    with pytest.raises(InventoryError) as info:
        load_lab(tmp_path)
    assert str(info.value) == f"{tmp_path / 'inventory.toml'}: not a regular file"


def test_shared_storage_folders(tmp_path: Path) -> None:
    text = '[[host]]\nname = "hv-a"\naddress = "10.0.0.1"\nshared_storage = ["/srv/vms/", "/mnt/nfs"]\n'
    (spec,) = parse_inventory(text, tmp_path / "inv.toml").hosts
    assert spec.shared_storage == ("/srv/vms", "/mnt/nfs")
    for bad in ('"srv/vms"', '"/"', '"/srv/../etc"', '"/srv/a,b"', "3"):
        with pytest.raises(InventoryError) as info:
            parse_inventory(f'[[host]]\nname = "a"\naddress = "b"\nshared_storage = [{bad}]\n', tmp_path / "i.toml")
        assert "shared_storage" in str(info.value), bad
