"""Figures in docs/*.md are measured by a named command or marked derived.

The convention, in the Markdown source (HTML comments, invisible when
rendered; the prose next to a figure says the same for the reader):

  <!-- measured: COMMAND -->   the numbers of the block are what COMMAND
                               prints. After a table, COMMAND may contain
                               {column} placeholders: each row is one run,
                               with that row's cell in that column filled in.
                               After a code block, the block is the output.
  <!-- derived: HOW -->        arithmetic on the shapes or on other figures
                               of the page, as HOW says.
  <!-- source: WHERE -->       a figure the project does not produce
                               (a vendor's chip memory, a paper's result).

A block is a run of non-blank lines (a fenced code block is one block); a
marker covers the block it is written in, or, standing alone, the block
before it. Several markers may follow one block.

This test checks every measured marker in every docs/*.md: the command names
an existing module and config file; memcheck figures are re-computed where
that is cheap (parameter counts of any model under jax.eval_shape; the whole
CPU memory_analysis for the small CPU presets on one device); the commands
of `mimjax.tools.scaling` rows are checked for a known flag, a config file
and a mesh of the simulated device count. Tables derived by
`mimjax.tools.scaling --table` (its FLOP model) are re-printed and compared. In the docs
listed in STRICT, every figure (a number with a unit of bytes, or a count of
parameters in millions) must be covered by a marker.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import re
import runpy
import shlex

import jax
import numpy as np
import pytest

from mimjax.tools import scaling

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / 'docs').glob('*.md'))
STRICT = ['scaling.md']  # more join as their figures get marked
MARKER = re.compile(r'<!--\s*(measured|derived|source):\s*(.*?)\s*-->', re.S)
FIGURE = re.compile(
    r'\d(?:[\d,.]*\d)?\s*(?:[KMGT]i?B|B/param)\b|\d(?:[\d.]*\d)?\s*M\b')
CHEAP_SIZES = ('mu', 'nano')  # a whole compile takes seconds on a CPU


def blocks(text: str) -> list[tuple[int, str]]:
  """(first line number, text) of each block; fenced code stays whole."""
  out, current, start, fenced = [], [], 0, False
  for number, line in enumerate(text.splitlines(), 1):
    if line.lstrip().startswith('```'):
      fenced = not fenced
    if not line.strip() and not fenced:
      if current:
        out.append((start, '\n'.join(current)))
      current = []
      continue
    if not current:
      start = number
    current.append(line)
  if current:
    out.append((start, '\n'.join(current)))
  return out


def marked_blocks(text: str):
  """(line, block, [(kind, argument), ...]) for every block of `text`."""
  result = []
  for line, block in blocks(text):
    markers = MARKER.findall(block)
    if markers and not MARKER.sub('', block).strip() and result:
      result[-1][2].extend(markers)  # a marker standing alone
    else:
      result.append((line, block, list(markers)))
  return result


def all_measured():
  for path in DOCS:
    for line, block, markers in marked_blocks(path.read_text()):
      for kind, command in markers:
        if kind == 'measured':
          yield pytest.param(block, command, id=f'{path.name}:{line}')


def table(block: str) -> list[dict[str, str]]:
  rows = [[cell.strip() for cell in line.strip().strip('|').split('|')]
          for line in block.splitlines() if line.lstrip().startswith('|')]
  header = rows[0]
  return [dict(zip(header, row)) for row in rows[2:]]


# ------------------------------------------------------------ memcheck


def parse_memcheck(command: str) -> dict:
  """The config file, argument, overrides and device count of a command."""
  args = shlex.split(command)
  assert args[:3] == ['.venv/bin/python', '-m', 'mimjax.tools.memcheck'], args
  parsed = dict(overrides={}, devices=None, stage='pretrain')
  for arg in args[3:]:
    key, _, value = arg.partition('=')
    if key == '--config':
      parsed['path'], _, parsed['arg'] = value.partition(':')
    elif key.startswith('--config.'):
      try:
        value = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        pass  # a string
      parsed['overrides'][key[len('--config.'):]] = value
    elif key == '--devices':
      parsed['devices'] = int(value)
    elif key == '--stage':
      parsed['stage'] = value
    else:
      raise AssertionError(f'unknown memcheck flag {arg!r}')
  assert (ROOT / parsed['path']).is_file(), parsed['path']
  return parsed


def load_config(parsed: dict):
  get_config = runpy.run_path(str(ROOT / parsed['path']))['get_config']
  config = get_config(parsed['arg']) if parsed['arg'] else get_config()
  for key, value in parsed['overrides'].items():
    node = config
    *path, last = key.split('.')
    for part in path:
      node = node[part]
    node[last] = value
  return config


def parameter_counts(config) -> dict[str, int]:
  """The pre-training model's parameters per top-level module, from shapes
  only (cached: every size is counted once)."""
  key = (config.model.to_json(), config.pretrain.decoder.to_json(),
         config.pretrain.data.image_size)
  if key not in _COUNTS:
    _COUNTS[key] = scaling.parameter_counts(config)
  return _COUNTS[key]


_COUNTS = {}


OUTPUT = {  # memcheck's output lines (mimjax/tools/memcheck.py)
    'devices': r'compiled for (\d+) devices',
    'mesh': r'mesh (\{[^}]*\})',
    'num_params': r'([\d,]+) parameters',
    'params_per_device': r'parameters +([\d.]+) GiB per device',
    'params_total': r'parameters +[\d.]+ GiB per device \(([\d.]+) GiB',
    'opt_state_per_device': r'optimizer state ([\d.]+) GiB per device',
    'opt_state_total': r'optimizer state [\d.]+ GiB per device \(([\d.]+) GiB',
    'temp_per_device': r'\(XLA temp\) ([\d.]+) GiB per device',
}
COLUMNS = {'parameters': 'num_params', 'XLA temp': 'temp_per_device'}


def memcheck_runs(block: str, command: str):
  """(command, {figure: value as printed}) for each run a block shows."""
  if block.lstrip().startswith('|'):
    for row in table(block):
      filled = command.format(**row)
      yield filled, {COLUMNS[k]: v for k, v in row.items() if k in COLUMNS}
  else:
    shown = [line[2:] for line in block.splitlines() if line.startswith('$ ')]
    assert shown in ([], [command]), (shown, command)
    figures = {}
    for key, pattern in OUTPUT.items():
      found = re.search(pattern, block)
      if found:
        figures[key] = found.group(1)
    assert figures, f'no memcheck output in:\n{block}'
    yield command, figures


def compiles_cheaply(parsed: dict, config) -> bool:
  return (config.model.size in CHEAP_SIZES and parsed['devices'] in (None, 1)
          and jax.device_count() == 1)


def check_memcheck(command: str, figures: dict):
  """Compares what can be recomputed cheaply with what the doc shows."""
  parsed = parse_memcheck(command)
  config = load_config(parsed)
  if 'num_params' in figures and parsed['stage'] == 'pretrain':
    assert int(figures['num_params'].replace(',', '')) == sum(
        parameter_counts(config).values()), command
  if not compiles_cheaply(parsed, config):
    return
  from mimjax.tools import memory  # pylint: disable=g-import-not-at-top
  result = memory.check(config, parsed['stage'])
  for key, printed in figures.items():
    value = result[key]
    if key == 'mesh':
      assert printed == str(value), (command, key)
    elif key in ('num_params', 'devices'):
      assert int(printed.replace(',', '')) == value, (command, key)
    elif key == 'temp_per_device':  # XLA's scheduling may drift a little
      assert abs(float(printed) - value / 2**30) <= max(
          0.001, 0.02 * value / 2**30), (command, key, value / 2**30)
    else:
      assert f'{value / 2**30:.3f}' == printed, (command, key)


# ------------------------------------------------------------ tests


def test_docs_mark_measured_figures():
  assert list(all_measured()), 'no <!-- measured: ... --> marker in docs/'


@pytest.mark.parametrize('block,command', list(all_measured()))
def test_measured_figures_match_the_code(block, command):
  assert re.search(r'\d', block), block
  module = re.search(r'-m ([\w.]+)', command)
  assert module and importlib.util.find_spec(module.group(1)), command
  if module.group(1) == 'mimjax.tools.memcheck':
    for run, figures in memcheck_runs(block, command):
      check_memcheck(run, figures)
  if module.group(1) == 'mimjax.tools.scaling':
    runs = ([command.format(**row) for row in table(block)]
            if block.lstrip().startswith('|') else [command])
    for run in runs:
      check_scaling_command(run)


# ------------------------------------------------------------ scaling


def check_scaling_command(command: str):
  """A collectives run: known flags, an existing config, and a mesh that
  has the simulated device count."""
  args = shlex.split(command)
  assert args[:3] == ['.venv/bin/python', '-m', 'mimjax.tools.scaling'], args
  flags = dict(arg.partition('=')[::2] for arg in args[3:])
  assert set(flags) <= {'--config', '--devices', '--table'} | {
      f for f in flags if f.startswith('--config.')}, flags
  if '--table' in flags:
    return
  path = flags['--config'].partition(':')[0]
  assert (ROOT / path).is_file(), path
  if '--config.mesh' in flags and '--devices' in flags:
    mesh = ast.literal_eval(flags['--config.mesh'])
    assert np.prod(mesh) == int(flags['--devices']), command


def test_flop_tables_match_the_command():
  """Every table derived by `mimjax.tools.scaling --table` is what the
  command prints now."""
  printed = scaling.tables()
  found = 0
  for name in STRICT:
    for _, block, markers in marked_blocks(
        (ROOT / 'docs' / name).read_text()):
      if any('mimjax.tools.scaling --table' in how for _, how in markers):
        shown = MARKER.sub('', block).strip()
        assert shown in printed, f'{name}: not what the command prints:\n{shown}'
        found += 1
  assert found >= 2, found


def test_cheap_measurements_are_recomputed():
  """At least one CPU memory_analysis figure is recomputed, not trusted."""
  cheap = []
  for block, command in (p.values for p in all_measured()):
    if 'mimjax.tools.memcheck' in command:
      for run, figures in memcheck_runs(block, command):
        parsed = parse_memcheck(run)
        if ('temp_per_device' in figures
            and compiles_cheaply(parsed, load_config(parsed))):
          cheap.append(run)
  assert cheap


def test_parameter_table_matches_the_models():
  """docs/scaling.md's derived parameter table, against the built models."""
  doc = (ROOT / 'docs' / 'scaling.md').read_text()
  rows = [row for _, block, _ in marked_blocks(doc)
          if block.startswith('|') and '| encoder | decoder |' in block
          for row in table(block)]
  assert [row['model'] for row in rows] == ['ViT-B', 'ViT-L', 'ViT-H']
  get_config = runpy.run_path(str(ROOT / 'configs/mae_imagenet.py'))[
      'get_config']
  for row in rows:
    counts = parameter_counts(get_config(row['model'][-1]))
    for column, value in (('encoder', counts['encoder']),
                          ('decoder', counts['decoder']),
                          ('P (pre-training)', sum(counts.values()))):
      assert row[column] == f'{value / 1e6:.1f} M', (row, column, value)


