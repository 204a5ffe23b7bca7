"""`sevconsole certs`: show certificates, verify a platform's chain, import AMD's roots.

Exit codes: 0 done (verify: the whole chain verifies to a trusted root), 1 the chain does not
verify, 2 unreadable or malformed input (one line on stderr saying which file and why).
Heavy imports (cryptography, the sev package) happen inside the handlers, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

PLATFORM_PARTS = ("pdh", "pek", "oca", "cek")
SEV_LEN, CHAIN_LEN = 2084, 6252


class InputError(Exception):
    """Unreadable or malformed input: the message is the one line the operator sees (exit 2)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "certs", help="show, verify and import SEV certificates",
        description="Show SEV and AMD root certificates, verify a platform's chain to a pinned AMD root "
                    "(or to a lab root), and import AMD's ARK/ASK for later verification.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 ok, 1 the chain does not verify, 2 unreadable or malformed input")
    parser.set_defaults(func=lambda args: _usage(parser))
    sub = parser.add_subparsers(title="certs commands", metavar="ACTION")

    show = sub.add_parser("show", help="print the decoded fields of certificate files",
                          description="Print the fields of SEV certificates (2084 bytes), AMD root "
                                      "certificates (ARK/ASK), platform chains (PEK||OCA||CEK) and "
                                      "AMD chains (ASK||ARK).")
    show.add_argument("files", nargs="+", metavar="FILE", type=Path)
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    show.set_defaults(func=_cmd_show)

    verify = sub.add_parser(
        "verify", help="verify a platform's chain (PDH <- PEK <- CEK <- ASK <- ARK, PEK <- OCA)",
        description="Verify every link of a platform's certificate chain and print it as a tree. "
                    "Without --amd-dir, the AMD roots imported with `certs import-amd` are tried "
                    "(the generation is found by trying each ASK against the CEK).",
        epilog="exit codes: 0 the chain verifies to a trusted root, 1 it does not, 2 unreadable or "
               "malformed input")
    source = verify.add_mutually_exclusive_group(required=True)
    source.add_argument("--platform-dir", metavar="DIR", type=Path,
                        help="a folder with pdh.cert, pek.cert, oca.cert, cek.cert")
    source.add_argument("--chain", metavar="FILE", type=Path,
                        help="a platform chain PEK||OCA||CEK (6252 bytes, raw or base64 as QEMU's "
                             "query-sev-capabilities gives it); needs --pdh")
    verify.add_argument("--pdh", metavar="FILE", type=Path, help="the PDH certificate (with --chain)")
    verify.add_argument("--amd-dir", metavar="DIR", type=Path, help="a folder with ark.cert and ask.cert")
    verify.add_argument("--lab-root", metavar="DIR", type=Path,
                        help="trust this lab root (a lab's ark.cert/ask.cert) in addition to AMD's")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(func=_cmd_verify)

    imp = sub.add_parser(
        "import-amd", help="check and store AMD's ARK/ASK of one generation",
        description="Copy DIR/ark.cert and DIR/ask.cert into the console's AMD roots folder, under "
                    "their generation, after checking the ARK against the pinned AMD ARKs and the "
                    "ASK against the ARK.")
    imp.add_argument("dir", metavar="DIR", type=Path)
    imp.set_defaults(func=_cmd_import)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _fail(message: str, as_json: bool = False) -> int:
    from sevconsole.textsafe import escape_controls

    print(f"sevconsole certs: {escape_controls(message)}", file=sys.stderr)
    if as_json:
        print(json.dumps({"ok": False, "error": message}))
    return 2


# ---------------------------------------------------------------------------------------------
# reading


def _read(path: Path) -> bytes:
    """A certificate file: regular files only (a FIFO must not hang us), 64 KiB at most."""
    from sevconsole.boundedio import CERT_LIMIT, BoundedReadError, read_bounded

    try:
        return read_bounded(path, CERT_LIMIT, "certificate")
    except BoundedReadError as exc:
        raise InputError(f"{path}: {exc.reason}") from None


def _parse(parse: Callable[[bytes, str], Any], data: bytes, path: Path) -> Any:
    """Parse with the full path in any error; the parsed certificates are named by file name only."""
    from sevconsole.sev.errors import SevFormatError

    try:
        parsed = parse(data, str(path))
    except SevFormatError as exc:
        raise InputError(str(exc)) from None
    if isinstance(parsed, tuple):
        return parsed
    return dataclasses.replace(parsed, name=path.name)


