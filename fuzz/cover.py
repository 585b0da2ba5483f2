"""One target's corpus replayed under coverage.py: `python -m fuzz.cover TARGET DIR...` prints, as JSON, the
line coverage of each greupd module the target reads, and how many inputs still crash.

A process of its own, without atheris: coverage starts before greupd is imported, so a module's own lines
(definitions) count as they do in any coverage run, and libFuzzer's instrumentation does not get in the way.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import coverage

REPO = Path(__file__).resolve().parent.parent


def replay(target_name: str, folders: list[Path]) -> dict[str, object]:
    from fuzz.targets import TARGETS

    target = TARGETS[target_name]
    files = sorted({p for folder in folders if folder.is_dir() for p in folder.iterdir() if p.is_file()
                    and not p.name.endswith(".txt")})
    crashing = 0
    for file in files:
        try:
            target.run(file.read_bytes())
        except Exception:
            crashing += 1
    return {"inputs": len(files), "crashing": crashing}


def files_of(module: str) -> list[Path]:
    """A module's file, or a package's files: greupd/config.py may become the package greupd/config/."""
    path = REPO / module
    if path.is_file():
        return [path]
    return sorted(path.with_suffix("").glob("*.py"))


def function_lines(file: Path, names: tuple[str, ...]) -> set[int]:
    """The lines of the functions `names` (qualified: "Class.method") defined in `file`."""
    found: set[int] = set()

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if name in names and not isinstance(child, ast.ClassDef):
                    found.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
                visit(child, name + ".")

    visit(ast.parse(file.read_text()), "")
    return found


def main() -> None:
    target_name, folders = sys.argv[1], [Path(a) for a in sys.argv[2:]]
    from fuzz.targets import TARGETS

    modules = {m: files_of(m) for m in TARGETS[target_name].modules}
    cov = coverage.Coverage(data_file=None, include=[str(f) for files in modules.values() for f in files],
                            branch=False)
    cov.start()
    result = replay(target_name, folders)
    cov.stop()
    lines: dict[str, list[int]] = {}
    path_covered = path_total = 0
    functions = TARGETS[target_name].functions
    for module, files in modules.items():
        covered = total = 0
        for file in files:
            _, statements, _, missing, _ = cov.analysis2(str(file))
            covered, total = covered + len(statements) - len(missing), total + len(statements)
            if functions:
                on_path = function_lines(file, functions) & set(statements)
                path_covered += len(on_path - set(missing))
                path_total += len(on_path)
        lines[module if len(files) == 1 else module.removesuffix(".py") + "/"] = [covered, total]
    result["lines"] = lines
    if functions:
        result["path"] = [path_covered, path_total]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
