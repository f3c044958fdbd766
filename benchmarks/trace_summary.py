"""Where a profiled step's time goes: a jax.profiler trace summed per kind
of operation (an XLA op or kernel name without its numeric suffix).

Used by profile_step.py (CPU: XLA's operations run on host threads) and
gpu_check.py (GPU: each line of the device's timeline, such as its XLA ops
and its streams' kernels, summed on its own, since the lines repeat one
another's time). Reads only the trace's JSON, so it needs no TensorBoard.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

# Host trace events that are not XLA operations (executor, Python, runtime).
NOT_OPS = ('ThunkExecutor', '$', 'SlinkyThreadPool', 'ThreadpoolListener',
           'end:', 'PjitFunction', 'CommonPjRt', 'ParseArguments',
           'Handle input', 'TfrtCpu', 'Wait for')


def _events(trace_dir: str):
  paths = sorted(glob.glob(os.path.join(trace_dir, 'plugins', 'profile', '*',
                                        '*.trace.json.gz')))
  if not paths:
    raise FileNotFoundError(f'no *.trace.json.gz under {trace_dir}')
  with gzip.open(paths[-1]) as f:
    return json.load(f)['traceEvents']


def lines(trace_dir: str, steps: int, device: bool) -> dict:
  """{line: (seconds per step by kind, count per step by kind)}.

  device=False: one line, 'host', of every XLA operation on host threads.
  device=True: one line per thread of each GPU/TPU process, by its name.
  """
  events = _events(trace_dir)
  processes, threads = {}, {}
  for e in events:
    if e.get('ph') == 'M' and e.get('name') == 'process_name':
      processes[e['pid']] = e['args']['name']
    elif e.get('ph') == 'M' and e.get('name') == 'thread_name':
      threads[e['pid'], e.get('tid')] = e['args']['name']
  on_device = {p for p, name in processes.items()
               if re.search(r'/device:(GPU|TPU)', name)}
  out = collections.defaultdict(
      lambda: (collections.Counter(), collections.Counter()))
  for e in events:
    if e.get('ph') != 'X' or (e.get('pid') in on_device) != device:
      continue
    if device:
      line = (f'{processes[e["pid"]]} '
              f'{threads.get((e["pid"], e.get("tid")), e.get("tid"))}')
    elif e['name'].startswith(NOT_OPS):
      continue
    else:
      line = 'host'
    kind = re.sub(r'[._]\d+$', '', e['name'])
    times, counts = out[line]
    times[kind] += e['dur'] / 1e6 / steps
    counts[kind] += 1 / steps
  return dict(out)


def report(summary: dict, top: int, prefix: str = '') -> None:
  """Prints each line's top kinds: ms per step, share, count per step."""
  for line, (times, counts) in summary.items():
    total = sum(times.values())
    print(f'{prefix}{line}: {total * 1e3:.1f} ms per step in '
          f'{len(times)} kinds')
    print(f'{prefix}  {"ms/step":>9}  {"share":>6}  {"count":>6}  kind')
    for kind, t in times.most_common(top):
      print(f'{prefix}  {t * 1e3:9.2f}  {100 * t / total:5.1f}%  '
            f'{counts[kind]:6.0f}  {kind[:110]}')
