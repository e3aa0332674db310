"""The import graph follows docs/ARCHITECTURE.md, and output happens where it says.

`check_imports(root, layers, ...)` reads the source of every module under `root` with `ast`
(nothing is imported) and returns what breaks the rules; the tests below run it on the real tree
and on small packages written to a temporary directory with one planted violation each. An edge
of the graph is any of:
- an `import` or `from ... import` anywhere: at module top, inside a function, or under
  `if TYPE_CHECKING:` (a type named for annotations is still a dependency on its module);
- `importlib.import_module(NAME)` or `__import__(NAME)` with a literal NAME (relative names
  resolved against a literal `package`, `__name__` or `__package__`);
- the same with a NAME computed after a literal prefix `P.` (plugin discovery writes
  `importlib.import_module(f"{__name__}.{name}")` over `pkgutil.iter_modules(__path__)`): an
  import of every module under the package P;
- the same with a NAME computed in full: allowed only in the modules of `computed_imports`, each
  with its reason, which are taken to import every project module that a string literal in them
  names in full, dotted (the `SUBCOMMANDS` table of `elm_jax/commands/cli.py`).

The rules: every module matches an entry of `layers` (bottom to top); an edge points to
the same layer or one below; the members of each group of `independent` never import each
other; and no modules import each other in a cycle, counting every kind of edge above.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import os
import shutil
from typing import Mapping, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Bottom to top. "P.*" is the package P and every module under it; any other entry is one
# module. A module belongs to the most specific entry that matches it.
LAYERS = [
    ("foundation", ["elm_jax", "elm_jax.errors", "elm_jax.tree_paths", "elm_jax.files", "elm_jax.jsonl",
                    "elm_jax.tf_input", "elm_jax.vocabularies", "elm_jax.defaults", "elm_jax.batching",
                    "elm_jax.compile_cache"]),
    ("models | partitioning | tasks", ["elm_jax.models.*", "elm_jax.partitioning", "tasks.*"]),
    ("checkpoints", ["elm_jax.checkpoints.*"]),
    ("expert stack", ["elm_jax.expert_stack"]),
    ("training | evaluation", ["elm_jax.training.*", "elm_jax.evaluation.*"]),
    ("planning", ["elm_jax.planning", "elm_jax.planning_sweep"]),
    ("library", ["elm_jax.library.*"]),
    ("demo", ["elm_jax.demo.*"]),
    ("commands", ["elm_jax.commands.*"]),
    ("api", ["elm_jax.api"]),
]
# Within a layer: the members of a group never import each other.
INDEPENDENT = [
    ["elm_jax.models.*", "elm_jax.partitioning", "tasks.*"],
    ["elm_jax.training.*", "elm_jax.evaluation.*"],
]
# Modules that import a module named at run time, and why.
COMPUTED_IMPORTS = {
    "elm_jax.commands.cli": "imports the subcommand's module, named by a literal in SUBCOMMANDS",
    "tasks.instances": "--setup=MODULE:FUNCTION imports the module the user names",
}
# Modules outside elm_jax/commands/ that print, write to sys.stdout or sys.stderr, draw a tqdm
# progress bar or log; docs/ARCHITECTURE.md ("Output") says what each writes.
OUTPUT_MODULES = {
    "elm_jax.compile_cache", "elm_jax.files", "elm_jax.partitioning", "elm_jax.checkpoints.t5x",
    "elm_jax.training.checkpointing", "elm_jax.training.run", "elm_jax.training.trainer",
    "elm_jax.evaluation.rank_scoring", "elm_jax.evaluation.sweep", "elm_jax.planning",
    "elm_jax.planning_sweep", "elm_jax.demo.pipeline",
}
# Modules with an import inside a function; docs/ARCHITECTURE.md ("Imports inside functions")
# says what each imports there and why.
FUNCTION_IMPORTS = {
    "elm_jax.compile_cache", "elm_jax.tf_input", "elm_jax.planning_sweep", "elm_jax.checkpoints.t5x",
    "elm_jax.evaluation.generation_metrics", "elm_jax.models.minilm", "elm_jax.demo.report",
    "elm_jax.commands.cli", "elm_jax.commands.gin_utils", "elm_jax.commands.library_command",
    "elm_jax.commands.plan_command", "elm_jax.models.experts", "tasks.instances", "tasks.raw_sources",
}

TYPE_ONLY, IN_FUNCTION = " under TYPE_CHECKING", " inside a function"


@dataclasses.dataclass(frozen=True)
class Edge:
  """`source` imports `target` at `where` (path:line); `how` is "" for a runtime import
  statement, else " under TYPE_CHECKING", " inside a function", " by importlib.import_module",
  " by __import__" or " by plugin discovery"."""
  source: str
  target: str
  where: str
  how: str


def find_modules(root: str, tops: Sequence[str]) -> dict[str, str]:
  """{dotted module name: path} of every .py file under the packages `tops` of `root`."""
  out = {}
  for top in tops:
    for base, dirs, names in os.walk(os.path.join(root, top)):
      dirs[:] = sorted(d for d in dirs if d != "__pycache__")
      for name in sorted(names):
        if name.endswith(".py"):
          path = os.path.join(base, name)
          module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
          out[module[:-len(".__init__")] if module.endswith(".__init__") else module] = path
  return out


def _is_type_checking(node: ast.If) -> bool:
  test = node.test
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
      isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _dynamic_import(node: ast.Call) -> Optional[str]:
  """" by importlib.import_module" or " by __import__" when `node` calls one, else None."""
  func = node.func
  name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
  if name == "import_module":
    return " by importlib.import_module"
  if name == "__import__":
    return " by __import__"
  return None


class _Reader:
  """The edges of one module, and its computed-name imports as (line, how)."""

  def __init__(self, module: str, is_package: bool, known: set[str], where: str):
    self.module, self.known, self.where = module, known, where
    self.package = module if is_package else module.rpartition(".")[0]
    self.edges: list[Edge] = []
    self.computed: list[tuple[int, str]] = []

  def resolve(self, name: str) -> Optional[str]:
    """The project module `name` imports (its longest known prefix), or None."""
    while name and name not in self.known:
      name = name.rpartition(".")[0]
    return name or None

  def add(self, name: Optional[str], line: int, how: str) -> None:
    target = self.resolve(name) if name else None
    if target and target != self.module:
      self.edges.append(Edge(self.module, target, f"{self.where}:{line}", how))

  def relative(self, name: str, package: Optional[str]) -> Optional[str]:
    """`name` with its leading dots resolved against `package` (as importlib does)."""
    level = len(name) - len(name.lstrip("."))
    if not level:
      return name
    if not package:
      return None
    base = package.rsplit(".", level - 1)[0] if level > 1 else package
    rest = name[level:]
    return f"{base}.{rest}" if rest else base

  def value(self, node: Optional[ast.AST]) -> tuple[str, bool]:
    """(the literal text that `node` starts with, whether that is all of it)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
      return node.value, True
    if isinstance(node, ast.Name) and node.id in ("__name__", "__package__"):
      return (self.module if node.id == "__name__" else self.package), True
    if isinstance(node, ast.JoinedStr):
      text = ""
      for part in node.values:
        if isinstance(part, ast.FormattedValue):
          if part.conversion != -1 or part.format_spec is not None:
            return text, False
          part = part.value
        piece, whole = self.value(part)
        text += piece
        if not whole:
          return text, False
      return text, True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
      left, whole = self.value(node.left)
      if not whole:
        return left, False
      right, whole = self.value(node.right)
      return left + right, whole
    return "", False

  def call(self, node: ast.Call, how: str, line: int) -> None:
    args = {k.arg: k.value for k in node.keywords}
    name_node = node.args[0] if node.args else args.get("name")
    package_node = node.args[1] if len(node.args) > 1 and "import_module" in how else args.get("package")
    text, whole = self.value(name_node)
    package, package_whole = self.value(package_node) if package_node is not None else (None, True)
    if text.startswith("."):
      resolved = self.relative(text, package if package_whole else None) or ""
      text = resolved + "." if resolved and not whole and not text.strip(".") else resolved
    if whole and text:
      self.add(text, line, how)
      return
    prefix = text.rpartition(".")[0]
    if prefix and prefix in self.known:  # plugin discovery: every module under `prefix`
      for target in sorted(m for m in self.known if m.startswith(text) and m != self.module):
        self.edges.append(Edge(self.module, target, f"{self.where}:{line}", " by plugin discovery"))
      return
    self.computed.append((line, how))

  def visit(self, node: ast.AST, how: str) -> None:
    if isinstance(node, ast.Import):
      for alias in node.names:
        self.add(alias.name, node.lineno, how)
    elif isinstance(node, ast.ImportFrom):
      base = self.relative("." * node.level + (node.module or ""), self.package)
      for alias in node.names:
        full = f"{base}.{alias.name}" if base else alias.name
        self.add(full if full in self.known else base, node.lineno, how)
    elif isinstance(node, ast.Call) and _dynamic_import(node):
      self.call(node, _dynamic_import(node) + (how if how == IN_FUNCTION else ""), node.lineno)
    if isinstance(node, ast.If) and _is_type_checking(node):
      for child in node.body:
        self.visit(child, TYPE_ONLY)
      for child in node.orelse:
        self.visit(child, how)
      return
    if how != TYPE_ONLY and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      how = IN_FUNCTION
    for child in ast.iter_child_nodes(node):
      self.visit(child, how)


