"""Centered kernel alignment (CKA) for comparing representations."""

from collections.abc import Sequence
from typing import Literal

from flax import struct
import jax
import jax.numpy as jnp

from mimjax import errors

Features = jax.Array | Sequence[jax.Array]


def _flatten(x: jax.Array) -> jax.Array:
  """Casts to float32 and flattens all but the leading (example) axis."""
  x = jnp.asarray(x, jnp.float32)
  if x.ndim < 2:
    raise errors.Invalid(f'Features need shape (n, ...), got {x.shape}.')
  return x.reshape(x.shape[0], -1)


def _check_same_n(x: jax.Array, y: jax.Array) -> None:
  if x.shape[0] != y.shape[0]:
    raise errors.Invalid(
        f'x and y need the same number of examples, got {x.shape[0]} and'
        f' {y.shape[0]}.')


def linear_cka(
    x: jax.Array,
    y: jax.Array,
    method: Literal['auto', 'gram', 'feature'] = 'auto',
) -> jax.Array:
  """Returns the linear CKA between x (n, ...) and y (n, ...)."""
  x, y = _flatten(x), _flatten(y)
  _check_same_n(x, y)
  x = x - x.mean(axis=0)
  y = y - y.mean(axis=0)
  (n, p1), p2 = x.shape, y.shape[1]
  if method == 'auto':
    # Gram form costs ~n^2 (p1 + p2), feature form ~n (p1 p2 + p1^2 + p2^2).
    method = 'gram' if n * (p1 + p2) < p1 * p2 + p1**2 + p2**2 else 'feature'
  if method == 'gram':
    # ||y^T x||_F^2 = <x x^T, y y^T>_F, and likewise for the norms.
    kx, ky = x @ x.T, y @ y.T
    xy, xx, yy = jnp.vdot(kx, ky), jnp.vdot(kx, kx), jnp.vdot(ky, ky)
  elif method == 'feature':
    xy = jnp.sum(jnp.square(y.T @ x))
    xx = jnp.sum(jnp.square(x.T @ x))
    yy = jnp.sum(jnp.square(y.T @ y))
  else:
    raise errors.Invalid(f'Unknown method {method!r}.')
  return xy / jnp.sqrt(xx * yy)


def cka_matrix(feats_a: Sequence[jax.Array],
               feats_b: Sequence[jax.Array]) -> jax.Array:
  """Returns the (La, Lb) full-batch linear CKA heatmap between two layer lists."""
  return jnp.array([[linear_cka(a, b) for b in feats_b] for a in feats_a])


def hsic_unbiased(k: jax.Array, l: jax.Array) -> jax.Array:
  """Returns the unbiased HSIC estimate (Song et al. 2012) from (n, n) Grams."""
  n = k.shape[0]
  if k.shape != (n, n) or l.shape != (n, n):
    raise errors.Invalid(f'Need two (n, n) Gram matrices, got {k.shape}, '
                         f'{l.shape}.')
  if n <= 3:
    raise errors.Invalid(f'Unbiased HSIC needs n > 3 examples, got n={n}.')
  off_diag = 1.0 - jnp.eye(n, dtype=k.dtype)
  k, l = k * off_diag, l * off_diag
  # HSIC_1 = [tr(KL) + 1'K1 1'L1 / ((n-1)(n-2)) - 2/(n-2) 1'KL1] / (n(n-3)),
  # with zero-diagonal K, L; tr(KL) = sum(K * L^T), 1'KL1 = (1'K)(L1).
  trace_kl = jnp.sum(k * l.T)
  sums = jnp.sum(k) * jnp.sum(l) / ((n - 1) * (n - 2))
  cross = 2.0 / (n - 2) * jnp.dot(k.sum(axis=0), l.sum(axis=1))
  return (trace_kl + sums - cross) / (n * (n - 3))


def _as_layers(feats: Features) -> list[jax.Array]:
  if isinstance(feats, (list, tuple)):
    return [_flatten(f) for f in feats]
  return [_flatten(feats)]


def gram_matrices(feats: Features) -> jax.Array:
  """Returns stacked linear-kernel Gram matrices (L, n, n), one per layer.

  Each layer's features are centred over the n examples first. Unbiased HSIC
  does not change when the features are translated, so this changes no
  estimate; it keeps float32 Grams precise when the features share a large
  mean (as a ViT's image features do).
  """
  layers = [f - f.mean(axis=0) for f in _as_layers(feats)]
  return jnp.stack([f @ f.T for f in layers])



@struct.dataclass
class MinibatchCKA:
  """Running unbiased-HSIC sums for a (La, Lb) minibatch CKA heatmap.

  Usage:
    acc = MinibatchCKA.create(len(feats_a), len(feats_b))
    for batch in ...: acc = acc.update(feats_a, feats_b)
    heatmap = acc.compute()  # (La, Lb)

  Single arrays count as one layer, so `compute()[0, 0]` is the pair's CKA.
  """
  xy: jax.Array  # (La, Lb) sum over batches of HSIC(K_a, L_b).
  xx: jax.Array  # (La,) sum over batches of HSIC(K_a, K_a).
  yy: jax.Array  # (Lb,) sum over batches of HSIC(L_b, L_b).

  @classmethod
  def create(cls, num_layers_a: int = 1,
             num_layers_b: int | None = None) -> 'MinibatchCKA':
    """Returns an empty accumulator."""
    num_layers_b = num_layers_a if num_layers_b is None else num_layers_b
    return cls(xy=jnp.zeros((num_layers_a, num_layers_b), jnp.float32),
               xx=jnp.zeros((num_layers_a,), jnp.float32),
               yy=jnp.zeros((num_layers_b,), jnp.float32))

  def update(self, feats_a: Features, feats_b: Features) -> 'MinibatchCKA':
    """Returns the accumulator with one minibatch of features added."""
    return self.update_grams(gram_matrices(feats_a), gram_matrices(feats_b))

  def update_grams(self, ka: jax.Array, kb: jax.Array) -> 'MinibatchCKA':
    """`update` from Gram matrices (La, n, n) and (Lb, n, n), as
    `gram_matrices` returns: one encoder's Grams serve all its pairs."""
    _check_same_n(ka[0], kb[0])
    if (ka.shape[0], kb.shape[0]) != self.xy.shape:
      raise errors.Invalid(
          f'Expected {self.xy.shape} layers, got ({ka.shape[0]}, '
          f'{kb.shape[0]}).')
    hsic_rows = jax.vmap(hsic_unbiased, in_axes=(None, 0))
    hsic_grid = jax.vmap(hsic_rows, in_axes=(0, None))
    return self.replace(
        xy=self.xy + hsic_grid(ka, kb),
        xx=self.xx + jax.vmap(hsic_unbiased)(ka, ka),
        yy=self.yy + jax.vmap(hsic_unbiased)(kb, kb))

  def compute(self) -> jax.Array:
    """Returns the (La, Lb) CKA heatmap from the accumulated sums."""
    return self.xy / jnp.sqrt(self.xx[:, None] * self.yy[None, :])
