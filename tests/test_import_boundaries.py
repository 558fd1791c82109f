"""What the test code may import: the library and the tests' own helpers, never the benchmarks.

Benchmarks may reuse the tests' shared setup (``tests/distributed/fsdp2_setup.py``), not the other way round, so a
benchmark can change without breaking tests it is not part of. ``tests/benchmarks`` tests the benchmark scripts
themselves and is exempt.
"""
import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
EXEMPT = TESTS / "benchmarks"


def imported_top_level_packages(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_no_test_or_helper_imports_benchmarks():
    files = [path for path in TESTS.rglob("*.py") if EXEMPT not in path.parents]
    assert TESTS / "helpers.py" in files and TESTS / "distributed" / "fsdp2_setup.py" in files
    offenders = sorted(str(path.relative_to(TESTS)) for path in files
                       if "benchmarks" in imported_top_level_packages(path))
    assert not offenders, f"these import benchmarks: {offenders}"
