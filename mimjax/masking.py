"""Masking transforms: which patches each view of an image sees.

Every mask function has one signature::

    mask_fn(rng: PRNGKey, batch_size: int, num_patches: int) -> tuple[Mask, ...]

and returns one `Mask` per view (MAE: one view; the siamese form: two
complementary views). Masks are drawn independently per sample, on device, and
every sample of a view keeps the same number of patches (static shapes).
Grid-shaped masks (`block`, `grid`) need the patch grid; they take it as an
argument of their factory and check `num_patches` against it.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mimjax import errors


@flax.struct.dataclass
class Mask:
  """One view: `ids_keep` (B, K) visible patch ids in the order the encoder
  sees them; `ids_restore` (B, L) puts [visible, hidden] tokens back into
  grid order; `mask` (B, L) is 1 where hidden, 0 where visible."""
  ids_keep: jax.Array
  ids_restore: jax.Array
  mask: jax.Array

  @property
  def num_visible(self) -> int:
    return self.ids_keep.shape[1]


MaskFn = Callable[[jax.Array, int, int], tuple[Mask, ...]]


def check_ratio(ratio: float):
  if not 0.0 < ratio < 1.0:
    raise errors.Invalid(f'mask ratio must be in (0, 1), got {ratio}')


def num_kept(num_patches: int, ratio: float) -> int:
  """Visible patches per sample: int(L * (1 - r)), as the reference MAE."""
  return int(num_patches * (1 - ratio))


def from_scores(scores: jax.Array, num_keep: int) -> Mask:
  """The `num_keep` lowest-scoring patches of each row are visible."""
  ids_shuffle = jnp.argsort(scores, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  ids_keep = ids_shuffle[:, :num_keep]
  hidden = (jnp.arange(scores.shape[1]) >= num_keep).astype(jnp.float32)
  mask = jnp.take_along_axis(
      jnp.broadcast_to(hidden, scores.shape), ids_restore, axis=1)
  return Mask(ids_keep, ids_restore, mask)


def complement(mask: Mask) -> Mask:
  """The view that sees exactly the patches `mask` hides."""
  num_patches = mask.mask.shape[1]
  # The patches `mask` hides score lowest; ties keep grid order.
  scores = 1.0 - mask.mask + jnp.arange(num_patches) / (2 * num_patches)
  return from_scores(scores, num_patches - mask.num_visible)


def random(ratio: float = 0.75) -> MaskFn:
  """Reference MAE masking: per-sample argsort of uniform noise."""
  check_ratio(ratio)

  def mask_fn(rng, batch_size, num_patches):
    noise = jax.random.uniform(rng, (batch_size, num_patches))
    return (from_scores(noise, num_kept(num_patches, ratio)),)
  return mask_fn


def complementary(ratio: float = 0.75) -> MaskFn:
  """Two views: A = a random mask, B = its complement (sees what A hides)."""
  base = random(ratio)

  def mask_fn(rng, batch_size, num_patches):
    (view_a,) = base(rng, batch_size, num_patches)
    return view_a, complement(view_a)
  return mask_fn


def independent(ratio: float = 0.75, num_views: int = 2) -> MaskFn:
  """Several views, each an independent random mask."""
  base = random(ratio)

  def mask_fn(rng, batch_size, num_patches):
    keys = jax.random.split(rng, num_views)
    return tuple(base(k, batch_size, num_patches)[0] for k in keys)
  return mask_fn


def _check_grid(grid, num_patches):
  if grid[0] * grid[1] != num_patches:
    raise errors.Invalid(f'mask grid {grid} does not have {num_patches} '
                         f'patches')


def _beit_blocks(rng, grid, num_hidden, min_block, max_block, log_aspect,
                 attempts):
  """BEiT's MaskingGenerator on one (gh, gw) grid: (hidden (gh, gw) bool,
  number hidden).

  Blocks are drawn one after another until `num_hidden` patches are hidden or
  a block fails. A block gets `attempts` tries: target area ~ U(min_block,
  budget) where budget = min(patches still to hide, max_block), aspect ratio
  h / w log-uniform in exp(log_aspect), h = round(sqrt(area * aspect)), w =
  round(sqrt(area / aspect)), both strictly smaller than the grid, at a
  uniform position. The first try that would hide between 1 and `budget` new
  patches is taken. So blocks never hide more than `num_hidden` patches, and
  may hide fewer (BEiT's mask then falls short).
  """
  gh, gw = grid
  rows = jnp.arange(gh)[None, :, None]
  cols = jnp.arange(gw)[None, None, :]

  def more(state):
    _, count, stuck, _ = state
    return (count < num_hidden) & ~stuck

  def add_block(state):
    hidden, count, _, key = state
    key, k_area, k_aspect, k_top, k_left = jax.random.split(key, 5)
    budget = jnp.minimum(num_hidden - count, max_block)
    # Python's random.uniform(a, b) = a + (b - a) u, also when b < a.
    area = min_block + (budget - min_block) * jax.random.uniform(
        k_area, (attempts,))
    aspect = jnp.exp(jax.random.uniform(k_aspect, (attempts,),
                                        minval=log_aspect[0],
                                        maxval=log_aspect[1]))
    h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (h < gh) & (w < gw)
    top = jax.random.randint(k_top, (attempts,), 0,
                             jnp.maximum(gh - h + 1, 1))[:, None, None]
    left = jax.random.randint(k_left, (attempts,), 0,
                              jnp.maximum(gw - w + 1, 1))[:, None, None]
    inside = ((rows >= top) & (rows < top + h[:, None, None]) &
              (cols >= left) & (cols < left + w[:, None, None]))
    new = jnp.sum(inside & ~hidden, axis=(1, 2))
    ok = fits & (new > 0) & (new <= budget)
    first = jnp.argmax(ok)
    found = ok[first]
    hidden = hidden | (inside[first] & found)
    return hidden, count + jnp.where(found, new[first], 0), ~found, key

  hidden, count, _, _ = jax.lax.while_loop(
      more, add_block,
      (jnp.zeros((gh, gw), bool), jnp.int32(0), jnp.bool_(False), rng))
  return hidden, count


def block(grid: tuple[int, int], ratio: float = 0.4, min_block: int = 16,
          max_block: int | None = None, min_aspect: float = 0.3,
          max_aspect: float | None = None, attempts: int = 10) -> MaskFn:
  """BEiT block-wise masking (its MaskingGenerator), with an exact count.

  Blocks are drawn as BEiT draws them (see `_beit_blocks`): `min_block` is
  BEiT's min_num_patches (16 in its pre-training), `max_block` its
  max_num_patches (None: no bound but the remaining budget), aspect ratios are
  log-uniform in [min_aspect, max_aspect] (None: 1 / min_aspect, BEiT's
  default [0.3, 1 / 0.3]), `attempts` tries per block (BEiT: 10).

  Deviations, forced by static shapes (every row hides the same number):
    * the count is L - int(L * (1 - ratio)), from `ratio` like the other
      masks (BEiT's 75 of 196 patches is ratio=0.38);
    * when BEiT's blocks stop short of that count (a block finds no place in
      `attempts` tries), the rest is hidden uniformly at random among the
      patches no block covers; BEiT's mask would hide fewer. Blocks never
      overshoot the count, so nothing is ever trimmed.
  """
  check_ratio(ratio)
  max_aspect = 1 / min_aspect if max_aspect is None else max_aspect
  log_aspect = (math.log(min_aspect), math.log(max_aspect))

  def one_sample(rng, num_hidden):
    k_blocks, k_fill = jax.random.split(rng)
    hidden, _ = _beit_blocks(k_blocks, grid, num_hidden, min_block,
                             num_hidden if max_block is None else max_block,
                             log_aspect, attempts)
    # The lowest scores stay visible: block patches score above all others,
    # and the top-up takes the highest-noise patches of the rest.
    noise = jax.random.uniform(k_fill, (grid[0] * grid[1],))
    return hidden.reshape(-1).astype(jnp.float32) + 0.5 * noise

  # One compiled sampler per block(...) and count, also when called eagerly.
  sample = jax.jit(jax.vmap(one_sample, (0, None)), static_argnums=1)

  def mask_fn(rng, batch_size, num_patches):
    _check_grid(grid, num_patches)
    num_hidden = num_patches - num_kept(num_patches, ratio)
    scores = sample(jax.random.split(rng, batch_size), num_hidden)
    return (from_scores(scores, num_kept(num_patches, ratio)),)
  return mask_fn


def grid_mask(grid: tuple[int, int], stride: int = 2) -> MaskFn:
  """Keeps one patch in every stride x stride cell, at a random offset per sample."""
  gh, gw = grid
  if gh % stride or gw % stride:
    raise errors.Invalid(f'grid {grid} is not divisible by stride {stride}')

  def mask_fn(rng, batch_size, num_patches):
    _check_grid(grid, num_patches)
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing='ij')
    offsets = jax.random.randint(rng, (batch_size, 2), 0, stride)
    keep = ((rows.reshape(1, -1) % stride == offsets[:, :1]) &
            (cols.reshape(1, -1) % stride == offsets[:, 1:]))
    # Visible patches score below hidden ones; ties keep grid order.
    scores = jnp.where(keep, 0.0, 1.0) + jnp.arange(num_patches) / num_patches
    return (from_scores(scores, num_patches // stride**2),)
  return mask_fn


def given(masks: jax.Array | Sequence[jax.Array]) -> MaskFn:
  """Caller-given binary masks (1 = hidden), one (B, L) array per view.

  Every row of a view must hide the same number of patches.
  """
  masks = [masks] if getattr(masks, 'ndim', 0) == 2 else list(masks)
  views = []
  for m in masks:
    m = np.asarray(m)
    counts = (m == 0).sum(axis=1)
    if m.ndim != 2 or np.any(counts != counts[0]):
      raise errors.Invalid('given masks must be (B, L) with the same number '
                           f'of visible patches per row, got visible counts '
                           f'{counts}')
    views.append(m.astype(np.float32))

  def mask_fn(rng, batch_size, num_patches):
    del rng
    out = []
    for m in views:
      if m.shape != (batch_size, num_patches):
        raise errors.Invalid(f'given mask has shape {m.shape}, the batch needs '
                             f'{(batch_size, num_patches)}')
      num_keep = int((m[0] == 0).sum())
      scores = jnp.asarray(m) + jnp.arange(num_patches) / (2 * num_patches)
      out.append(from_scores(scores, num_keep))
    return tuple(out)
  return mask_fn


def from_noise(noise: jax.Array, ratio: float) -> Mask:
  """The reference MAE mask for given noise (B, L): keeps the lowest values."""
  check_ratio(ratio)
  return from_scores(noise, num_kept(noise.shape[1], ratio))


def none(num_views: int = 2) -> MaskFn:
  """`num_views` views that see every patch (a transform without occlusion,
  e.g. two crops: `views.crops` + `none` is SimCLR's transform)."""

  def mask_fn(rng, batch_size, num_patches):
    del rng
    ids = jnp.broadcast_to(jnp.arange(num_patches), (batch_size, num_patches))
    view = Mask(ids, ids, jnp.zeros((batch_size, num_patches), jnp.float32))
    return (view,) * num_views
  return mask_fn


def hidden_and_seen(a: Mask, b: Mask) -> jax.Array:
  """(B, L) weights: 1 where view A hides the patch and view B sees it,
  a.mask * (1 - b.mask). For complementary views this is exactly a.mask."""
  return a.mask * (1.0 - b.mask)


# Views each mask function gives (None: one per view of the view function).
NUM_VIEWS = {'random': 1, 'block': 1, 'grid': 1, 'complementary': 2,
             'independent': None, 'none': None}


def get(name: str, ratio: float = 0.75, grid: tuple[int, int] | None = None,
        num_views: int = 2) -> MaskFn:
  """A mask function by name (`NUM_VIEWS`); `grid` for 'block' and 'grid',
  `num_views` for 'independent' and 'none'."""
  makers = {
      'random': lambda: random(ratio),
      'complementary': lambda: complementary(ratio),
      'independent': lambda: independent(ratio, num_views),
      'block': lambda: block(grid, ratio),
      'grid': lambda: grid_mask(grid),
      'none': lambda: none(num_views),
  }
  if name not in makers:
    raise errors.Invalid(f'unknown mask {name!r}; known: {sorted(makers)}')
  return makers[name]()