def read_edges(root: str, modules: Mapping[str, str]) -> tuple[list[Edge], dict[str, list[tuple[int, str]]]]:
  """Every edge among `modules`, and each module's imports of a computed name as (line, how)."""
  known = set(modules)
  edges, computed = [], {}
  for module, path in sorted(modules.items()):
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    where = os.path.relpath(path, root).replace(os.sep, "/")
    reader = _Reader(module, os.path.basename(path) == "__init__.py", known, where)
    reader.visit(tree, "")
    if reader.computed:
      computed[module] = reader.computed
      literals = {n.value for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and "." in n.value}
      line, how = reader.computed[0]
      for target in sorted(literals & known - {module}):
        edges.append(Edge(module, target, f"{where}:{line}", how))
    edges.extend(reader.edges)
  return edges, computed


def _matches(pattern: str, module: str) -> bool:
  if pattern.endswith(".*"):
    return module == pattern[:-2] or module.startswith(pattern[:-1])
  return module == pattern


def _member(module: str, patterns: Sequence[str]) -> Optional[str]:
  """The most specific of `patterns` that `module` matches (an exact name first), or None."""
  found = [p for p in patterns if _matches(p, module)]
  return max(found, key=lambda p: (not p.endswith(".*"), len(p))) if found else None


def _layer(module: str, layers) -> Optional[int]:
  best = None
  for index, (_, members) in enumerate(layers):
    member = _member(module, members)
    if member and (best is None or (not member.endswith(".*"), len(member)) > best[1]):
      best = (index, (not member.endswith(".*"), len(member)))
  return None if best is None else best[0]


