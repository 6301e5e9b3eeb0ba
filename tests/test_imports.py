"""Import rules, read from the source: no test module imports another (shared fixtures live in
conftest.py, shared helpers in helpers.py)."""

import ast
import glob
import os

from tests.helpers import REPO


def _imported_modules(path: str) -> list[tuple[int, str]]:
  """(line, dotted module) of every import in the file, at any depth (imports inside functions too)."""
  package = os.path.dirname(os.path.relpath(path, REPO)).split(os.sep)
  found = []
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      found.extend((node.lineno, alias.name) for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      # `from pkg import name` may import the module pkg.name: count both.
      base = package[: len(package) - node.level + 1] if node.level else []  # Relative: from this package.
      module = ".".join(base + ([node.module] if node.module else []))
      if node.module:
        found.append((node.lineno, module))
      found.extend((node.lineno, f"{module}.{alias.name}" if module else alias.name) for alias in node.names)
  return found


def test_no_test_module_imports_another():
  test_modules = {os.path.basename(p)[: -len(".py")] for p in glob.glob(os.path.join(REPO, "tests", "test_*.py"))}
  found = set()
  for name in sorted(test_modules):
    for line, module in _imported_modules(os.path.join(REPO, "tests", f"{name}.py")):
      imported = module.removeprefix("tests.").split(".")[0]
      if imported in test_modules:
        found.add(f"tests/{name}.py:{line} imports tests/{imported}.py")
  assert not found, (
      "Test modules import each other; move what they share into tests/conftest.py (fixtures) or "
      "tests/helpers.py:\n" + "\n".join(sorted(found))
  )
