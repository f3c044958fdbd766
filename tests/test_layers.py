"""mimjax's imports go one way: math -> build/weights -> evaluators ->
training -> entry points, with no cycles, function-level imports included;
and no module grows past ~350 lines without saying why at its top."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'mimjax')

# Lowest first. A module may import its own layer or lower ones.
LAYERS = [
    # the math and the input: pure functions, models, data, sharding
    ('mimjax', 'mimjax.models', 'mimjax.masking', 'mimjax.views',
     'mimjax.objectives', 'mimjax.mim', 'mimjax.matrix', 'mimjax.sharding',
     'mimjax.flops',
     'mimjax.data', 'mimjax.torch_io', 'mimjax.distributed',
     'mimjax.analysis', 'mimjax.analysis.cka', 'mimjax.analysis.invariance',
     'mimjax.analysis.knn', 'mimjax.analysis.visualize',
     'mimjax.analysis.stream'),
    # from a config, and weights in and out
    ('mimjax.config', 'mimjax.build', 'mimjax.checkpoint', 'mimjax.convert',
     'mimjax.weights'),
    # what runs on trained models
    ('mimjax.evaluators', 'mimjax.analysis.report'),
    ('mimjax.training',),
    ('mimjax.main', 'mimjax.tools'),
]
MAX_LINES = 350
REASON = 'Why this module is long:'


def _modules():
  for folder, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(folder, f)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3]
        yield rel.replace(os.sep, '.').removesuffix('.__init__'), path


def _layer(module: str) -> int:
  best = None
  for i, names in enumerate(LAYERS):
    for name in names:
      if module == name or module.startswith(name + '.'):
        if best is None or len(name) > len(best[1]):
          best = (i, name)
  assert best is not None, f'{module} is in no layer of tests/test_layers.py'
  return best[0]


def _imports(path: str, known: set[str]) -> set[str]:
  """mimjax modules `path` imports, anywhere in the file."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module and (
        node.module.split('.')[0] == 'mimjax'):
      for alias in node.names:
        full = f'{node.module}.{alias.name}'
        out.add(full if full in known else node.module)
    elif isinstance(node, ast.Import):
      out.update(a.name for a in node.names
                 if a.name.split('.')[0] == 'mimjax')
  return out


def _graph():
  modules = dict(_modules())
  return {m: _imports(p, set(modules)) - {m} for m, p in modules.items()}


def test_imports_follow_the_layers():
  wrong = [f'{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})'
           for m, deps in _graph().items() for d in deps
           if _layer(d) > _layer(m)]
  assert not wrong, '\n'.join(wrong)


def test_no_import_cycles():
  graph = _graph()
  state, cycles = {}, []

  def visit(m, stack):
    state[m] = 'open'
    for d in graph.get(m, ()):
      if d not in graph:
        continue
      if state.get(d) == 'open':
        cycles.append(' -> '.join(stack[stack.index(d):] + [d]))
      elif d not in state:
        visit(d, stack + [d])
    state[m] = 'done'

  for m in graph:
    if m not in state:
      visit(m, [m])
  # A package's __init__ importing its own submodules is not a cycle.
  cycles = [c for c in cycles
            if not all(p.startswith(c.split(' -> ')[0]) for p in c.split(' -> '))]
  assert not cycles, '\n'.join(cycles)


@pytest.mark.parametrize('module,path', sorted(_modules()))
def test_long_modules_say_why(module, path):
  lines = open(path).read().splitlines()
  if len(lines) > MAX_LINES:
    assert REASON in ''.join(lines[:30]), (
        f'{module} has {len(lines)} lines; split it or say at its top '
        f'"{REASON} ..."')