def _shortest_cycle(graph: Mapping[str, Mapping[str, Edge]], component: set[str], start: str) -> list[Edge]:
  """The edges of a shortest cycle from `start` back to it inside `component` (breadth first)."""
  back: dict[str, Edge] = {}
  frontier = [start]
  while start not in back:
    following = []
    for v in frontier:
      for w in sorted(graph[v]):
        if w in component and w not in back:
          back[w] = graph[v][w]
          following.append(w)
    frontier = following
  cycle, v = [], start
  while True:
    cycle.append(back[v])
    v = back[v].source
    if v == start:
      return cycle[::-1]


def _cycles(edges: Sequence[Edge]) -> list[list[Edge]]:
  """Import cycles, as their edges: in each strongly connected component of more than one
  module (Tarjan), a shortest cycle through its first module, then through each of its modules
  that no cycle named yet, in module order."""
  graph: dict[str, dict[str, Edge]] = collections.defaultdict(dict)
  for e in edges:
    graph[e.source].setdefault(e.target, e)  # the first edge between two modules speaks for all
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(v):  # recursive: module graphs are shallow
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      if len(component) > 1:
        components.append(component)

  for v in sorted(list(graph)):
    if v not in index:
      visit(v)
  cycles = []
  for component in sorted(components, key=min):
    covered: set[str] = set()
    for start in sorted(component):
      if start in covered:
        continue
      cycle = _shortest_cycle(graph, component, start)
      covered.update(e.source for e in cycle)
      cycles.append(cycle)
  return cycles


