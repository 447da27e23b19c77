"""The shape of the code: one package root, the README's layout table, one role per file, torch-free runtime."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import mla_edge

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("mla_edge", "models", "models/recipes", "export", "runtime")
HEAVY = {"torch", "onnx", "onnxscript", "transformers", "safetensors", "tqdm"}
TORCH_MODULES = (
    "mla_edge.export",
    "mla_edge.models.mla",
    "mla_edge.models.rope",
    "mla_edge.models.checkpoint",
    "mla_edge.models.recipes",
)


def package_files() -> list[Path]:
    return sorted(p for d in PACKAGE_FOLDERS for p in (ROOT / d).glob("*.py"))


def imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions, with relative imports made absolute."""
    parts = path.parent.relative_to(ROOT).parts
    package = "mla_edge" if parts == ("mla_edge",) else ".".join(("mla_edge", *parts))
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = ".".join(x for x in (base, node.module or "") if x)
            found |= {mod} | {f"{mod}.{a.name}" for a in node.names}
    return found


def test_the_package_root_is_real_and_its_subpackages_are_the_top_level_folders():
    assert Path(mla_edge.__file__).parent == ROOT / "mla_edge"
    for name in ("models", "export", "runtime"):
        assert (ROOT / "mla_edge" / name).resolve() == ROOT / name
    import mla_edge.runtime.generate as g

    assert Path(g.__file__).resolve() == ROOT / "runtime" / "generate.py"


def test_readme_layout_table_matches_the_tree():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = {f for f in re.findall(r"`([\w/]+\.py)`", table) if not f.startswith("test_")}
    on_disk = {p.name for p in package_files() if p.name != "__init__.py"}
    assert listed == on_disk, f"README lists {sorted(listed - on_disk)} not on disk; misses {sorted(on_disk - listed)}"


def test_every_file_says_its_one_role_on_its_first_line():
    for p in package_files():
        first = p.read_text().splitlines()[0]
        assert first.startswith('"""') and len(first) > 30, f"{p.relative_to(ROOT)}: first line is {first!r}"
        assert len(p.read_text().splitlines()) <= 600, f"{p.relative_to(ROOT)} is past 600 lines: split it"


def test_runtime_never_imports_torch_or_a_torch_module():
    for p in sorted((ROOT / "runtime").glob("*.py")):
        bad = {m for m in imports(p) if m.split(".")[0] in HEAVY or m.startswith(TORCH_MODULES)}
        assert not bad, f"runtime/{p.name} imports {sorted(bad)}"
    for p in (ROOT / "mla_edge" / "contract.py", ROOT / "models" / "config.py", ROOT / "models" / "__init__.py"):
        assert not {m for m in imports(p) if m.split(".")[0] in HEAVY | {"numpy", "onnxruntime"}}, p.name


def test_no_module_is_named_by_a_string_outside_the_cli():
    """Imports are import statements: no importlib by name, no `python -m mla_edge.export...` strings."""
    for p in package_files():
        if p == ROOT / "mla_edge" / "cli.py":
            continue
        tree = ast.parse(p.read_text())
        strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        named = [s for s in strings if re.fullmatch(r"mla_edge\.(export|models)(\.\w+)*", s)]
        assert not named, f"{p.relative_to(ROOT)} names modules by string: {named}"
        assert "importlib.import_module" not in p.read_text(), p.relative_to(ROOT)


def test_importing_the_package_and_its_runtime_loads_no_torch():
    code = (
        "import sys, mla_edge, mla_edge.cli, mla_edge.runtime.generate, mla_edge.runtime.bench, "
        "mla_edge.runtime.budget\n"
        "mla_edge.Generator, mla_edge.Manifest, mla_edge.CacheContract, mla_edge.MLAConfig\n"
        "assert not {'torch', 'onnx', 'transformers'} & set(sys.modules), sorted(sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_public_api_resolves():
    for name in mla_edge.__all__:
        assert getattr(mla_edge, name) is not None, name
