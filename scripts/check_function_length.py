"""Functions longer than a limit, for `make lint`.

  python -m scripts.check_function_length [--max-lines 120] PATH...

Each PATH is a Python file or a folder searched for them (hidden folders and __pycache__ left out).
Files under a `dags/` folder are skipped: a DAG's body is its graph, read as a whole. A function's
length runs from its `def` line to its last line (docstring, comments and nested functions included,
decorators not), and each function is measured, methods and nested ones too. Prints
`path:line name N lines` for each one over the limit and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path

DEFAULT_MAX_LINES = 120
SKIPPED_FOLDERS = {"dags", "__pycache__"}

Function = ast.FunctionDef | ast.AsyncFunctionDef


def python_files(paths: list[Path]) -> Iterator[Path]:
    """The .py files the paths name or hold, in order, without those under a skipped folder."""
    for path in paths:
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            parts = file.parts[:-1]
            if not any(part in SKIPPED_FOLDERS or (part.startswith(".") and part not in (".", "..")) for part in parts):
                yield file


def functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, Function]]:
    """(qualified name, node) of every function in the tree: Class.method, outer.inner."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield prefix + node.name, node
            yield from functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, f"{prefix}{node.name}.")
        else:
            yield from functions(node, prefix)


def long_functions(path: Path, max_lines: int) -> list[tuple[int, str, int]]:
    """(line, name, length) of each function in the file longer than `max_lines`."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    found = []
    for name, node in functions(tree):
        length = (node.end_lineno or node.lineno) - node.lineno + 1
        if length > max_lines:
            found.append((node.lineno, name, length))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("paths", nargs="+", type=Path, help="Python files, or folders searched for them")
    parser.add_argument("--max-lines", type=int, default=DEFAULT_MAX_LINES, help="the longest a function may be")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        parser.error(f"no such file or folder: {', '.join(missing)}")
    over = 0
    for path in python_files(args.paths):
        for line, name, length in long_functions(path, args.max_lines):
            print(f"{path}:{line} {name} {length} lines")
            over += 1
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
