"""No module of src/ imports another module's private (``_``-prefixed) names (issue 14: pull.py took
five of layout.py's): what is shared is public, with a docstring."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def private_imports(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bencher_runner"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.module}.{alias.name}")
    return found


def test_no_module_imports_a_private_name_of_another() -> None:
    assert private_imports(SRC) == []


def test_the_check_finds_one(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("from bencher_runner.oci.layout import _parse, __version__, open_layout\n")
    assert private_imports(tmp_path) == ["m.py:1 bencher_runner.oci.layout._parse"]
