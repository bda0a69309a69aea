"""Shape rules a newcomer relies on (issue 19): no function over 80 lines without a reason written
beside it, and no function-level import of something its module already imports at the top."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "step1x_batch"
MAX_LINES = 80
REASON = "# long:"  # on the line above the def (or its first decorator): why it stays one function


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def long_functions_without_reason(source: str, name: str = "<source>") -> list[str]:
    lines = source.splitlines()
    found = []
    for fn in _functions(ast.parse(source)):
        length = fn.end_lineno - fn.lineno + 1
        first = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
        above = lines[first - 2].strip() if first >= 2 else ""
        if length > MAX_LINES and not above.startswith(REASON):
            found.append(f"{name}:{fn.lineno} {fn.name} ({length} lines)")
    return found


def _modules(node: ast.AST) -> set[str]:
    """The modules an import statement reads (``import a.b`` reads a.b; ``from a import b`` reads a)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
        return {node.module}
    return set()


def repeated_imports(source: str, name: str = "<source>") -> list[str]:
    """Function-level imports from a module the file already imports from at its top."""
    tree = ast.parse(source)
    top = set().union(*(_modules(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))))
    found = []
    for fn in _functions(tree):
        for node in ast.walk(fn):
            again = sorted(_modules(node) & top)
            if again:
                found.append(f"{name}:{node.lineno} {fn.name} imports from {', '.join(again)} again")
    return found


def test_the_rules_see_what_they_should():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    assert long_functions_without_reason(f"def f():\n{body}\n")
    assert not long_functions_without_reason(f"# long: one table, read top to bottom\ndef f():\n{body}\n")
    assert not long_functions_without_reason("def f():\n    return 1\n")
    assert repeated_imports("import json\ndef f():\n    import json\n")
    assert repeated_imports("from a import b\ndef f():\n    from a import b\n")
    assert repeated_imports("from a import b\ndef f():\n    from a import c\n")
    assert not repeated_imports("from a import b\ndef f():\n    from a.d import c\n")
    assert not repeated_imports("def f():\n    import torch\n")


def test_no_long_function_without_a_reason():
    found = [f for p in sorted(PACKAGE.rglob("*.py")) for f in long_functions_without_reason(p.read_text(), str(p.relative_to(PACKAGE)))]
    assert found == []


def test_no_function_level_import_repeats_a_top_level_one():
    found = [f for p in sorted(PACKAGE.rglob("*.py")) for f in repeated_imports(p.read_text(), str(p.relative_to(PACKAGE)))]
    assert found == []
