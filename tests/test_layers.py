"""The import rules of the design: layers only point down, and the lab is another machine."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "sevconsole"

# package -> prefixes it must never import
FORBIDDEN = {
    "sev": ("sevconsole.", "textual", "paramiko", "qemu"),
    "hosts": ("textual", "sevconsole.tui", "sevconsole.lab", "sevconsole.engine"),
    "engine": ("textual", "sevconsole.tui", "sevconsole.lab"),
    "tui": ("sevconsole.lab",),
    "commands": ("sevconsole.lab", "sevconsole.tui"),
}
SEV_ALLOWED_SELF = "sevconsole.sev"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def _violations(layer: str) -> list[str]:
    bad = []
    for path in sorted((PKG / layer).rglob("*.py")):
        for lineno, name in _imports(path):
            if layer == "sev" and name.startswith(SEV_ALLOWED_SELF):
                continue
            for prefix in FORBIDDEN[layer]:
                if name == prefix.rstrip(".") or name.startswith(prefix):
                    bad.append(f"{path.relative_to(PKG.parent)}:{lineno} imports {name}")
    return bad


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports(layer: str) -> None:
    assert _violations(layer) == []


def test_lab_only_imported_by_cli_and_itself() -> None:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "lab" or rel == Path("cli.py"):
            continue
        bad += [f"{rel}:{n} imports {name}" for n, name in _imports(path) if name.startswith("sevconsole.lab")]
    assert bad == []


def test_checker_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import textual\nfrom sevconsole.tui import app\n")
    names = [name for _, name in _imports_any(bad)]
    assert "textual" in names and "sevconsole.tui" in names


def _imports_any(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    return [(n.lineno, a.name) for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names] + [
        (n.lineno, n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
    ]


def test_engine_and_hosts_load_without_textual() -> None:
    """At run time too: importing every engine/hosts module pulls in no Textual."""
    modules = [
        ".".join(p.relative_to(PKG.parent).with_suffix("").parts)
        for layer in ("engine", "hosts", "sev")
        for p in sorted((PKG / layer).rglob("*.py"))
    ]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m.removesuffix('.__init__'))\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'textual' or m.startswith(('sevconsole.tui', 'sevconsole.lab'))]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_test_doubles_ship_in_the_package() -> None:
    """Scripted backends, local hosts and other doubles live in tests/: the package is the product."""
    doubles = [p for p in PKG.rglob("*.py") if p.stem in ("local", "scripted", "fake", "fakes", "mock", "mocks",
                                                           "stub", "stubs", "testing")]
    assert doubles == []
    for path in sorted(PKG.rglob("*.py")):
        for lineno, name in _imports(path):
            assert not (name == "tests" or name.startswith("tests.")), \
                f"{path.relative_to(PKG.parent)}:{lineno} imports {name}"