@pytest.mark.parametrize('name', STRICT)
def test_every_figure_is_measured_or_derived(name):
  unmarked = [f'{name}:{line}: {FIGURE.search(block).group(0)!r} in '
              f'{block[:70]!r}'
              for line, block, markers in
              marked_blocks((ROOT / 'docs' / name).read_text())
              if FIGURE.search(MARKER.sub('', block)) and not markers]
  assert not unmarked, '\n'.join(unmarked)


@pytest.mark.parametrize('name', STRICT)
def test_figures_say_how_to_reproduce_not_who(name):
  text = (ROOT / 'docs' / name).read_text()
  found = re.findall(r'\b(?:helper|session|reported|re-measured)\b', text,
                     re.I)
  assert not found, found


def test_marker_parsing():
  text = ('| a | b |\n|---|---|\n| 1 | 2 MB |\n\n<!-- measured: x {a} -->\n'
          '\nSo 4 MB. <!-- derived: 2 × 2 MB -->\n\nAnd 5 GB.\n')
  got = marked_blocks(text)
  assert [m for _, _, m in got] == [[('measured', 'x {a}')],
                                    [('derived', '2 × 2 MB')], []]
  assert table(got[0][1]) == [{'a': '1', 'b': '2 MB'}]
  assert FIGURE.search('111.7 M |') and FIGURE.search('0.235 GiB')
  assert not FIGURE.search('(8,1,1) 4096 images')
