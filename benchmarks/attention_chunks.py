"""An attention tried on CPU and not kept (docs/performance.md), for
`ab_step.py default chunked_attention`: vit.attend's function with the
batch in chunks whose scores stay in the cache, the backward pass
recomputing each chunk's probabilities from q and k, as flash attention
does, instead of keeping them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mimjax.models import vit

# A chunk's float32 scores fit in this many bytes (read when a step traces).
CHUNK_BYTES = 8 << 20


def chunked_attend(q, k, v):
  """vit.attend in chunks of the largest number of rows (images) that
  divides the batch and whose scores fit in CHUNK_BYTES (one device)."""
  batch, heads, length, _ = q.shape
  fits = max(1, CHUNK_BYTES // (heads * length * length * 4))
  return _attention(q, k, v, next(r for r in range(min(fits, batch), 0, -1)
                                  if batch % r == 0))


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
    ds, = vit._softmax_bwd(p, dp)  # pylint: disable=protected-access
    ds = ds.astype(q.dtype)
    grads.append((jnp.einsum('bhqk,bhkd->bhqd', ds, k) * scale,
                  jnp.einsum('bhqk,bhqd->bhkd', ds, q_scaled),
                  jnp.einsum('bhqk,bhqd->bhkd', p.astype(v.dtype), g)))
  return tuple(jnp.concatenate(parts) for parts in zip(*grads))


_attention.defvjp(_attention_fwd, _attention_bwd)