def _read_sev(path: Path) -> Any:
    from sevconsole.sev.certs import SevCert

    return _parse(SevCert.from_bytes, _read(path), path)


def _read_amd(path: Path) -> Any:
    from sevconsole.sev.certs import AmdCert

    return _parse(AmdCert.from_bytes, _read(path), path)


def _maybe_base64(data: bytes, lengths: tuple[int, ...]) -> bytes:
    """QEMU gives chains base64-encoded; accept such a file as well as raw bytes."""
    if len(data) in lengths:
        return data
    try:
        decoded = base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        return data
    return decoded if len(decoded) in lengths else data


# ---------------------------------------------------------------------------------------------
# show


def _cmd_show(args: argparse.Namespace) -> int:
    status = 0
    shown: list[dict[str, Any]] = []
    for path in args.files:
        try:
            items = _decode_any(path)
        except InputError as exc:
            status = _fail(str(exc))
            continue
        for label, cert in items:
            fields = _fields(cert)
            shown.append({"file": str(path), "part": label, **fields})
            if not args.json:
                _print_fields(f"{path}" + (f" [{label}]" if label else ""), fields)
    if args.json:
        print(json.dumps(shown, indent=2))
    return status


def _decode_any(path: Path) -> list[tuple[str, Any]]:
    from sevconsole.sev.certs import AmdCert, SevCert, split_amd_chain, split_platform_chain

    data = _maybe_base64(_read(path), (SEV_LEN, CHAIN_LEN))
    if len(data) == SEV_LEN:
        return [("", _parse(SevCert.from_bytes, data, path))]
    if len(data) == CHAIN_LEN:
        pek, oca, cek = _parse(split_platform_chain, data, path)
        return [("PEK", pek), ("OCA", oca), ("CEK", cek)]
    if len(data) in (576, 832, 1600):
        return [("", _parse(AmdCert.from_bytes, data, path))]
    if len(data) in (1408, 1664, 3200):  # ASK || ARK (Naples short ARK, Naples, Rome onward)
        ask, ark = _parse(split_amd_chain, data, path)
        return [("ASK", ask), ("ARK", ark)]
    raise InputError(f"{path}: {len(data)} bytes is no SEV certificate (2084), platform chain (6252), "
                     f"AMD root certificate (576, 832, 1600) or AMD chain (1664, 3200)")


def _fields(cert: Any) -> dict[str, Any]:
    from sevconsole.hosts.chains import trust_store
    from sevconsole.sev.certs import AmdCert, Usage, curve_name
    from sevconsole.sev.errors import SevFormatError

    try:
        fingerprint = cert.fingerprint()
    except SevFormatError as exc:
        fingerprint = f"unusable key: {exc.message}"
    if isinstance(cert, AmdCert):
        root, why = trust_store().root_for(cert) if cert.key_usage == Usage.ARK else (None, "")
        return {
            "format": "AMD root certificate", "bytes": len(cert.to_bytes()), "version": cert.version,
            "usage": cert.key_usage.name, "key_id": cert.key_id.hex(),
            "certifying_id": cert.certifying_id.hex() + (" (itself)" if cert.certifying_id == cert.key_id else ""),
            "key": f"RSA-{cert.modulus_bits}, e={int.from_bytes(cert.pubexp, 'little')}",
            "key_sha256": fingerprint,
            "signature": (f"RSA-PSS {cert.hash_algorithm.name.upper().replace('SHA', 'SHA-')}, "
                          f"{len(cert.signature)} bytes") if cert.signature else "none (short encoding)",
            **({"root": f"pinned {root.name}" if root else why} if cert.key_usage == Usage.ARK else {}),
            "lab": cert.is_lab,
        }
    sigs = []
    for slot, sig in enumerate(cert.sigs, 1):
        sigs.append(f"slot {slot}: {sig.usage.name} {sig.algo.name}" if sig.used else f"slot {slot}: unused")
    key = f"{curve_name(cert.curve)} (curve {cert.curve})" if cert.is_ec else cert.algo.name
    return {
        "format": "SEV certificate", "bytes": len(cert.to_bytes()), "version": cert.version,
        "api": f"{cert.api_major}.{cert.api_minor}", "usage": cert.usage.name, "algorithm": cert.algo.name,
        "key": key, "key_sha256": fingerprint, "signatures": sigs,
    }


