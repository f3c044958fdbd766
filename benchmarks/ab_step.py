"""Variants of the recipe's train step, compiled in one process and timed in
turns (`timing.taking_turns`, as `make bench` times mimjax and its peer).

  python benchmarks/ab_step.py [--kind=pretrain|finetune] [--batch=16]
      [--timed=10] [--scan] [--quick] VARIANT [VARIANT ...]

A VARIANT is one of VARIANTS: XLA options, an attention the model traces
in place of vit.attend, the scanned model, or recipe config overrides.
The first is the baseline: for each other one it prints the ratio of the
baseline's median step time to the variant's (above 1: the variant is
faster), with its range over the rounds. Single rounds spread widely on
a small CPU (docs/performance.md): a change proves itself when every
round agrees. Each variant's compile time is printed too (--scan: of the
scanned step, the one whose compile time `make bench` aims at), after a
tiny step's, so that none carries the process's first compilation, and
what its compiled step is made of.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
from typing import Callable, NamedTuple

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention_chunks  # pylint: disable=g-import-not-at-top,wrong-import-position
import run as bench_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from timing import taking_turns  # pylint: disable=g-import-not-at-top,wrong-import-position

from mimjax.models import vit  # pylint: disable=g-import-not-at-top,wrong-import-position


class Variant(NamedTuple):
  what: str
  xla_options: dict = {}  # added to the step's own
  attend: Callable | None = None  # traced in place of vit.attend
  scan: bool | None = None  # model.scan; None: --scan's
  config: dict = {}  # recipe config overrides, by dotted path


VARIANTS = {
    'default': Variant('the step as the recipe builds it'),
    'control': Variant('the default step again, compiled apart: the spread '
                       'of two equal steps'),
    'scanned': Variant("the model's blocks in one lax.scan (model.scan=True)",
                       scan=True),
    'peer_work': Variant('fine-tuning without the work its peer skips: '
                         + bench_lib.peer_skips(),
                         config=bench_lib.PEER_SKIPS),
    'eigen': Variant('XLA:CPU matmuls through Eigen, none through YNNPACK',
                     {'xla_cpu_experimental_ynn_fusion_type': ''}),
    'eigen_dots': Variant(
        "YNNPACK's loop and reduction fusions only, its matmul fusions not",
        {'xla_cpu_experimental_ynn_fusion_type':
         'LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE'}),
    'vectors_512': Variant("XLA:CPU's loops in 512-bit vectors, not 256",
                           {'xla_cpu_prefer_vector_width': 512}),
    'plain_scheduler': Variant(
        "XLA:CPU's scheduler without its concurrency optimisation",
        {'xla_cpu_enable_concurrency_optimized_scheduler': False}),
    'chunked_attention': Variant('attention_chunks.chunked_attend, tried',
                                 attend=attention_chunks.chunked_attend),
    'fast_compile': Variant(
        "XLA:CPU's FAST_COMPILE preset",
        {'xla_cpu_opt_preset': 'CPU_OPT_PRESET_FAST_COMPILE'}),
    'legacy_emitters': Variant("XLA:CPU's loops from its older IR emitters",
                               {'xla_cpu_use_fusion_emitters': False}),
    'llvm_O0': Variant('LLVM optimisation level 0, not 1',
                       {'xla_backend_optimization_level': 0}),
}


def variant_step(name: str, kind: str, batch: int, quick: bool,
                 scan: bool | None = None):
  """run.recipe_step's tuple for the variant (scan: --scan's)."""
  variant = VARIANTS[name]
  kept = vit.attend
  vit.attend = variant.attend or kept  # read when the step traces
  try:
    return bench_lib.recipe_step(
        kind, batch, quick, variant.xla_options,
        scan if variant.scan is None else variant.scan,
        overrides=variant.config)
  finally:
    vit.attend = kept


def anatomy(held: dict) -> str:
  """What a variant's compiled step is made of, from its HLO: scanned or
  unrolled, the loops XLA generates code for, the matmuls (wherever they
  run) and how many of them YNNPACK runs, YNNPACK's fusions (matmuls, and
  the loops and reductions fused with them) and the while loops (a
  scanned model's blocks among them)."""
  text = held['compiled'].as_text()
  ynnpack = set(re.findall(
      r'calls=(%[\w.-]+)[^\n]*' + re.escape(bench_lib.YNNPACK_FUSION), text))
  in_ynnpack, computation = 0, None
  for line in text.splitlines():
    if line.endswith('{') and not line.startswith(' '):  # a computation
      computation = line.removeprefix('ENTRY ').split()[0]
    elif computation in ynnpack:
      in_ynnpack += ' dot(' in line
  return (f'{"scanned" if held["scan"] else "unrolled"}: '
          f'{text.count("kind=kLoop")} loop kernels, '
          f'{len(re.findall(r" dot[(]", text))} matmuls '
          f'({in_ynnpack} in YNNPACK), '
          f'{text.count(bench_lib.YNNPACK_FUSION)} YNNPACK fusions, '
          f'{text.count(" while(")} while loops')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('variants', nargs='+', choices=sorted(VARIANTS))
  parser.add_argument('--kind', default='pretrain',
                      choices=('pretrain', 'finetune'))
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--timed', type=int, default=10)
  parser.add_argument('--scan', action='store_true', default=None,
                      help='the scanned step (model.scan=True)')
  parser.add_argument('--quick', action='store_true', help='tiny sizes')
  args = parser.parse_args(argv)
  if len(set(args.variants)) != len(args.variants):
    parser.error('each variant once')
  bench_lib.warm_up_compiler(args.kind)
  steps, held = {}, {}
  for name in args.variants:
    _, _, steps[name], held[name] = variant_step(
        name, args.kind, args.batch, args.quick, args.scan)
  times, rounds = taking_turns(steps, 2, args.timed)
  print(f'{args.kind}, batch {args.batch}, '
        f'{jax.default_backend()}: {args.timed} timed steps each, in turns')
  for name in args.variants:
    loss = float(held[name]['metrics']['loss'])
    temp = held[name]['compiled'].memory_analysis().temp_size_in_bytes / 2**30
    print(f'  {name:17s} median {times[name][0] * 1e3:9.1f} ms, '
          f'loss {loss:.6f}, temp {temp:.3f} GiB, compile '
          f'{held[name]["compile_s"]:.1f} s  ({VARIANTS[name].what})')
    print(f'  {"":17s} {anatomy(held[name])}')
  base = args.variants[0]
  for name in args.variants[1:]:
    ratios = [r[base] / r[name] for r in rounds]
    spread = f' ± {statistics.stdev(ratios):.3f}' if len(ratios) > 1 else ''
    print(f'  {name} against {base}: {times[base][0] / times[name][0]:.3f}x '
          f'({len(ratios)} rounds: {min(ratios):.3f}x to {max(ratios):.3f}x, '
          f'mean {statistics.mean(ratios):.3f}x{spread})')


if __name__ == '__main__':
  from mimjax import host_memory  # pylint: disable=g-import-not-at-top
  os.environ.setdefault('MIMJAX_HUGE_PAGES', '1')  # as `make bench` sets it
  host_memory.reexec_with_tunables()
  main()
