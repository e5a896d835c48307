"""Layer rules of DESIGN.md §3: engine/, runtime/ (and bake/, the standalone runner/ and the quality lab/) never import gradio,
the host's `modules`, the webui adapters, or the test-only reference libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lib_deltasampling"
HOST_FREE = ["runtime", "engine", "bake", "runner", "lab"]
# Top-level modules a host-free file must never import.
FORBIDDEN = {"gradio", "modules", "diffusers", "transformers", "open_clip", "ldm", "sgm", "k_diffusion",
             "backend", "ldm_patched", "comfy", "regex", "einops", "yaml"}
# The only relative imports allowed out of a host-free layer: errors, and layers below it.
# ("" is the package root, which holds only the version string.)
ALLOWED_RELATIVE = {"runtime": {"", "errors", "runtime"}, "engine": {"", "errors", "runtime", "engine"},
                    "bake": {"", "errors", "runtime", "engine", "bake"},
                    "runner": {"", "errors", "runtime", "engine", "bake", "runner"},
                    "lab": {"", "errors", "runtime", "engine", "runner", "lab"}}


def _imports(path: Path, layer: str) -> list[tuple[int, str]]:
    """(line, absolute-ish module name) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel_parts = path.relative_to(PACKAGE).parts[:-1]  # e.g. ("runtime", "text")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel_parts[: len(rel_parts) - (node.level - 1)]) if node.level - 1 <= len(rel_parts) else None
                if base is None:
                    found.append((node.lineno, "<beyond the package>"))
                    continue
                target = ".".join(["lib_deltasampling", *base] + ([node.module] if node.module else []))
                found.append((node.lineno, target))
            else:
                found.append((node.lineno, node.module or ""))
    return found


def _host_free_files() -> list[tuple[str, Path]]:
    return [(layer, p) for layer in HOST_FREE if (PACKAGE / layer).is_dir()
            for p in sorted((PACKAGE / layer).rglob("*.py"))]


def test_there_are_host_free_files_to_check():
    assert any(layer == "runtime" for layer, _ in _host_free_files())


@pytest.mark.parametrize("layer, path", _host_free_files(), ids=lambda v: str(v) if isinstance(v, str) else v.name)
def test_host_free_layers_import_only_allowed_modules(layer: str, path: Path):
    bad = []
    for line, name in _imports(path, layer):
        top = name.split(".")[0]
        if top in FORBIDDEN or name == "<beyond the package>":
            bad.append(f"line {line}: {name}")
        elif top == "lib_deltasampling":
            sub = name.split(".")[1] if name.count(".") else ""
            if sub not in ALLOWED_RELATIVE[layer]:
                bad.append(f"line {line}: {name} (a {layer}/ file may only use {sorted(ALLOWED_RELATIVE[layer])})")
    assert not bad, f"{path.relative_to(ROOT)} imports what its layer must not: {bad}"


def test_the_checker_catches_a_forbidden_import(tmp_path: Path, monkeypatch):
    """The rule above must be able to fail: a planted file with `import gradio` is caught."""
    fake_pkg = tmp_path / "lib_deltasampling" / "runtime"
    fake_pkg.mkdir(parents=True)
    planted = fake_pkg / "planted.py"
    planted.write_text("import torch\nfrom modules import shared\nfrom ...webui import ui\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "lib_deltasampling")
    names = [n for _, n in _imports(planted, "runtime")]
    assert "modules" in names and "<beyond the package>" in names


def test_importing_the_package_loads_no_heavy_module():
    """The WebUI imports the extension at start-up; torch/safetensors must wait until a generation needs them."""
    code = ("import sys, lib_deltasampling, lib_deltasampling.errors; "
            "heavy = [m for m in ('torch', 'safetensors', 'numpy', 'gradio') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
