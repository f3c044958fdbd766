"""An attention tried on CPU and not kept (docs/performance.md): the batch
in chunks whose scores stay in the cache, the backward pass recomputing
each chunk's probabilities from q and k, as flash attention does, instead
of keeping them. It times the recipe's step with `vit.attend` and with
this one, compiled in one process and taken in turns, and prints their
losses, the compiled steps' temp memory and the ratio.

  python benchmarks/attention_chunks.py [--kind=pretrain|finetune]
      [--batch=16] [--chunk_bytes=8388608] [--timed=10] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from timing import taking_turns  # pylint: disable=g-import-not-at-top,wrong-import-position

from mimjax.models import vit  # pylint: disable=g-import-not-at-top,wrong-import-position


def chunked_attend(chunk_bytes: int):
  """vit.attend's function, the batch taken `rows` images at a time, where
  a chunk's float32 scores fit in `chunk_bytes` (one device)."""

  def attend(q, k, v):
    batch, heads, length, _ = q.shape
    rows = max(1, chunk_bytes // (heads * length * length * 4))
    return _attention(q, k, v, next(r for r in range(min(rows, batch), 0, -1)
                                    if batch % r == 0))
  return attend


def _probabilities(q, k):
  """The scaled q and softmax(q kᵀ / √d), in float32."""
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  scores = jnp.einsum('bhqd,bhkd->bhqk', q, k,
                      preferred_element_type=jnp.float32)
  return q, jax.nn.softmax(scores)


def _chunks(rows, *arrays):
  return zip(*([x[i:i + rows] for i in range(0, x.shape[0], rows)]
               for x in arrays))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, rows):
  return jnp.concatenate([
      jnp.einsum('bhqk,bhkd->bhqd', _probabilities(q, k)[1].astype(v.dtype), v)
      for q, k, v in _chunks(rows, q, k, v)])


def _attention_fwd(q, k, v, rows):
  return _attention(q, k, v, rows), (q, k, v)


def _attention_bwd(rows, saved, grad):
  scale = jnp.asarray(saved[0].shape[-1] ** -0.5, saved[0].dtype)
  grads = []
  for q, k, v, g in _chunks(rows, *saved, grad):
    q_scaled, p = _probabilities(q, k)
    dp = jnp.einsum('bhqd,bhkd->bhqk', g, v,
                    preferred_element_type=jnp.float32)
    p_dp = p * dp  # the softmax's backward, ds = p ⊙ (dp - Σ_k p ⊙ dp)
    ds = (p_dp - p * jnp.sum(p_dp, axis=-1, keepdims=True)).astype(q.dtype)
    grads.append((jnp.einsum('bhqk,bhkd->bhqd', ds, k) * scale,
                  jnp.einsum('bhqk,bhqd->bhkd', ds, q_scaled),
                  jnp.einsum('bhqk,bhqd->bhkd', p.astype(v.dtype), g)))
  return tuple(jnp.concatenate(parts) for parts in zip(*grads))


_attention.defvjp(_attention_fwd, _attention_bwd)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--kind', default='pretrain',
                      choices=('pretrain', 'finetune'))
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--chunk_bytes', type=int, default=8 << 20)
  parser.add_argument('--timed', type=int, default=10)
  parser.add_argument('--quick', action='store_true', help='tiny sizes')
  args = parser.parse_args(argv)
  steps, held = {}, {}
  _, _, steps['vit.attend'], held['vit.attend'] = bench_lib.recipe_step(
      args.kind, args.batch, args.quick)
  kept = vit.attend
  vit.attend = chunked_attend(args.chunk_bytes)  # read when the step traces
  try:
    _, _, steps['chunked'], held['chunked'] = bench_lib.recipe_step(
        args.kind, args.batch, args.quick)
  finally:
    vit.attend = kept
  times, rounds = taking_turns(steps, 2, args.timed)
  print(f'{args.kind}, batch {args.batch}, {jax.default_backend()}: {args.timed} timed '
        f'steps each, in turns; chunks of at most {args.chunk_bytes:,} '
        'bytes of scores')
  for name, h in held.items():
    temp = h['compiled'].memory_analysis().temp_size_in_bytes / 2**30
    print(f'  {name:10s} median {times[name][0] * 1e3:9.1f} ms, loss '
          f'{float(h["metrics"]["loss"]):.6f}, temp {temp:.3f} GiB')
  ratios = [r['vit.attend'] / r['chunked'] for r in rounds]
  spread = f' ± {statistics.stdev(ratios):.3f}' if len(ratios) > 1 else ''
  print(f'  chunked against vit.attend: '
        f'{times["vit.attend"][0] / times["chunked"][0]:.3f}x '
        f'({len(ratios)} rounds: {min(ratios):.3f}x to {max(ratios):.3f}x, '
        f'mean {statistics.mean(ratios):.3f}x{spread})')


if __name__ == '__main__':
  from mimjax import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.reexec_with_tunables()  # as `make bench` runs the step
  main()
