"""Import rules, read from the source: the package's imports point down its layers (docs/architecture.md),
and no test module imports another (shared fixtures live in conftest.py, shared helpers in helpers.py)."""

import ast
import glob
import os

from tests.helpers import REPO

# docs/architecture.md's table: a module may import from its own layer and the layers below it.
LAYERS = {
    0: (
        "data",
        "models",
        "losses",
        "optim",
        "sharding",
        "checkpoint",
        "encoder",
        "scoring",
        "metrics",
        "weights",
        "errors",
        "host_runtime",
    ),
    1: ("defenses",),
    2: ("config_lib",),
    3: ("steps",),
    4: ("runs", "evaluators"),
    5: ("train",),
    6: ("suspicion",),
    7: ("main", "experiments", "attacks", "inspect", "bench"),
}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}


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


def _package_part(module: str) -> str | None:
  """'roclip_jax.data.pipeline' -> 'data'; None outside the package or for the package itself."""
  parts = module.split(".")
  return parts[1] if parts[0] == "roclip_jax" and len(parts) > 1 else None


def test_every_package_module_has_a_layer():
  parts = {os.path.splitext(p)[0] for p in os.listdir(os.path.join(REPO, "roclip_jax"))}
  parts -= {"__init__", "__pycache__", "assets"}
  assert (
      not parts - LAYER_OF.keys()
  ), f"Give {sorted(parts - LAYER_OF.keys())} a layer here and in docs/architecture.md."


def test_imports_point_down_the_layers():
  upward = []
  for path in sorted(glob.glob(os.path.join(REPO, "roclip_jax", "**", "*.py"), recursive=True)):
    own = _package_part(os.path.relpath(path, REPO).removesuffix(".py").replace(os.sep, "."))
    if own is None:
      continue
    for line, module in _imported_modules(path):
      part = _package_part(module)
      if part in LAYER_OF and LAYER_OF[part] > LAYER_OF[own]:
        upward.append(
            f"{os.path.relpath(path, REPO)}:{line} ({own}, layer {LAYER_OF[own]}) imports {module} (layer {LAYER_OF[part]})"
        )
  assert not upward, "Imports that point up the layers:\n" + "\n".join(upward)


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