def _print_fields(title: str, fields: dict[str, Any]) -> None:
    print(title)
    for name, value in fields.items():
        label = name.replace("_", " ")
        if isinstance(value, list):
            for i, item in enumerate(value):
                print(f"  {label if i == 0 else '':<14} {item}")
        else:
            print(f"  {label:<14} {value}")


# ---------------------------------------------------------------------------------------------
# verify


def _load_platform(args: argparse.Namespace) -> dict[str, Any]:
    from sevconsole.sev.certs import split_platform_chain

    if args.platform_dir is not None:
        if not args.platform_dir.is_dir():
            raise InputError(f"{args.platform_dir}: not a folder (it should hold pdh.cert, pek.cert, oca.cert, cek.cert)")
        return {part: _read_sev(args.platform_dir / f"{part}.cert") for part in PLATFORM_PARTS}
    if args.pdh is None:
        raise InputError(f"{args.chain}: a platform chain holds no PDH; give it with --pdh FILE")
    blob = _maybe_base64(_read(args.chain), (CHAIN_LEN,))
    pek, oca, cek = _parse(split_platform_chain, blob, args.chain)
    return {"pdh": _read_sev(args.pdh), "pek": pek, "oca": oca, "cek": cek}


class RootFiles(NamedTuple):
    ask: Any  # AmdCert
    ark: Any
    ask_path: Path
    ark_path: Path

    @property
    def folder(self) -> Path:
        return self.ark_path.parent


def _load_roots(folder: Path) -> RootFiles:
    """ASK and ARK from a folder of ark.cert and ask.cert. A lab's state folder works too: its
    lab-root/ holds lab-ark.cert and lab-ask.cert."""
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (it should hold ark.cert and ask.cert)")
    if (folder / "lab-root").is_dir() and not (folder / "ark.cert").exists():
        folder = folder / "lab-root"

    def find(part: str) -> Path:
        plain, lab = folder / f"{part}.cert", folder / f"lab-{part}.cert"
        return lab if lab.exists() and not plain.exists() else plain

    ask_path, ark_path = find("ask"), find("ark")
    return RootFiles(_read_amd(ask_path), _read_amd(ark_path), ask_path, ark_path)


def _imported_roots() -> list[RootFiles]:
    """Every generation imported with `certs import-amd`; damaged ones are skipped with a warning."""
    from sevconsole import paths

    found = []
    base = paths.amd_roots_dir()
    for folder in sorted(base.iterdir()) if base.is_dir() else []:
        try:
            found.append(_load_roots(folder))
        except InputError as exc:
            print(f"sevconsole certs: skipping imported root {folder.name}: {exc}", file=sys.stderr)
    return found


def _cmd_verify(args: argparse.Namespace) -> int:
    from sevconsole.hosts.chains import trust_store, verify_platform

    if args.pdh is not None and args.chain is None:
        return _fail("--pdh goes with --chain; a --platform-dir holds its own pdh.cert", args.json)
    try:
        platform = _load_platform(args)
        lab = _load_roots(args.lab_root) if args.lab_root is not None else None
        try:
            trust = trust_store(lab.ark if lab is not None else None)
        except ValueError as exc:
            raise InputError(f"{args.lab_root}: {exc}") from None
        hint = ""
        roots: RootFiles | None
        if args.amd_dir is not None:
            roots = _load_roots(args.amd_dir)
        else:
            # The lab root first (when given), then each imported generation: the one whose ASK
            # signed this CEK is the chain's.
            candidates = ([lab] if lab is not None else []) + _imported_roots()
            match = trust.ask_for(platform["cek"], [c.ask for c in candidates])
            roots = next((c for c in candidates if c.ask is match), None) if match is not None else None
            if roots is None:
                hint = ("no imported AMD root signed this CEK: import its generation with "
                        "`sevconsole certs import-amd DIR` or give --amd-dir DIR")
    except InputError as exc:
        return _fail(str(exc), args.json)

    report = verify_platform(**platform, ask=roots.ask if roots else None, ark=roots.ark if roots else None,
                          trust=trust)
    if args.json:
        print(json.dumps({**report.to_dict(), "amd_roots": str(roots.folder) if roots else None,
                          "hint": hint or None}, indent=2))
    else:
        _print_tree(report, platform, roots, _sources(args, roots))
        if hint:
            print(f"hint: {hint}")
    return 0 if report.ok else 1


