"""The import graph follows docs/ARCHITECTURE.md: every import (at module level or inside a
function) points to the same layer or one below, and no modules import each other in a cycle.

The graph is read from the source with `ast` (nothing is imported), so an import hidden in a
function body counts like any other. `if TYPE_CHECKING:` imports are annotations only and are
left out."""

from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Bottom to top. A module belongs to the first entry that is it or a package above it.
LAYERS = [
    ("foundation", ["elm_jax", "elm_jax.errors", "elm_jax.tree_paths", "elm_jax.files", "elm_jax.jsonl",
                    "elm_jax.tf_input", "elm_jax.vocabularies", "elm_jax.defaults", "elm_jax.batching",
                    "elm_jax.compile_cache"]),
    ("models, partitioning, tasks", ["elm_jax.models", "elm_jax.partitioning", "tasks"]),
    ("checkpoints", ["elm_jax.checkpoints"]),
    ("expert stack", ["elm_jax.expert_stack"]),
    ("training | evaluation", ["elm_jax.training", "elm_jax.evaluation"]),
    ("planning", ["elm_jax.planning", "elm_jax.planning_sweep"]),
    ("library", ["elm_jax.library"]),
    ("demo", ["elm_jax.demo"]),
    ("commands", ["elm_jax.commands"]),
]
INDEPENDENT = [("elm_jax.training", "elm_jax.evaluation")]  # same layer, never importing each other


def _modules() -> dict[str, str]:
  out = {}
  for top in ("elm_jax", "tasks"):
    for base, _, names in os.walk(os.path.join(REPO, top)):
      for name in names:
        if name.endswith(".py"):
          path = os.path.join(base, name)
          module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
          out[module[:-len(".__init__")] if module.endswith(".__init__") else module] = path
  return out


def _is_type_checking(node: ast.If) -> bool:
  test = node.test
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
      isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: str, module: str, known: set[str]) -> set[str]:
  """Project modules that `module` imports, anywhere in its body."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
          for child in node.body for n in ast.walk(child)}
  found = set()
  for node in ast.walk(tree):
    if id(node) in skip:
      continue
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      base = node.module
      if node.level:  # relative import
        base = ".".join(module.split(".")[:-node.level] + [node.module])
      names = [base] + [f"{base}.{a.name}" for a in node.names]
    else:
      continue
    for name in names:
      while name and name not in known:
        name = name.rpartition(".")[0]
      if name and name != module:
        found.add(name)
  return found


def _layer(module: str) -> tuple[int, str]:
  best = None
  for index, (_, members) in enumerate(LAYERS):
    for member in members:
      if module == member or module.startswith(member + "."):
        if best is None or len(member) > len(best[1]):
          best = (index, member)
  if best is None:
    raise AssertionError(f"{module}: in no layer of docs/ARCHITECTURE.md; add it to LAYERS")
  return best


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
  modules = _modules()
  return {m: _imports(p, m, set(modules)) for m, p in modules.items()}


def test_every_import_points_down_or_sideways(graph):
  upward = []
  for module, imported in sorted(graph.items()):
    here, _ = _layer(module)
    for other in sorted(imported):
      there, _ = _layer(other)
      if there > here:
        upward.append(f"{module} ({LAYERS[here][0]}) imports {other} ({LAYERS[there][0]})")
  assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_training_and_evaluation_stay_independent(graph):
  crossing = [f"{m} imports {o}" for m, imported in graph.items() for o in imported
              for a, b in INDEPENDENT for x, y in ((a, b), (b, a))
              if (m == x or m.startswith(x + ".")) and (o == y or o.startswith(y + "."))]
  assert not crossing, "\n".join(crossing)


def test_no_import_cycles(graph):
  """Tarjan's strongly connected components over the module graph: none larger than one."""
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_a_violation_and_a_cycle():
  """The checks above can fail: an upward import and a two-module cycle are both caught."""
  fake = {"elm_jax.models.t5": {"elm_jax.library.store"}, "elm_jax.library.store": {"elm_jax.models.t5"}}
  with pytest.raises(AssertionError, match="imports elm_jax.library.store"):
    test_every_import_points_down_or_sideways(fake)
  with pytest.raises(AssertionError, match="import cycles"):
    test_no_import_cycles(fake)
