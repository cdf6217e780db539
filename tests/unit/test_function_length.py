"""No function in src/ is over 60 lines unless its def line says why (`# long: <reason>`), issue 14."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "bencher_runner"
MAX_LINES = 60
MARK = "# long:"


def long_functions(root: Path = SRC) -> list[tuple[str, int, bool]]:
    """(``path:line name``, length, has a reason) of every function over MAX_LINES lines under ``root``.

    The length runs from the ``def`` line to the last line (decorators, such as click's options, are
    declarations and do not count); the reason may sit on any line of the signature."""
    found = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            assert node.end_lineno is not None
            length = node.end_lineno - node.lineno + 1
            if length <= MAX_LINES:
                continue
            signature = lines[node.lineno - 1 : node.body[0].lineno - 1]
            reason = any(MARK in line and line.split(MARK, 1)[1].strip() for line in signature)
            found.append((f"{path.relative_to(root.parent)}:{node.lineno} {node.name}", length, reason))
    return found


def test_every_function_over_60_lines_gives_its_reason() -> None:
    unexplained = [f"{where} ({length} lines)" for where, length, reason in long_functions() if not reason]
    assert not unexplained, f"split these or add `{MARK} <reason>` to the def line: {unexplained}"


def test_the_checker_finds_a_long_function_and_accepts_a_reason(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES))
    (tmp_path / "a.py").write_text(f"def short():\n    pass\n\n\ndef too_long():\n{body}")
    (tmp_path / "b.py").write_text(f"async def explained():  {MARK} a table\n{body}")
    (tmp_path / "d.py").write_text(
        "".join(f"@d{i}\n" for i in range(MAX_LINES)) + "def decorated():\n    pass\n"
    )
    (tmp_path / "c.py").write_text(f"def bare_mark():  {MARK}\n{body}")
    found = {where.split()[-1]: reason for where, _, reason in long_functions(tmp_path)}
    assert found == {"too_long": False, "explained": True, "bare_mark": False}


if __name__ == "__main__":
    for where, length, reason in sorted(long_functions(), key=lambda f: -f[1]):
        print(f"{length:4} {'reason' if reason else '-':6} {where}")
