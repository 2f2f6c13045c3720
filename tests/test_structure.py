"""The package's shape: no import cycles, no `_private` name taken from another module, layers
imported only downwards, and the library never imports `checkpoints_conversion`.

Imports are read from the source with `ast` (function-local imports included, package
`__init__` re-exports excluded), so the test sees every import, not only those that run.
"""

import ast
import pathlib

import pytest

import lightcluster_jax

ROOT = pathlib.Path(lightcluster_jax.__file__).parent
PKG = ROOT.name
# Lower layers never import higher ones (data-flow layout of DESIGN.md).
LAYERS = {"config": 0, "blocks": 0, "data": 1, "weights": 1, "stages": 2, "runner": 3,
          "apps": 4}


def _modules():
  out = {}
  for f in ROOT.rglob("*.py"):
    parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = f
  return out


def _imports(mods):
  """{module: [(imported module, name or None)]}, package __init__ files skipped."""
  found = {}
  for m, f in mods.items():
    if f.name == "__init__.py":
      continue
    edges = found.setdefault(m, [])
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
      if isinstance(node, ast.Import):
        edges += [(a.name, None) for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        for a in node.names:
          sub = f"{node.module}.{a.name}"
          edges.append((sub, None) if sub in mods else (node.module, a.name))
  return found


def _private_attribute_uses(mods):
  """`alias._name` where alias is another module of the package."""
  bad = []
  for m, f in mods.items():
    tree = ast.parse(f.read_text(), str(f))
    alias = {}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module:
        for a in node.names:
          if f"{node.module}.{a.name}" in mods:
            alias[a.asname or a.name] = f"{node.module}.{a.name}"
      elif isinstance(node, ast.Import):
        for a in node.names:
          if a.name in mods and a.asname:
            alias[a.asname] = a.name
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in alias and alias[node.value.id] != m
          and node.attr.startswith("_") and not node.attr.startswith("__")):
        bad.append(f"{m}: {alias[node.value.id]}.{node.attr}")
  return bad


def _layer(module: str):
  parts = module.split(".")
  return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_no_import_cycles():
  mods = _modules()
  graph = {m: {t for t, _ in e if t in mods and t != m and t != PKG}
           for m, e in _imports(mods).items()}
  state, cycles = {}, []

  def visit(v, path):
    state[v] = 1
    for w in graph.get(v, ()):
      if state.get(w) == 1:
        cycles.append(path[path.index(w):] + [w])
      elif w not in state:
        visit(w, path + [w])
    state[v] = 2
  for m in graph:
    if m not in state:
      visit(m, [m])
  assert not cycles, cycles


def test_no_private_names_across_modules():
  mods = _modules()
  bad = [f"{m}: from {t} import {n}" for m, e in _imports(mods).items() for t, n in e
         if n and n.startswith("_") and not n.startswith("__") and t in mods and t != m]
  bad += _private_attribute_uses(mods)
  assert not bad, bad


def test_layers_import_downwards_only():
  mods = _modules()
  bad = []
  for m, edges in _imports(mods).items():
    for t, _ in edges:
      lm, lt = _layer(m), _layer(t)
      if t in mods and lm is not None and lt is not None and lt > lm:
        bad.append(f"{m} -> {t}")
  assert not bad, bad


def test_library_never_imports_checkpoints_conversion():
  bad = [f"{m} -> {t}" for m, e in _imports(_modules()).items() for t, _ in e
         if t.split(".")[0] == "checkpoints_conversion"]
  assert not bad, bad


@pytest.mark.parametrize("check", [test_no_import_cycles, test_no_private_names_across_modules,
                                   test_layers_import_downwards_only])
def test_checks_fail_on_a_planted_violation(check, tmp_path, monkeypatch):
  """Each check catches what it is for: a copy of the package with a violation planted."""
  import shutil
  copy = tmp_path / PKG
  shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__", "samples"))
  plant = {
      test_no_import_cycles: ("blocks/resize.py", f"from {PKG}.blocks import crf\n"),
      test_no_private_names_across_modules: ("stages/refine.py",
                                             f"from {PKG}.blocks.kmeans import _sq_dists\n"),
      test_layers_import_downwards_only: ("blocks/metrics.py", f"from {PKG}.runner import plan\n"),
  }[check]
  f = copy / plant[0]
  f.write_text(plant[1] + f.read_text())
  monkeypatch.setattr(__import__(__name__), "ROOT", copy)
  with pytest.raises(AssertionError):
    check()
