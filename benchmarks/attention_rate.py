"""Attention's forward and backward pass alone, timed in turns: mimjax's
`vit.attend` under XLA:CPU, and PyTorch's fused CPU kernel
(`scaled_dot_product_attention`, which the HF peers use) and its plain
batched products (`torch bmm`), when torch is installed.

  python benchmarks/attention_rate.py [--shapes=decoder,encoder,finetune]
      [--timed=10] [--settle=0.2] [--quick]

Shapes, at `make bench`'s batch 16 (batch, heads, tokens, head width):
`decoder`, MAE's decoder (16, 16, 197, 32), 8 blocks; `encoder`, its
encoder on the kept tokens (16, 12, 50, 64), 12 blocks; `finetune`, the
fine-tuned encoder (16, 12, 197, 64), 12 blocks. For each it prints the
milliseconds of one forward and backward pass, and that times the blocks:
the attention's share of a step, where the step's profile cannot separate
it from the other products (docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from timing import taking_turns  # pylint: disable=g-import-not-at-top,wrong-import-position

from mimjax.models import vit  # pylint: disable=g-import-not-at-top,wrong-import-position

# name: ((batch, heads, tokens, head width), blocks in the step)
SHAPES = {
    'decoder': ((16, 16, 197, 32), 8),
    'encoder': ((16, 12, 50, 64), 12),
    'finetune': ((16, 12, 197, 64), 12),
}


def _operands(shape):
  """q, k, v and the output's cotangent, as float32 NumPy arrays."""
  rng = np.random.default_rng(0)
  return [rng.standard_normal(shape, np.float32) for _ in range(4)]


def mimjax_pass(arrays):
  """A blocking forward and backward pass of vit.attend."""
  q, k, v, g = (jax.numpy.asarray(x) for x in arrays)

  @jax.jit
  def both(q, k, v, g):
    out, vjp = jax.vjp(vit.attend, q, k, v)
    return out, vjp(g)

  return lambda: jax.block_until_ready(both(q, k, v, g))


def largest_difference(torch, arrays) -> float:
  """The largest absolute difference between vit.attend's output and
  gradients and PyTorch's fused kernel's: that the two compute the same."""
  q, k, v, g = (jax.numpy.asarray(x) for x in arrays)
  out, vjp = jax.vjp(vit.attend, q, k, v)
  ours = [out, *vjp(g)]
  q, k, v = (torch.from_numpy(x).requires_grad_() for x in arrays[:3])
  theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v)
  theirs.backward(torch.from_numpy(arrays[3]))
  return max(float(np.abs(np.asarray(a) - b.detach().numpy()).max())
             for a, b in zip(ours, (theirs, q.grad, k.grad, v.grad)))


def torch_passes(torch, arrays) -> dict:
  """name -> a forward and backward pass in PyTorch: its fused kernel, and
  the same function as plain batched products."""
  q, k, v = (torch.from_numpy(x).requires_grad_() for x in arrays[:3])
  g = torch.from_numpy(arrays[3])
  scale = q.shape[-1] ** -0.5

  def fused():
    q.grad = k.grad = v.grad = None  # written afresh, not accumulated
    torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(g)

  def bmm():
    q.grad = k.grad = v.grad = None
    weights = torch.softmax((q * scale) @ k.transpose(-1, -2), dim=-1)
    (weights @ v).backward(g)

  return {'torch sdpa': fused, 'torch bmm': bmm}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shapes', default=','.join(SHAPES))
  parser.add_argument('--timed', type=int, default=10)
  parser.add_argument('--settle', type=float, default=0.2,
                      help="seconds' sleep before each turn, for the last "
                      "library's threads to stop spinning")
  parser.add_argument('--quick', action='store_true', help='tiny sizes')
  args = parser.parse_args(argv)
  for name in args.shapes.split(','):
    if name not in SHAPES:
      parser.error(f'--shapes: {name!r} is none of {", ".join(SHAPES)}')
  torch = bench_lib.import_torch()
  host = bench_lib.host_cpu()
  print(f'attention forward + backward on {host["model"]}, {host["cores"]} '
        f'cores, {jax.default_backend()}: the median of {args.timed} passes '
        'each, in turns')
  for name in args.shapes.split(','):
    shape, blocks = SHAPES[name]
    if args.quick:
      shape = (2, 2, shape[2] // 8, 8)
    arrays = _operands(shape)
    passes = {'mimjax': mimjax_pass(arrays)}
    if torch is not None:
      passes.update(torch_passes(torch, arrays))
    times, _ = taking_turns(passes, 2, args.timed, settle_s=args.settle)
    agree = (f' (mimjax and torch sdpa differ by at most '
             f'{largest_difference(torch, arrays):.1e})' if torch is not None
             else '')
    print(f'  {name} {shape}, {blocks} blocks{agree}:')
    for library, (median, *_) in times.items():
      print(f'    {library:11s} {median * 1e3:8.2f} ms a pass, '
            f'{median * blocks * 1e3:8.1f} ms a step')


if __name__ == '__main__':
  from mimjax import host_memory  # pylint: disable=g-import-not-at-top
  os.environ.setdefault('MIMJAX_HUGE_PAGES', '1')  # as `make bench` sets it
  host_memory.reexec_with_tunables()
  main()
