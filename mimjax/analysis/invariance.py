"""Occlusion invariance of representations under complementary masking.

Per layer, between the image features of two views of the same images:

- 'cka': linear CKA (full batch here; `MinibatchInvariance` streams it with
  the unbiased-HSIC minibatch estimator);
- 'cosine': the mean cosine similarity of each image's two feature vectors;
- 'cosine_centred': the same after each view's features have had that view's
  mean over all images taken off. The plain cosine is dominated by the mean
  feature every image shares (about 0.93 for any ViT, trained or not); the
  centred one measures whether the two views agree on what is particular to
  the image.
"""

from collections.abc import Sequence

from flax import struct
import jax
import jax.numpy as jnp

from mimjax import errors
from mimjax.analysis.cka import gram_matrices
from mimjax.analysis.cka import hsic_unbiased
from mimjax.analysis.cka import linear_cka


def _image_level(x: jax.Array) -> jax.Array:
  """Returns (n, d) image features, averaging tokens if x is (n, tokens, d)."""
  x = jnp.asarray(x, jnp.float32)
  if x.ndim == 3:
    return x.mean(axis=1)
  if x.ndim != 2:
    raise errors.Invalid(f'Features need shape (n, d) or (n, t, d), got '
                         f'{x.shape}.')
  return x


def _cosines(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Per-row cosine similarity of a and b (n, d) -> (n,)."""
  a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)
  b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), eps)
  return jnp.sum(a * b, axis=-1)


def _mean_cosine(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  return jnp.mean(_cosines(a, b, eps))


def _paired(feats_a, feats_b) -> list[tuple[jax.Array, jax.Array]]:
  if len(feats_a) != len(feats_b):
    raise errors.Invalid(
        f'Need the same number of layers, got {len(feats_a)} and'
        f' {len(feats_b)}.')
  pairs = [(_image_level(a), _image_level(b)) for a, b in zip(feats_a, feats_b)]
  for a, b in pairs:
    if a.shape != b.shape:
      raise errors.Invalid(f'Paired features differ in shape: {a.shape}, '
                           f'{b.shape}.')
  return pairs


def occlusion_invariance(
    feats_a: Sequence[jax.Array],
    feats_b: Sequence[jax.Array],
) -> dict[str, jax.Array]:
  """Returns per-layer CKA, mean cosine and mean centred cosine between two
  views' image features (all examples at once)."""
  pairs = _paired(feats_a, feats_b)
  return {
      'cka': jnp.array([linear_cka(a, b) for a, b in pairs]),
      'cosine': jnp.array([_mean_cosine(a, b) for a, b in pairs]),
      'cosine_centred': jnp.array([
          _mean_cosine(a - a.mean(axis=0), b - b.mean(axis=0))
          for a, b in pairs]),
  }


@struct.dataclass
class MinibatchInvariance:
  """`occlusion_invariance` accumulated over minibatches.

  CKA is the minibatch estimator with unbiased HSIC (Nguyen et al. 2021):
  per-batch HSIC sums, so it needs more than 3 examples in every batch.
  The centred cosine needs each view's mean over all the examples up front
  (a first pass over them):

    acc = MinibatchInvariance.create(means_a, means_b)  # one (d,) per layer
    for batch in ...: acc = acc.update(feats_a, feats_b)
    acc.compute()  # {'cka', 'cosine', 'cosine_centred'}: (L,) each
  """
  mean_a: tuple[jax.Array, ...]  # per layer (d,): view a's mean feature.
  mean_b: tuple[jax.Array, ...]
  xy: jax.Array  # (L,) sums over batches of HSIC(K_a, K_b), layer by layer.
  xx: jax.Array  # (L,) ... HSIC(K_a, K_a).
  yy: jax.Array  # (L,) ... HSIC(K_b, K_b).
  cosine: jax.Array  # (L,) sum over examples of cos(a, b).
  cosine_centred: jax.Array  # (L,) ... of cos(a - mean_a, b - mean_b).
  count: jax.Array  # () examples seen.

  @classmethod
  def create(cls, means_a: Sequence[jax.Array],
             means_b: Sequence[jax.Array]) -> 'MinibatchInvariance':
    """An empty accumulator; means_*: each view's mean feature per layer."""
    if len(means_a) != len(means_b):
      raise errors.Invalid(f'Need the same number of layers, got '
                           f'{len(means_a)} and {len(means_b)}.')
    zeros = jnp.zeros((len(means_a),), jnp.float32)
    as_f32 = lambda ms: tuple(jnp.asarray(m, jnp.float32) for m in ms)
    return cls(mean_a=as_f32(means_a), mean_b=as_f32(means_b), xy=zeros,
               xx=zeros, yy=zeros, cosine=zeros, cosine_centred=zeros,
               count=jnp.zeros((), jnp.float32))

  def update(self, feats_a: Sequence[jax.Array],
             feats_b: Sequence[jax.Array]) -> 'MinibatchInvariance':
    """Adds one minibatch: per layer (n, d) or (n, tokens, d), n > 3."""
    pairs = _paired(feats_a, feats_b)
    if len(pairs) != self.xy.shape[0]:
      raise errors.Invalid(f'Expected {self.xy.shape[0]} layers, got '
                           f'{len(pairs)}.')
    ka = gram_matrices([a for a, _ in pairs])
    kb = gram_matrices([b for _, b in pairs])
    centred = [
        _cosines(a - ma, b - mb)
        for (a, b), ma, mb in zip(pairs, self.mean_a, self.mean_b)]
    return self.replace(
        xy=self.xy + jax.vmap(hsic_unbiased)(ka, kb),
        xx=self.xx + jax.vmap(hsic_unbiased)(ka, ka),
        yy=self.yy + jax.vmap(hsic_unbiased)(kb, kb),
        cosine=self.cosine + jnp.array([_cosines(a, b).sum() for a, b in pairs]),
        cosine_centred=self.cosine_centred + jnp.array(
            [c.sum() for c in centred]),
        count=self.count + pairs[0][0].shape[0])

  def compute(self) -> dict[str, jax.Array]:
    """Per-layer {'cka', 'cosine', 'cosine_centred'} over all batches."""
    return {'cka': self.xy / jnp.sqrt(self.xx * self.yy),
            'cosine': self.cosine / self.count,
            'cosine_centred': self.cosine_centred / self.count}
