"""The house: no import cycle among the project's modules, counting imports inside functions.

A function-local import is allowed only for a heavy or optional dependency outside the project, with a
comment on its line saying so; an import of the project's own modules inside a function is how the
old cycles were hidden, so there is none.
"""

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('magicvideo_jax',)


def _modules():
  """Dotted name -> file path of every module of the package."""
  out = {}
  for package in PACKAGES:
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
      for name in files:
        if name.endswith('.py'):
          path = os.path.join(folder, name)
          dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
          out[dotted.removesuffix('.__init__')] = path
  return out


def _imports(path, modules):
  """(target module, line, is_local, source line) for every import of a project module in `path`."""
  tree = ast.parse(open(path).read())
  lines = open(path).read().splitlines()
  local_nodes = set()
  for node in ast.walk(tree):
    if path.endswith('__init__.py') and getattr(node, 'name', None) == '__getattr__':
      continue  # A package's lazy attribute (PEP 562) keeps `import magicvideo_jax` free of jax.
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for inner in ast.walk(node):
        if isinstance(inner, (ast.Import, ast.ImportFrom)):
          local_nodes.add(id(inner))
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      # `from pkg import name` imports the module pkg.name when there is one, else pkg itself.
      targets = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in modules else node.module
                 for a in node.names]
    else:
      continue
    for target in targets:
      if target in modules:
        found.append((target, node.lineno, id(node) in local_nodes, lines[node.lineno - 1]))
  return found


def _graph():
  modules = _modules()
  graph = {m: set() for m in modules}
  local = []
  for module, path in modules.items():
    for target, line, is_local, text in _imports(path, modules):
      # Importing a.b.c also runs a/__init__ and a/b/__init__; those implicit parents are no edge of
      # a module inside them (its own package is already running), the explicit target always is.
      parents = {target.rsplit('.', i)[0] for i in range(1, target.count('.') + 1)}
      for dep in parents:
        if dep in modules and not module.startswith(dep + '.') and dep != module:
          graph[module].add(dep)
      if target != module:
        graph[module].add(target)
      if is_local:
        local.append(f'{os.path.relpath(path, ROOT)}:{line}: {text.strip()}')
  return graph, local


def _cycles(graph):
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []
  sys.setrecursionlimit(10000)

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
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
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycle():
  graph, _ = _graph()
  assert len(graph) > 40  # The walk found the package.
  assert _cycles(graph) == []


def test_no_function_local_import_of_project_modules():
  _, local = _graph()
  assert local == []


def test_cycle_finder_finds_a_cycle():
  assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
  assert _cycles({'a': {'b'}, 'b': set()}) == []