def _print_tree(report: Any, platform: dict[str, Any], roots: RootFiles | None, sources: dict[str, str]) -> None:
    ask, ark = (roots.ask, roots.ark) if roots else (None, None)
    fancy = _can_print("└✓✗")
    branch, last, pipe = ("├── ", "└── ", "│   ") if fancy else ("|-- ", "`-- ", "|   ")
    mark = {True: "✓" if fancy else "ok", False: "✗" if fancy else "FAIL"}
    links = {link.name: link for link in report.links}

    def link_line(name: str) -> str:
        link = links[name]
        reason = f" [{link.reason.name}]" if link.reason else ""
        return f"{mark[link.ok]} {name}{reason}: {link.detail}"

    def cert_label(usage: str, cert: Any) -> str:
        return f"{usage} {sources.get(usage.lower(), cert.name)}" if cert is not None else f"{usage} (not given)"

    # The trust graph as a tree: each certificate, then the links that certify it.
    tree = (cert_label("ARK", ark), [link_line("ARK self"), (cert_label("ASK", ask), [
        link_line("ARK->ASK"), (cert_label("CEK", platform["cek"]), [
            link_line("ASK->CEK"), (cert_label("PEK", platform["pek"]), [
                link_line("CEK->PEK"), link_line("OCA->PEK"),
                (cert_label("OCA", platform["oca"]), [link_line("OCA self")]),
                (cert_label("PDH", platform["pdh"]), [link_line("PEK->PDH")]),
            ])])])])

    def walk(node: Any, prefix: str, is_last: bool, top: bool) -> None:
        text, children = node if isinstance(node, tuple) else (node, [])
        print(text if top else prefix + (last if is_last else branch) + text)
        inner = "" if top else prefix + ("    " if is_last else pipe)
        for i, child in enumerate(children):
            walk(child, inner, i == len(children) - 1, False)

    walk(tree, "", True, True)
    if report.ok:
        print(f"verified: every link holds and the chain ends in the {_root_words(report.root)}")
    else:
        failed = ", ".join(f"{link.name} ({link.reason.name})" for link in report.failures)
        print(f"NOT verified: {len(report.failures)} of {len(report.links)} links fail: {failed}")


def _sources(args: argparse.Namespace, roots: RootFiles | None) -> dict[str, str]:
    """Where each certificate came from, for the tree's labels."""
    out: dict[str, str] = {}
    if args.platform_dir is not None:
        out.update({part: str(args.platform_dir / f"{part}.cert") for part in PLATFORM_PARTS})
    else:
        out.update({"pdh": str(args.pdh), **{p: f"{args.chain} ({p.upper()})" for p in ("pek", "oca", "cek")}})
    if roots is not None:
        out.update({"ark": str(roots.ark_path), "ask": str(roots.ask_path)})
    return out


def _root_words(root: Any) -> str:
    return f"{root.name} (a lab root, trusted because --lab-root was given)" if root.is_lab else f"pinned {root.name}"


def _can_print(text: str) -> bool:
    try:
        text.encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# import-amd


def _cmd_import(args: argparse.Namespace) -> int:
    from sevconsole import paths
    from sevconsole.hosts.chains import trust_store
    from sevconsole.sev.chain import LinkFailure, check_link

    folder: Path = args.dir
    try:
        ask, ark = _load_roots(folder)[:2]
    except InputError as exc:
        return _fail(str(exc))
    root, why = trust_store().root_for(ark)
    if root is None:
        return _fail(f"refusing to import: {why}")
    own = check_link(ark, ark)
    if not own.ok and own.reason is not LinkFailure.MISSING_SIGNATURE:
        return _fail(f"refusing to import: {folder / 'ark.cert'} fails its self-check: {own.detail}")
    link = check_link(ark, ask)
    if not link.ok:
        return _fail(f"refusing to import: {folder / 'ask.cert'} is not certified by the {root.name}: {link.detail}")
    target = paths.amd_roots_dir() / root.generation
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name, cert in (("ark.cert", ark), ("ask.cert", ask)):
            tmp = target / f".{name}.tmp"
            tmp.write_bytes(cert.to_bytes())
            tmp.replace(target / name)
    except OSError as exc:
        return _fail(f"cannot write {target}: {exc.strerror or exc}")
    print(f"imported the {root.name} and its ASK into {target}")
    return 0