def check_imports(root: str, layers: Sequence[tuple[str, Sequence[str]]],
                  independent: Sequence[Sequence[str]] = (),
                  computed_imports: Optional[Mapping[str, str]] = None) -> list[str]:
  """What in the packages under `root` breaks the rules of the module docstring, one line each
  (empty when nothing does). The packages read are the top-level names in `layers`."""
  tops = sorted({p.split(".")[0] for _, members in layers for p in members})
  modules = find_modules(root, tops)
  edges, computed = read_edges(root, modules)
  problems = []
  for module in sorted(modules):
    if _layer(module, layers) is None:
      problems.append(f"{module}: in no layer; add it to LAYERS in tests/test_architecture.py and to "
                      "docs/ARCHITECTURE.md")
  for module, calls in sorted(computed.items()):
    if module not in (computed_imports or {}):
      for line, how in calls:
        where = os.path.relpath(modules[module], root).replace(os.sep, "/")
        problems.append(f"{where}:{line}: {module} imports a module named at run time{how}; name it by a "
                        "literal, or by a literal 'package.' prefix to import the modules of that package, "
                        "or list the module in COMPUTED_IMPORTS with the reason")
  for e in edges:
    here, there = _layer(e.source, layers), _layer(e.target, layers)
    if here is not None and there is not None and there > here:
      problems.append(f"{e.where}: {e.source} ({layers[here][0]}) imports {e.target} ({layers[there][0]})"
                      f"{e.how}, a higher layer")
    for group in independent:
      a, b = _member(e.source, group), _member(e.target, group)
      if a and b and a != b:
        problems.append(f"{e.where}: {e.source} imports {e.target}{e.how}; {a} and {b} never import each other")
  for cycle in _cycles(edges):
    chain = " -> ".join([cycle[0].source] + [e.target for e in cycle])
    problems.append(f"import cycle {chain}: " + "; ".join(f"{e.where}{e.how}" for e in cycle))
  return problems


def test_the_tree_follows_the_layers():
  problems = check_imports(REPO, LAYERS, INDEPENDENT, COMPUTED_IMPORTS)
  assert not problems, "\n".join(problems)


def test_every_computed_import_is_still_there():
  """COMPUTED_IMPORTS lists only modules that import a computed name (no stale excuse)."""
  modules = find_modules(REPO, ["elm_jax", "tasks"])
  _, computed = read_edges(REPO, modules)
  assert set(COMPUTED_IMPORTS) == set(computed)


def _output_calls(path: str) -> list[int]:
  """Lines of `path` that print, name sys.stdout or sys.stderr, call tqdm or log."""
  lines = []
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("print", "tqdm"):
      lines.append(node.lineno)
    elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and ((node.value.id == "sys" and node.attr in ("stdout", "stderr"))
               or (node.value.id == "logging" and node.attr in ("getLogger", "debug", "info", "warning",
                                                                 "error", "exception", "critical", "log")))):
      lines.append(node.lineno)
  return sorted(set(lines))


def test_output_happens_where_the_doc_says():
  """Outside elm_jax/commands/, exactly the modules of OUTPUT_MODULES write to the terminal."""
  writing = {m: _output_calls(p) for m, p in find_modules(REPO, ["elm_jax", "tasks"]).items()
             if not _matches("elm_jax.commands.*", m)}
  writing = {m: lines for m, lines in writing.items() if lines}
  extra = {m: writing[m] for m in sorted(set(writing) - OUTPUT_MODULES)}
  gone = sorted(OUTPUT_MODULES - set(writing))
  assert not extra, f"{extra} write (at those lines): add them to OUTPUT_MODULES and docs/ARCHITECTURE.md"
  assert not gone, f"{gone} no longer write: drop them from OUTPUT_MODULES and docs/ARCHITECTURE.md"


