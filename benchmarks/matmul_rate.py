"""The matmul rate of each library this host runs, timed in turns: XLA:CPU's
products through YNNPACK (its default) and through Eigen, PyTorch's (when
installed) and NumPy's; float32 and bfloat16.

  python benchmarks/matmul_rate.py [--shapes=square,mlp,...] [--timed=10]
      [--dtypes=float32,bfloat16] [--settle=0.5]

Shapes: `square`, 2048 x 2048 x 2048; `mlp`, the fine-tuned ViT-B/16's MLP
at batch 16, (16*197, 768) @ (768, 3072); `weight_grad`, that kernel's
gradient, (16*197, 768)^T @ (16*197, 3072), a product whose operands
XLA:CPU lays out for Eigen; `scores`, its attention's 16*12 batched
(197, 64) @ (64, 197) products. Two are pre-training's:
`encoder_mlp`, the MAE encoder's MLP on the kept tokens,
(16*50, 768) @ (768, 3072), and `decoder_mlp`, its decoder's,
(16*197, 512) @ (512, 2048). It answers what the step's profile
cannot: how fast each library runs the products the step is made of on
this CPU, and whether bfloat16 reaches the CPU's matrix units (AMX) in
either framework (docs/performance.md). An XLA library is timed only
where the compiled product runs in it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from timing import taking_turns  # pylint: disable=g-import-not-at-top,wrong-import-position

TOKENS = 16 * 197
KEPT = 16 * 50  # MAE's encoder: 49 of 196 patches kept, and the cls token
# name: (left operand's shape, right operand's, whether the left one is
# used transposed).
SHAPES = {
    'square': ((2048, 2048), (2048, 2048), False),
    'mlp': ((TOKENS, 768), (768, 3072), False),
    'weight_grad': ((TOKENS, 768), (TOKENS, 3072), True),
    'scores': ((16 * 12, 197, 64), (16 * 12, 64, 197), False),
    'encoder_mlp': ((KEPT, 768), (768, 3072), False),
    'decoder_mlp': ((TOKENS, 512), (512, 2048), False),
}
# library: (the XLA options, whether the product is then a YNNPACK fusion;
# XLA:CPU runs a large product that is not one in Eigen).
XLA_LIBRARIES = {
    'YNNPACK': ({}, True),
    'Eigen': ({'xla_cpu_experimental_ynn_fusion_type': ''}, False),
}


def flop(shape: str) -> int:
  """The product's FLOPs: 2 x the left operand's size x the right one's
  last dimension, transposed or not."""
  left, right, _ = SHAPES[shape]
  return 2 * math.prod(left) * right[-1]


def _product(shape: str):
  """The product and its two float32 operands, the same for every library
  (x.T and @ mean the same in jax, torch and NumPy)."""
  left, right, transposed = SHAPES[shape]
  rng = np.random.default_rng(0)
  operands = [rng.standard_normal(s, np.float32) for s in (left, right)]
  product = (lambda x, y: x.T @ y) if transposed else (lambda x, y: x @ y)
  return product, operands


def _xla_step(product, operands, dtype: str, library: str):
  options, in_ynnpack = XLA_LIBRARIES[library]
  a, b = (jnp.asarray(x, dtype) for x in operands)
  compiled = jax.jit(product).lower(a, b).compile(options)
  if (bench_lib.YNNPACK_FUSION in compiled.as_text()) != in_ynnpack:
    return None
  return lambda: compiled(a, b).block_until_ready()


def steps_for(shape: str, dtype: str, torch) -> dict:
  """library -> a blocking call of the product; an XLA library left out
  where this jaxlib does not run the product in it."""
  product, operands = _product(shape)
  steps = {f'jax {lib}': _xla_step(product, operands, dtype, lib)
           for lib in XLA_LIBRARIES}
  steps = {lib: step for lib, step in steps.items() if step is not None}
  if torch is not None:
    a, b = (torch.from_numpy(x).to(getattr(torch, dtype)) for x in operands)
    steps['torch'] = lambda: product(a, b)
  if dtype == 'float32':  # NumPy has no bfloat16 matmul of its own
    steps['numpy'] = lambda: product(*operands)
  return steps


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shapes', default=','.join(SHAPES))
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--timed', type=int, default=10)
  parser.add_argument('--settle', type=float, default=0.5,
                      help="seconds' sleep before each turn, for the last "
                      "library's threads to stop spinning")
  args = parser.parse_args(argv)
  shapes, dtypes = args.shapes.split(','), args.dtypes.split(',')
  for name in shapes:
    if name not in SHAPES:
      parser.error(f'--shapes: {name!r} is none of {", ".join(SHAPES)}')
  for name in dtypes:
    if name not in ('float32', 'bfloat16'):
      parser.error(f'--dtypes: {name!r} is neither float32 nor bfloat16')
  torch = bench_lib.import_torch()
  host = bench_lib.host_cpu()
  print(f'matmul rates on {host["model"]}, {host["cores"]} cores '
        f'({", ".join(host["isa"]) or "no listed ISA"}): the median of '
        f'{args.timed} products each, in turns')
  print(f'  jax {jax.__version__}'
        + (f', torch {torch.__version__}' if torch is not None else
           ', no torch') + f', numpy {np.__version__}')
  for shape in shapes:
    for dtype in dtypes:
      times, _ = taking_turns(steps_for(shape, dtype, torch), 2, args.timed,
                              settle_s=args.settle)
      rates = '  '.join(f'{lib} {flop(shape) / t[0] / 1e9:6.1f}'
                        for lib, t in times.items())
      print(f'  {shape:11s} {dtype:8s} GFLOP/s: {rates}')


if __name__ == '__main__':
  main()
