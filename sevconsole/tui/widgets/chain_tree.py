"""The certificate chain as a Tree: each link's result, then each certificate's ids and keys.

Labels are Rich Text (a str label would be parsed as markup); host-derived words are escaped."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import Tree

from sevconsole.hosts.report import Capabilities
from sevconsole.sev.certs import AmdCert, SevCert, split_amd_chain, split_platform_chain
from sevconsole.sev.errors import SevFormatError
from sevconsole.textsafe import escape_controls
from sevconsole.tui import format as fmt


def certificates(caps: Capabilities) -> tuple[list[tuple[str, SevCert | AmdCert]], list[str]]:
    """The certificates a host gave, by name, and sentences for the parts that did not parse."""
    certs: list[tuple[str, SevCert | AmdCert]] = []
    problems: list[str] = []
    try:
        certs.append(("PDH", SevCert.from_bytes(caps.pdh, "pdh.cert")))
    except SevFormatError as exc:
        problems.append(str(exc))
    try:
        pek, oca, cek = split_platform_chain(caps.cert_chain)
        certs += [("PEK", pek), ("OCA", oca), ("CEK", cek)]
    except SevFormatError as exc:
        problems.append(str(exc))
    if caps.amd_chain:
        try:
            ask, ark = split_amd_chain(caps.amd_chain)
            certs += [("ASK", ask), ("ARK", ark)]
        except SevFormatError as exc:
            problems.append(str(exc))
    return certs, problems


def cert_label(name: str, cert: SevCert | AmdCert) -> Text:
    label = Text.assemble((f"{name:<4}", "bold"), " ")
    try:
        fp = fmt.fingerprint(cert.fingerprint())
    except Exception as exc:  # a key that does not load still shows the rest
        fp = escape_controls(f"key unusable: {exc}")
    if isinstance(cert, AmdCert):
        label.append(f"key id {cert.key_id.hex()}  {cert.modulus_bits}-bit RSA  sha256 {fp}")
    else:
        label.append(f"API {cert.api_major}.{cert.api_minor}  sha256 {fp}")
    return label


def fill_chain_tree(tree: Tree[Any], caps: Capabilities | None) -> None:
    tree.clear()
    root = tree.root
    root.expand()
    if caps is None:
        tree.root.set_label("no SEV capabilities reported")
        return
    report = caps.chain_report
    if report is None:
        why = escape_controls(caps.chain_error or "no AMD chain")
        tree.root.set_label(Text(f"chain not checked: {why}", style="yellow"))
    elif report.ok:
        name = report.root.name if report.root else "?"
        tree.root.set_label(Text.assemble(("✓ chain verified", "bold green"), f" to {escape_controls(name)}"))
    else:
        tree.root.set_label(Text(f"✗ chain broken: {len(report.failures)} link(s) fail", style="bold red"))
    if report is not None:
        links = root.add("links", expand=True)
        for link in report.links:
            mark = ("✓", "green") if link.ok else ("✗", "red")
            why = "" if link.ok or link.reason is None else f" [{link.reason.value}]"
            links.add_leaf(Text.assemble(mark, f" {link.name}{why}: ", (escape_controls(link.detail), "dim")))
    certs, problems = certificates(caps)
    node = root.add("certificates", expand=True)
    for name, cert in certs:
        node.add_leaf(cert_label(name, cert))
    for problem in problems:
        node.add_leaf(Text(escape_controls(problem), style="red"))