def test_imports_inside_functions_are_where_the_doc_says():
  """Exactly the modules of FUNCTION_IMPORTS import inside a function (`importlib` included)."""
  found = set()
  for module, path in find_modules(REPO, ["elm_jax", "tasks"]).items():
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and any(
          isinstance(n, (ast.Import, ast.ImportFrom)) or (isinstance(n, ast.Call) and _dynamic_import(n))
          for n in ast.walk(node)):
        found.add(module)
  extra, gone = sorted(found - FUNCTION_IMPORTS), sorted(FUNCTION_IMPORTS - found)
  assert not extra, f"{extra} import inside a function: add them to FUNCTION_IMPORTS and docs/ARCHITECTURE.md"
  assert not gone, f"{gone} no longer do: drop them from FUNCTION_IMPORTS and docs/ARCHITECTURE.md"


def test_tensorflow_and_gin_are_imported_where_the_doc_says():
  """TensorFlow only by `tf_input` (the others call `tf_input.tensorflow()`); gin only by commands."""
  importing = collections.defaultdict(set)
  for module, path in find_modules(REPO, ["elm_jax", "tasks"]).items():
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
      for top in {n.split(".")[0] for n in names} & {"tensorflow", "gin"}:
        importing[top].add(module)
  assert importing["tensorflow"] == {"elm_jax.tf_input"}
  assert [m for m in importing["gin"] if not _matches("elm_jax.commands.*", m)] == []


# --------------------------------------------------------------- the checker on planted trees
TOY_LAYERS = [("low", ["pkg", "pkg.low", "pkg.plugins.*"]), ("high", ["pkg.high", "pkg.top.*"])]


def _toy(tmp_path, files: Mapping[str, str], layers=TOY_LAYERS, independent=(), computed=None) -> list[str]:
  """check_imports on the package `pkg` made of `files` ({path under pkg/: source}); pkg's
  __init__.py, low.py, high.py and top/__init__.py exist, empty, unless `files` gives them."""
  tree = {"__init__.py": "", "low.py": "", "high.py": "", "top/__init__.py": "", **files}
  shutil.rmtree(tmp_path / "pkg", ignore_errors=True)
  for name, text in tree.items():
    path = tmp_path / "pkg" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return check_imports(str(tmp_path), layers, independent, computed or {})


def test_a_clean_toy_tree_passes(tmp_path):
  assert _toy(tmp_path, {"high.py": "from pkg import low\nimport pkg.low as l\n"}) == []


def test_an_upward_import_under_type_checking_fails(tmp_path):
  source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from pkg.high import Thing\n"
  assert _toy(tmp_path, {"low.py": source}) == [
      "pkg/low.py:3: pkg.low (low) imports pkg.high (high) under TYPE_CHECKING, a higher layer"]


def test_an_upward_importlib_import_fails(tmp_path):
  source = "import importlib\n\ndef load():\n  return importlib.import_module('pkg.high')\n"
  assert _toy(tmp_path, {"low.py": source}) == [
      "pkg/low.py:4: pkg.low (low) imports pkg.high (high) by importlib.import_module inside a function, "
      "a higher layer"]
  assert _toy(tmp_path, {"low.py": "m = __import__('pkg.high')\n"}) == [
      "pkg/low.py:1: pkg.low (low) imports pkg.high (high) by __import__, a higher layer"]
  relative = "from importlib import import_module\nm = import_module('.high', __package__)\n"
  assert _toy(tmp_path, {"low.py": relative}) == [
      "pkg/low.py:2: pkg.low (low) imports pkg.high (high) by importlib.import_module, a higher layer"]


def test_a_module_in_no_layer_fails(tmp_path):
  assert _toy(tmp_path, {"extra.py": "from pkg import low\n"}) == [
      "pkg.extra: in no layer; add it to LAYERS in tests/test_architecture.py and to docs/ARCHITECTURE.md"]


