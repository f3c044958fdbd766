"""Occlusion invariance of representations under complementary masking."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mimjax.analysis.cka import linear_cka


def _image_level(x: jax.Array) -> jax.Array:
  """Returns (n, d) image features, averaging tokens if x is (n, tokens, d)."""
  x = jnp.asarray(x, jnp.float32)
  if x.ndim == 3:
    return x.mean(axis=1)
  if x.ndim != 2:
    raise ValueError(f'Features need shape (n, d) or (n, t, d), got {x.shape}.')
  return x


def _mean_cosine(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)
  b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), eps)
  return jnp.mean(jnp.sum(a * b, axis=-1))


def occlusion_invariance(
    feats_a: Sequence[jax.Array],
    feats_b: Sequence[jax.Array],
) -> dict[str, jax.Array]:
  """Returns per-layer CKA and mean cosine between two views' image features."""
  if len(feats_a) != len(feats_b):
    raise ValueError(
        f'Need the same number of layers, got {len(feats_a)} and'
        f' {len(feats_b)}.')
  pairs = [(_image_level(a), _image_level(b)) for a, b in zip(feats_a, feats_b)]
  for a, b in pairs:
    if a.shape != b.shape:
      raise ValueError(f'Paired features differ in shape: {a.shape}, {b.shape}.')
  return {
      'cka': jnp.array([linear_cka(a, b) for a, b in pairs]),
      'cosine': jnp.array([_mean_cosine(a, b) for a, b in pairs]),
  }
