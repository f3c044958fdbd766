"""Where a train step's time goes: a jax.profiler trace of the recipe's real
step (as `make bench` builds it), summed per kind of XLA operation.

  python benchmarks/profile_step.py [--kind=pretrain|finetune] [--batch=16]
      [--steps=2] [--top=15] [--trace_dir=DIR] [--scan] [--compile]

Prints, per step (trace_summary.report): the time of each operation kind
(an XLA op name without its numeric suffix: `ynn_fusion` is a matmul or
reduction run by YNNPACK, `dot` a matmul run by Eigen, `*_fusion` XLA's own
loops), its share of all operation time, and how often it ran; then the
wall time. Operation times on different threads overlap, so their sum can
exceed the wall time. The trace stays in
--trace_dir for TensorBoard's profile plugin (docs/performance.md).

--scan takes the scanned step (model.scan=True). --compile traces the
step's compilation instead of its steps: XLA's passes, its loop emitters
and LLVM, whose events nest, so that a kind's time includes the kinds it
calls.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
import trace_summary  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--kind', default='pretrain',
                      choices=('pretrain', 'finetune'))
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--steps', type=int, default=2)
  parser.add_argument('--top', type=int, default=15)
  parser.add_argument('--quick', action='store_true', help='tiny sizes')
  parser.add_argument('--trace_dir', default='')
  parser.add_argument('--compile', action='store_true',
                      help="trace the step's compilation, not its steps")
  parser.add_argument('--scan', action='store_true', default=None,
                      help='the scanned step (model.scan=True)')
  args = parser.parse_args(argv)
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix='mimjax_profile_')
  if args.compile:
    _profile_compile(args, trace_dir)
    return
  bench, dtype, step, _ = bench_lib.recipe_step(args.kind, args.batch,
                                                args.quick, scan=args.scan)
  for _ in range(2):  # warm up
    step()

  jax.profiler.start_trace(trace_dir)
  start = time.perf_counter()
  for _ in range(args.steps):
    step()
  wall = (time.perf_counter() - start) / args.steps
  jax.profiler.stop_trace()

  print(f'{bench.name}{" --quick (tiny sizes)" if args.quick else ""}, '
        f'batch {args.batch}, {dtype}, on '
        f'{jax.devices()[0].device_kind}: {args.steps} profiled steps '
        '(operations on different threads overlap)')
  trace_summary.report(
      trace_summary.lines(trace_dir, args.steps, device=False), args.top,
      prefix='  ')
  print(f'  wall time per step: {wall * 1e3:.1f} ms')
  print(f'trace: {trace_dir} (tensorboard --logdir {trace_dir})')


def _profile_compile(args, trace_dir: str) -> None:
  bench_lib.warm_up_compiler(args.kind)
  bench, dtype, _, holder = bench_lib.recipe_step(
      args.kind, args.batch, args.quick, scan=args.scan,
      compile_trace_dir=trace_dir)
  print(f'{bench.name}{" --quick (tiny sizes)" if args.quick else ""}, '
        f'batch {args.batch}, {dtype}, on {jax.devices()[0].device_kind}: '
        f'compiling the {"scanned" if args.scan else "unrolled"} step took '
        f'{holder["compile_s"]:.2f} s; its traced events (they nest, and '
        'run on several threads):')
  (times, counts), = trace_summary.lines(trace_dir, 1, device=False).values()
  print(f'  {"seconds":>8}  {"count":>6}  event')
  for kind, t in times.most_common(args.top):
    print(f'  {t:8.3f}  {counts[kind]:6.0f}  {kind[:110]}')
  print(f'trace: {trace_dir} (tensorboard --logdir {trace_dir})')


if __name__ == '__main__':
  from mimjax import host_memory  # pylint: disable=g-import-not-at-top
  os.environ.setdefault('MIMJAX_HUGE_PAGES', '1')  # as `make bench` sets it
  host_memory.reexec_with_tunables()
  main()
