"""`sevconsole certs show | verify | import-amd` on the real AMD certificates and on a lab chain."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sevconsole.cli import main
from sevconsole.sev.certs import (
    Algo,
    SevCert,
    Usage,
    generate_lab_root,
    join_platform_chain,
    sign_sev_cert,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Imported AMD roots go to a folder of this test, never the user's."""
    folder = tmp_path / "data"
    monkeypatch.setenv("SEVCONSOLE_DATA_DIR", str(folder))
    return folder


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main(["certs", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_commands_module_imports_nothing_heavy() -> None:
    code = ("import sys, sevconsole.commands.certs as m\n"
            "heavy = [n for n in sys.modules if n.split('.')[0] in ('cryptography', 'textual', 'paramiko', 'numpy')"
            " or n.startswith('sevconsole.sev')]\n"
            "print(heavy); sys.exit(1 if heavy else 0)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("gen", ["naples", "rome"])
def test_verify_platform_dir_with_its_amd_dir(sev_certs: Path, capsys, gen: str) -> None:
    code, out, err = run(capsys, "verify", "--platform-dir", sev_certs / "platforms" / gen,
                         "--amd-dir", sev_certs / "amd" / gen)
    assert code == 0, out + err
    for link in ("ARK self", "ARK->ASK", "ASK->CEK", "CEK->PEK", "OCA self", "OCA->PEK", "PEK->PDH"):
        assert f"✓ {link}:" in out or f"ok {link}:" in out
    assert out.rstrip().splitlines()[-1] == f"verified: every link holds and the chain ends in the pinned AMD {gen.capitalize()} ARK"


def test_verify_under_another_generation_names_the_link(sev_certs: Path, capsys) -> None:
    code, out, _ = run(capsys, "verify", "--platform-dir", sev_certs / "platforms/naples",
                       "--amd-dir", sev_certs / "amd/rome")
    assert code == 1
    assert "ASK->CEK [BAD_SIGNATURE]" in out
    assert out.rstrip().splitlines()[-1] == "NOT verified: 1 of 7 links fail: ASK->CEK (BAD_SIGNATURE)"


def test_verify_json(sev_certs: Path, capsys) -> None:
    code, out, _ = run(capsys, "verify", "--json", "--platform-dir", sev_certs / "platforms/rome",
                       "--amd-dir", sev_certs / "amd/milan")
    assert code == 1
    data = json.loads(out)
    assert data["ok"] is False and data["root"]["generation"] == "milan"
    assert [(link["name"], link["reason"]) for link in data["links"] if not link["ok"]] == [("ASK->CEK", "BAD_SIGNATURE")]


def test_import_then_verify_finds_the_generation(sev_certs: Path, capsys, data_dir: Path) -> None:
    code, out, err = run(capsys, "verify", "--platform-dir", sev_certs / "platforms/rome")
    assert code == 1 and "certs import-amd" in out and "UNTRUSTED_ROOT" in out
    for gen in ("naples", "milan", "rome"):
        code, out, err = run(capsys, "import-amd", sev_certs / "amd" / gen)
        assert code == 0, err
        assert f"AMD {gen.capitalize()} ARK" in out
        assert (data_dir / "amd" / gen / "ark.cert").read_bytes() == (sev_certs / "amd" / gen / "ark.cert").read_bytes()
        assert (data_dir / "amd" / gen / "ask.cert").read_bytes() == (sev_certs / "amd" / gen / "ask.cert").read_bytes()
    for gen in ("naples", "rome"):
        code, out, err = run(capsys, "verify", "--json", "--platform-dir", sev_certs / "platforms" / gen)
        data = json.loads(out)
        assert code == 0 and data["ok"] and data["root"]["generation"] == gen, out + err
        assert data["amd_roots"].endswith(gen)


def test_import_refuses_what_does_not_check(sev_certs: Path, capsys, tmp_path: Path, data_dir: Path) -> None:
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "ark.cert").write_bytes((sev_certs / "amd/rome/ark.cert").read_bytes())
    (mixed / "ask.cert").write_bytes((sev_certs / "amd/milan/ask.cert").read_bytes())
    code, _, err = run(capsys, "import-amd", mixed)
    assert code == 2 and "is not certified by the AMD Rome ARK" in err and len(err.strip().splitlines()) == 1
    lab = generate_lab_root()
    (mixed / "ark.cert").write_bytes(lab.ark.to_bytes())
    (mixed / "ask.cert").write_bytes(lab.ask.to_bytes())
    code, _, err = run(capsys, "import-amd", mixed)
    assert code == 2 and "lab root" in err
    code, _, err = run(capsys, "import-amd", tmp_path / "nowhere")
    assert code == 2 and "not a folder" in err
    assert not (data_dir / "amd").exists()


def test_import_short_naples_ark(sev_certs: Path, capsys, tmp_path: Path, data_dir: Path) -> None:
    folder = tmp_path / "short"
    folder.mkdir()
    (folder / "ark.cert").write_bytes((sev_certs / "amd/naples/ark-short-encoding.cert").read_bytes())
    (folder / "ask.cert").write_bytes((sev_certs / "amd/naples/ask.cert").read_bytes())
    code, out, err = run(capsys, "import-amd", folder)
    assert code == 0, err
    code, out, _ = run(capsys, "verify", "--platform-dir", sev_certs / "platforms/naples")
    assert code == 0 and "no signature" in out and "pinned key alone" in out


def test_malformed_and_unreadable_inputs_exit_2_with_one_line(sev_certs: Path, capsys, tmp_path: Path) -> None:
    platform = tmp_path / "platform"
    platform.mkdir()
    for part in ("pdh", "pek", "oca", "cek"):
        (platform / f"{part}.cert").write_bytes((sev_certs / "platforms/rome" / f"{part}.cert").read_bytes())
    bad = bytearray((platform / "oca.cert").read_bytes())
    bad[0x418] = 0x77  # the signature algorithm of slot 1
    (platform / "oca.cert").write_bytes(bytes(bad))
    code, out, err = run(capsys, "verify", "--platform-dir", platform, "--amd-dir", sev_certs / "amd/rome")
    assert code == 2 and out == ""
    assert err.strip() == f"sevconsole certs: {platform / 'oca.cert'}: byte 0x418: signature algorithm 0x77 is not a known algo"
    (platform / "oca.cert").unlink()
    code, _, err = run(capsys, "verify", "--platform-dir", platform, "--amd-dir", sev_certs / "amd/rome")
    assert code == 2 and "oca.cert: no such file" in err and len(err.strip().splitlines()) == 1
    code, out, err = run(capsys, "verify", "--json", "--platform-dir", platform)
    assert code == 2 and "no such file" in json.loads(out)["error"]
    code, _, err = run(capsys, "verify", "--chain", sev_certs / "platforms/rome/pek.cert",
                       "--pdh", sev_certs / "platforms/rome/pdh.cert")
    assert code == 2 and "6252 bytes" in err
    code, _, err = run(capsys, "show", sev_certs / "README.md")
    assert code == 2 and "README.md" in err


def test_verify_chain_file_raw_and_base64(sev_certs: Path, capsys, tmp_path: Path) -> None:
    rome = sev_certs / "platforms/rome"
    blob = b"".join((rome / f"{p}.cert").read_bytes() for p in ("pek", "oca", "cek"))
    (tmp_path / "chain.bin").write_bytes(blob)
    (tmp_path / "chain.b64").write_bytes(base64.b64encode(blob) + b"\n")
    for name in ("chain.bin", "chain.b64"):
        code, out, err = run(capsys, "verify", "--chain", tmp_path / name, "--pdh", rome / "pdh.cert",
                             "--amd-dir", sev_certs / "amd/rome")
        assert code == 0, out + err
    code, _, err = run(capsys, "verify", "--chain", tmp_path / "chain.bin")
    assert code == 2 and "--pdh" in err


def _lab_platform(tmp_path: Path) -> tuple[Path, Path]:
    lab = generate_lab_root()
    keys = {n: ec.generate_private_key(ec.SECP384R1()) for n in ("cek", "oca", "pek", "pdh")}

    def build(name: str, usage: Usage, algo: Algo = Algo.ECDSA_SHA256) -> SevCert:
        return SevCert.build(keys[name].public_key(), usage, algo, 1, 55)

    certs = {
        "cek": sign_sev_cert(build("cek", Usage.CEK), lab.ask_key, Usage.ASK, 0),
        "oca": sign_sev_cert(build("oca", Usage.OCA), keys["oca"], Usage.OCA, 0),
        "pek": sign_sev_cert(sign_sev_cert(build("pek", Usage.PEK), keys["oca"], Usage.OCA, 0),
                             keys["cek"], Usage.CEK, 1),
        "pdh": sign_sev_cert(build("pdh", Usage.PDH, Algo.ECDH_SHA256), keys["pek"], Usage.PEK, 0),
    }
    platform, root = tmp_path / "lab-host", tmp_path / "lab-root"
    platform.mkdir()
    root.mkdir()
    for name, cert in certs.items():
        (platform / f"{name}.cert").write_bytes(cert.to_bytes())
    (root / "ark.cert").write_bytes(lab.ark.to_bytes())
    (root / "ask.cert").write_bytes(lab.ask.to_bytes())
    assert len(join_platform_chain(certs["pek"], certs["oca"], certs["cek"])) == 6252
    return platform, root


def test_lab_chain_verifies_only_with_lab_root(capsys, tmp_path: Path) -> None:
    platform, root = _lab_platform(tmp_path)
    code, out, err = run(capsys, "verify", "--platform-dir", platform, "--lab-root", root)
    assert code == 0, out + err
    assert "a lab root, trusted because --lab-root was given" in out.splitlines()[-1]
    code, out, _ = run(capsys, "verify", "--json", "--platform-dir", platform, "--lab-root", root)
    data = json.loads(out)
    assert data["root"]["generation"] == "LAB" and data["root"]["is_lab"] is True
    # Given as if it were AMD's: the chain checks, but the root is not trusted.
    code, out, _ = run(capsys, "verify", "--platform-dir", platform, "--amd-dir", root)
    assert code == 1 and "ARK self [UNTRUSTED_ROOT]" in out and "lab root" in out


def test_lab_root_from_a_lab_state_folder(capsys, tmp_path: Path) -> None:
    """The lab keeps its root as lab-root/lab-ark.cert and lab-ask.cert in its state folder."""
    platform, root = _lab_platform(tmp_path)
    state = tmp_path / "state"
    (state / "lab-root").mkdir(parents=True)
    for part in ("ark", "ask"):
        (state / "lab-root" / f"lab-{part}.cert").write_bytes((root / f"{part}.cert").read_bytes())
    for given in (state, state / "lab-root"):
        code, out, err = run(capsys, "verify", "--platform-dir", platform, "--lab-root", given)
        assert code == 0, out + err
        assert f"ARK {state / 'lab-root' / 'lab-ark.cert'}" in out.splitlines()[0]


def test_lab_root_must_be_a_lab_root(sev_certs: Path, capsys) -> None:
    code, _, err = run(capsys, "verify", "--platform-dir", sev_certs / "platforms/rome",
                       "--lab-root", sev_certs / "amd/rome")
    assert code == 2 and "not a lab root ARK" in err


def test_show_decodes_every_kind(sev_certs: Path, capsys, tmp_path: Path) -> None:
    rome = sev_certs / "platforms/rome"
    chain = tmp_path / "chain.bin"
    chain.write_bytes(b"".join((rome / f"{p}.cert").read_bytes() for p in ("pek", "oca", "cek")))
    amd_chain = tmp_path / "amd.bin"
    amd_chain.write_bytes((sev_certs / "amd/rome/ask.cert").read_bytes() + (sev_certs / "amd/rome/ark.cert").read_bytes())
    code, out, err = run(capsys, "show", rome / "pek.cert", sev_certs / "amd/naples/ark-short-encoding.cert",
                         chain, amd_chain)
    assert code == 0, err
    assert "slot 1: OCA ECDSA_SHA256" in out and "slot 2: CEK ECDSA_SHA256" in out
    assert "none (short encoding)" in out and "pinned AMD Naples ARK" in out
    assert f"{chain} [OCA]" in out and f"{amd_chain} [ARK]" in out
    code, out, _ = run(capsys, "show", "--json", rome / "pdh.cert", sev_certs / "amd/turin/ark.cert")
    items = json.loads(out)
    assert items[0]["usage"] == "PDH" and items[0]["api"] == "0.22" and items[0]["algorithm"] == "ECDH_SHA256"
    assert items[1]["key_id"] == "d05c3a8bde484904b49552422ceb3942" and items[1]["root"] == "pinned AMD Turin ARK"
    assert items[1]["signature"] == "RSA-PSS SHA-384, 512 bytes"


def test_show_reports_bad_files_and_still_shows_good_ones(sev_certs: Path, capsys, tmp_path: Path) -> None:
    truncated = tmp_path / "cut.cert"
    truncated.write_bytes((sev_certs / "platforms/rome/pdh.cert").read_bytes()[:2000])
    code, out, err = run(capsys, "show", truncated, sev_certs / "platforms/rome/pdh.cert")
    assert code == 2 and "usage          PDH" in out
    assert err.strip().splitlines() == [f"sevconsole certs: {truncated}: 2000 bytes is no SEV certificate (2084), "
                                        "platform chain (6252), AMD root certificate (576, 832, 1600) or AMD chain (1664, 3200)"]


def test_verify_end_to_end_in_a_subprocess(sev_certs: Path, data_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sevconsole", "certs", "verify", "--platform-dir", str(sev_certs / "platforms/rome"),
         "--amd-dir", str(sev_certs / "amd/rome")], capture_output=True, text=True, cwd=ROOT,
        env={"SEVCONSOLE_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin", "LANG": "C"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verified: every link holds" in result.stdout


def test_devices_fifos_and_huge_files_are_refused_at_once(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "fifo.cert"
    os.mkfifo(fifo)  # nobody writes to it: a plain open would wait forever
    huge = tmp_path / "huge.cert"
    huge.write_bytes(b"\0" * (1024 * 1024))
    expected = {"/dev/zero": "a device, not a regular file", str(fifo): "a FIFO (named pipe), not a regular file",
                str(huge): "1 MiB, more than the 64 KiB", str(tmp_path): "a folder, not a regular file"}
    for path, words in expected.items():
        result = subprocess.run([sys.executable, "-m", "sevconsole", "certs", "show", path], capture_output=True,
                                text=True, cwd=ROOT, timeout=30, env={"PATH": "/usr/bin:/bin", "LANG": "C",
                                                                      "SEVCONSOLE_DATA_DIR": str(tmp_path / "d")})
        assert result.returncode == 2 and result.stdout == "", (path, result.stderr)
        assert result.stderr.startswith(f"sevconsole certs: {path}: ") and words in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