def test_a_cycle_within_a_layer_through_a_function_level_import_fails(tmp_path):
  files = {"top/a.py": "from pkg.top import b\n",
           "top/b.py": "def f():\n  from pkg.top import a\n  return a\n"}
  assert _toy(tmp_path, files) == [
      "import cycle pkg.top.a -> pkg.top.b -> pkg.top.a: pkg/top/a.py:1; pkg/top/b.py:2 inside a function"]


def test_a_cycle_closed_under_type_checking_fails(tmp_path):
  files = {"top/a.py": "import pkg.top.b\n",
           "top/b.py": "import typing\nif typing.TYPE_CHECKING:\n  from pkg.top.a import A\n"}
  assert _toy(tmp_path, files) == [
      "import cycle pkg.top.a -> pkg.top.b -> pkg.top.a: pkg/top/a.py:1; pkg/top/b.py:3 under TYPE_CHECKING"]


def test_independent_modules_of_one_layer_never_import_each_other(tmp_path):
  layers = [("low", ["pkg", "pkg.low", "pkg.high", "pkg.top.*"])]
  assert _toy(tmp_path, {"high.py": "from pkg import low\n"}, layers, [["pkg.low", "pkg.top.*"]]) == []
  assert _toy(tmp_path, {"top/a.py": "def f():\n  import pkg.low\n"}, layers, [["pkg.low", "pkg.top.*"]]) == [
      "pkg/top/a.py:2: pkg.top.a imports pkg.low inside a function; pkg.top.* and pkg.low never import "
      "each other"]


def test_plugin_discovery_imports_every_module_of_its_package(tmp_path):
  registry = ("import importlib, pkgutil\n"
              "KINDS = [importlib.import_module(f'{__name__}.{i.name}') for i in pkgutil.iter_modules(__path__)]\n")
  files = {"plugins/__init__.py": registry, "plugins/base.py": "",
           "plugins/one.py": "from pkg.plugins import base\n"}
  assert _toy(tmp_path, files) == []
  # A plugin that imports its registry closes a cycle through the discovery.
  files["plugins/one.py"] = "from pkg.plugins import KINDS\n"
  assert _toy(tmp_path, files) == [
      "import cycle pkg.plugins -> pkg.plugins.one -> pkg.plugins: pkg/plugins/__init__.py:2 by plugin "
      "discovery; pkg/plugins/one.py:1"]
  # Relative to the registry's package, the same.
  files["plugins/__init__.py"] = "import importlib\nKINDS = [importlib.import_module('.' + n, __name__) for n in NAMES]\n"
  assert _toy(tmp_path, files) == [
      "import cycle pkg.plugins -> pkg.plugins.one -> pkg.plugins: pkg/plugins/__init__.py:2 by plugin "
      "discovery; pkg/plugins/one.py:1"]
  # Discovering the modules of another package imports each of them: here of a higher layer.
  files = {"low.py": "import importlib\nm = importlib.import_module('pkg.top.' + NAME)\n", "top/xx.py": ""}
  assert _toy(tmp_path, files) == [
      "pkg/low.py:2: pkg.low (low) imports pkg.top.xx (high) by plugin discovery, a higher layer"]


def test_a_name_computed_in_full_is_refused_unless_listed(tmp_path):
  source = ("import importlib\nTABLE = {'x': 'pkg.high'}\n\n"
            "def run(key):\n  return importlib.import_module(TABLE[key])\n")
  assert _toy(tmp_path, {"low.py": source}) == [
      "pkg/low.py:5: pkg.low imports a module named at run time by importlib.import_module inside a function; "
      "name it by a literal, or by a literal 'package.' prefix to import the modules of that package, or "
      "list the module in COMPUTED_IMPORTS with the reason",
      "pkg/low.py:5: pkg.low (low) imports pkg.high (high) by importlib.import_module inside a function, "
      "a higher layer"]
  # Listed, it is taken to import the project modules its literals name: here one of a higher layer.
  assert _toy(tmp_path, {"low.py": source}, computed={"pkg.low": "a table of modules"}) == [
      "pkg/low.py:5: pkg.low (low) imports pkg.high (high) by importlib.import_module inside a function, "
      "a higher layer"]
