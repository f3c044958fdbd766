"""Tests for mimjax.masking: which patches each view sees."""

import math
import random as pyrandom
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimjax import masking
from mimjax import mim
from mimjax import objectives
from mimjax.models import Encoder


def _np(mask: masking.Mask):
  return (np.asarray(mask.ids_keep), np.asarray(mask.ids_restore),
          np.asarray(mask.mask))


def _check_consistent(mask: masking.Mask, num_patches: int, num_keep: int):
  """Shapes, counts and the three fields of a Mask agree with each other."""
  ids_keep, ids_restore, m = _np(mask)
  b = m.shape[0]
  assert ids_keep.shape == (b, num_keep)
  assert ids_restore.shape == (b, num_patches)
  assert m.shape == (b, num_patches)
  assert mask.num_visible == num_keep
  # Binary, 1 = hidden, exactly L - K hidden per row.
  assert set(np.unique(m)) <= {0.0, 1.0}
  np.testing.assert_array_equal(m.sum(axis=1), num_patches - num_keep)
  # The visible ids are distinct, and exactly the positions with mask 0.
  for i in range(b):
    assert len(set(ids_keep[i].tolist())) == num_keep
    np.testing.assert_array_equal(np.sort(ids_keep[i]),
                                  np.flatnonzero(m[i] == 0))
  np.testing.assert_array_equal(np.take_along_axis(m, ids_keep, axis=1), 0.0)
  # ids_restore is a permutation of the grid.
  np.testing.assert_array_equal(np.sort(ids_restore, axis=1),
                                np.broadcast_to(np.arange(num_patches),
                                                (b, num_patches)))
  # Restoring [visible tokens, hidden tokens] gives back the grid order.
  # The hidden tokens come in the shuffle order that ids_restore inverts.
  ids_shuffle = np.argsort(ids_restore, axis=1)
  np.testing.assert_array_equal(ids_shuffle[:, :num_keep], ids_keep)
  tokens = np.broadcast_to(np.arange(num_patches), (b, num_patches))
  visible = np.take_along_axis(tokens, ids_keep, axis=1)
  hidden = np.take_along_axis(tokens, ids_shuffle[:, num_keep:], axis=1)
  for i in range(b):
    np.testing.assert_array_equal(np.sort(hidden[i]),
                                  np.flatnonzero(m[i] == 1))
  restored = np.take_along_axis(np.concatenate([visible, hidden], axis=1),
                                ids_restore, axis=1)
  np.testing.assert_array_equal(restored, tokens)
  # Where ids_restore points into the visible segment the patch is visible.
  np.testing.assert_array_equal(ids_restore >= num_keep, m == 1)
  # The decoder's recipe with mask tokens: visible tokens land at their own
  # grid position, every hidden position gets a mask token (-1).
  filled = np.concatenate(
      [visible, -np.ones((b, num_patches - num_keep), visible.dtype)], axis=1)
  restored = np.take_along_axis(filled, ids_restore, axis=1)
  np.testing.assert_array_equal(restored, np.where(m == 1, -1, tokens))


# ----------------------------------------------------------------- random


@pytest.mark.parametrize('num_patches,ratio,num_keep',
                         [(64, 0.75, 16), (196, 0.75, 49), (49, 0.6, 19),
                          (64, 0.5, 32), (16, 0.9, 1)])
def test_random_exact_counts(num_patches, ratio, num_keep):
  assert masking.num_kept(num_patches, ratio) == num_keep
  (mask,) = masking.random(ratio)(jax.random.key(0), 8, num_patches)
  _check_consistent(mask, num_patches, num_keep)


def test_random_differs_across_samples_and_keys():
  fn = masking.random(0.75)
  (a,) = fn(jax.random.key(0), 8, 64)
  (b,) = fn(jax.random.key(1), 8, 64)
  m_a, m_b = np.asarray(a.mask), np.asarray(b.mask)
  rows = {tuple(r) for r in m_a.astype(int).tolist()}
  assert len(rows) == 8, 'two samples of one batch got the same mask'
  assert not np.array_equal(m_a, m_b)
  # Every row differs from the other key's row.
  assert np.all(np.any(m_a != m_b, axis=1))
  # Same key, same masks.
  (c,) = fn(jax.random.key(0), 8, 64)
  np.testing.assert_array_equal(np.asarray(c.ids_keep), np.asarray(a.ids_keep))


def test_random_is_roughly_uniform_over_positions():
  (mask,) = masking.random(0.75)(jax.random.key(3), 4096, 64)
  freq = np.asarray(mask.mask).mean(axis=0)
  # Binomial std at n=4096, p=0.75 is ~0.007.
  np.testing.assert_allclose(freq, 0.75, atol=0.04)


def test_from_noise_matches_reference_mae():
  """Reference MAE random_masking: argsort of the noise, keep the lowest."""
  noise = np.asarray(jax.random.uniform(jax.random.key(5), (6, 49)))
  mask = masking.from_noise(jnp.asarray(noise), 0.75)
  len_keep = int(49 * (1 - 0.75))
  ids_shuffle = np.argsort(noise, axis=1)
  ids_restore = np.argsort(ids_shuffle, axis=1)
  ref = np.ones((6, 49), np.float32)
  ref[:, :len_keep] = 0
  ref = np.take_along_axis(ref, ids_restore, axis=1)
  ids_keep, restore, m = _np(mask)
  np.testing.assert_array_equal(ids_keep, ids_shuffle[:, :len_keep])
  np.testing.assert_array_equal(restore, ids_restore)
  np.testing.assert_array_equal(m, ref)


# ---------------------------------------------------------- complementary


@pytest.mark.parametrize('num_patches,ratio', [(64, 0.75), (49, 0.6),
                                               (196, 0.5)])
def test_complementary_partitions_the_grid(num_patches, ratio):
  views = masking.complementary(ratio)(jax.random.key(1), 8, num_patches)
  assert len(views) == 2
  a, b = views
  k = masking.num_kept(num_patches, ratio)
  _check_consistent(a, num_patches, k)
  _check_consistent(b, num_patches, num_patches - k)
  m_a, m_b = np.asarray(a.mask), np.asarray(b.mask)
  np.testing.assert_array_equal(m_a + m_b, 1.0)
  ids_b = np.asarray(b.ids_keep)
  for i in range(8):
    assert set(ids_b[i].tolist()) == set(np.flatnonzero(m_a[i] == 1).tolist())


def test_complement_of_given_mask():
  (a,) = masking.random(0.75)(jax.random.key(2), 4, 64)
  b = masking.complement(a)
  np.testing.assert_array_equal(np.asarray(b.mask), 1 - np.asarray(a.mask))
  # Complementing twice gives back the original visible set.
  c = masking.complement(b)
  np.testing.assert_array_equal(np.asarray(c.mask), np.asarray(a.mask))


def test_independent_views():
  views = masking.independent(0.75, num_views=3)(jax.random.key(4), 8, 64)
  assert len(views) == 3
  for v in views:
    _check_consistent(v, 64, 16)
  masks = [np.asarray(v.mask) for v in views]
  assert not np.array_equal(masks[0], masks[1])
  assert not np.array_equal(masks[1], masks[2])


# ------------------------------------------------------------------ block


def _hidden_neighbour_fraction(mask, grid):
  """Mean, over hidden patches, of the fraction of their 4-neighbours that
  are hidden too."""
  m = np.asarray(mask).reshape(-1, *grid).astype(bool)
  pad = np.pad(m, ((0, 0), (1, 1), (1, 1)))
  valid = np.pad(np.ones_like(m), ((0, 0), (1, 1), (1, 1)))
  hidden_nb = sum(np.roll(pad, s, axis=a) for a in (1, 2) for s in (1, -1))
  count_nb = sum(np.roll(valid, s, axis=a) for a in (1, 2) for s in (1, -1))
  hidden_nb = hidden_nb[:, 1:-1, 1:-1]
  count_nb = count_nb[:, 1:-1, 1:-1]
  return float((hidden_nb / count_nb)[m].mean())


@pytest.mark.parametrize('grid,ratio', [((14, 14), 0.4), ((8, 8), 0.6)])
def test_block_exact_count_and_clustered(grid, ratio):
  num_patches = grid[0] * grid[1]
  k = masking.num_kept(num_patches, ratio)
  (mask,) = masking.block(grid, ratio)(jax.random.key(0), 16, num_patches)
  _check_consistent(mask, num_patches, k)
  m = np.asarray(mask.mask)
  assert len({tuple(r) for r in m.astype(int).tolist()}) == 16
  (rand,) = masking.random(ratio)(jax.random.key(0), 16, num_patches)
  clustered = _hidden_neighbour_fraction(m, grid)
  scattered = _hidden_neighbour_fraction(rand.mask, grid)
  # Random masks: a hidden patch's neighbour is hidden with probability ~r.
  assert abs(scattered - ratio) < 0.1
  # Blocks: most of a hidden patch's neighbours are hidden too (measured
  # ~0.6-0.7 of the way from the random level to 1).
  assert (clustered - scattered) / (1 - scattered) > 0.4, (clustered, scattered)


def test_block_checks_grid():
  with pytest.raises(ValueError, match='49'):
    masking.block((8, 8), 0.4)(jax.random.key(0), 2, 49)


def _beit_reference(rng, grid, num_hidden, min_block=16, min_aspect=0.3):
  """BEiT's MaskingGenerator (beit/masking_generator.py), restated in numpy:
  returns its (gh, gw) 0/1 mask, which may hide fewer than `num_hidden`."""
  gh, gw = grid
  lo, hi = math.log(min_aspect), math.log(1 / min_aspect)
  mask = np.zeros(grid, int)
  while mask.sum() < num_hidden:
    budget = num_hidden - mask.sum()
    for _ in range(10):
      area = rng.uniform(min_block, budget)
      aspect = math.exp(rng.uniform(lo, hi))
      h = int(round(math.sqrt(area * aspect)))
      w = int(round(math.sqrt(area / aspect)))
      if h < gh and w < gw:
        top, left = rng.randint(0, gh - h), rng.randint(0, gw - w)
        window = mask[top:top + h, left:left + w]
        if 0 < h * w - window.sum() <= budget:
          window[:] = 1
          break
    else:
      break  # No try placed a block: BEiT stops short.
  return mask


def _components(masks):
  """Mean number of 4-connected hidden regions per (gh, gw) mask."""
  counts = []
  for m in masks:
    seen, regions = np.zeros_like(m, bool), 0
    for start in zip(*np.nonzero(m)):
      if seen[start]:
        continue
      regions += 1
      stack = [start]
      seen[start] = True
      while stack:
        i, j = stack.pop()
        for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
          if (0 <= a < m.shape[0] and 0 <= b < m.shape[1] and m[a, b]
              and not seen[a, b]):
            seen[a, b] = True
            stack.append((a, b))
    counts.append(regions)
  return float(np.mean(counts))


def _blocks_only(rng, batch_size, grid, ratio):
  """What `block`'s rectangles alone hide, per row, for the keys `block`
  itself uses: (B, gh, gw) bool and (B,) counts."""
  num_patches = grid[0] * grid[1]
  num_hidden = num_patches - masking.num_kept(num_patches, ratio)
  aspect = (math.log(0.3), math.log(1 / 0.3))
  draw = masking._beit_blocks  # pylint: disable=protected-access
  blocks = jax.vmap(lambda k: draw(jax.random.split(k)[0], grid, num_hidden,
                                   16, num_hidden, aspect, 10))
  hidden, count = blocks(jax.random.split(rng, batch_size))
  return np.asarray(hidden), np.asarray(count), num_hidden


def test_block_draws_like_beit():
  grid, ratio, n = (14, 14), 0.4, 1000
  hidden, count, num_hidden = _blocks_only(jax.random.key(0), n, grid, ratio)
  py = pyrandom.Random(0)
  ref = np.stack([_beit_reference(py, grid, num_hidden) for _ in range(n)])
  ref_count = ref.sum(axis=(1, 2))
  # Blocks never overshoot; BEiT falls short of the count in about a third of
  # masks at 79 of 196 (measured 0.354 in 2,000 reference draws, mostly by 1
  # or 2 patches). Standard error of each fraction here: ~0.015.
  np.testing.assert_array_equal(hidden.sum(axis=(1, 2)), count)
  assert count.max() == num_hidden and ref_count.max() == num_hidden
  short = np.mean(count < num_hidden)
  ref_short = np.mean(ref_count < num_hidden)
  assert abs(short - ref_short) < 0.07, (short, ref_short)
  assert abs(count.mean() - ref_count.mean()) < 0.3
  # Same shapes: number of separate hidden regions (measured ~1.4 for both),
  # and how often the centre and a corner patch are hidden.
  assert abs(_components(hidden) - _components(ref)) < 0.15
  for i, j in [(7, 7), (0, 0)]:
    assert abs(hidden[:, i, j].mean() - ref[:, i, j].mean()) < 0.06, (i, j)


def test_block_hides_every_block_patch_then_tops_up():
  grid, ratio, b = (14, 14), 0.4, 64
  key = jax.random.key(3)
  (mask,) = masking.block(grid, ratio)(key, b, 196)
  m = np.asarray(mask.mask).reshape(b, *grid).astype(bool)
  hidden, count, num_hidden = _blocks_only(key, b, grid, ratio)
  assert (count < num_hidden).any() and (count == num_hidden).any()
  assert (m | ~hidden).all()  # Every patch a block covers is hidden.
  np.testing.assert_array_equal(m.sum(axis=(1, 2)), num_hidden)
  full = count == num_hidden
  np.testing.assert_array_equal(m[full], hidden[full])


def test_block_stuck_grid_is_all_top_up():
  # On a 3 x 3 grid no block of >= 8 patches is strictly smaller than the
  # grid: BEiT would hide nothing; the exact count comes from the top-up.
  hidden, count, num_hidden = _blocks_only(jax.random.key(0), 8, (3, 3), 0.8)
  assert num_hidden == 8 and not hidden.any() and not count.any()
  (mask,) = masking.block((3, 3), 0.8)(jax.random.key(0), 8, 9)
  _check_consistent(mask, 9, 1)
  assert len({tuple(r) for r in np.asarray(mask.ids_keep).tolist()}) > 1


def test_block_parameters():
  # Squares of exactly 16 patches: the one block is a 4 x 4 square.
  fn = masking.block((8, 8), 0.25, min_block=16, max_block=16,
                     min_aspect=1.0, max_aspect=1.0)
  (mask,) = fn(jax.random.key(0), 16, 64)
  for row in np.asarray(mask.mask).reshape(16, 8, 8):
    rows, cols = np.nonzero(row)
    assert len(rows) == 16
    assert np.ptp(rows) == 3 and np.ptp(cols) == 3
  # max_block caps what each block adds: many more, smaller regions.
  few = masking.block((14, 14), 0.4)(jax.random.key(0), 64, 196)[0]
  many = masking.block((14, 14), 0.4, max_block=4)(jax.random.key(0), 64,
                                                     196)[0]
  few_r = _components(np.asarray(few.mask).reshape(-1, 14, 14).astype(bool))
  many_r = _components(np.asarray(many.mask).reshape(-1, 14, 14).astype(bool))
  assert many_r > 3 * few_r, (few_r, many_r)


# ------------------------------------------------------------------- grid


@pytest.mark.parametrize('grid', [(8, 8), (4, 6)])
def test_grid_mask_one_per_cell(grid):
  gh, gw = grid
  num_patches = gh * gw
  (mask,) = masking.grid_mask(grid)(jax.random.key(0), 32, num_patches)
  _check_consistent(mask, num_patches, num_patches // 4)
  visible = 1 - np.asarray(mask.mask).reshape(32, gh // 2, 2, gw // 2, 2)
  np.testing.assert_array_equal(visible.sum(axis=(2, 4)), 1)
  # The kept offset inside the cell is the same for all cells of a sample
  # and varies across samples.
  offsets = visible.reshape(32, gh // 2, 2, gw // 2, 2).transpose(0, 1, 3, 2, 4)
  offsets = offsets.reshape(32, -1, 4).argmax(-1)
  assert np.all(offsets == offsets[:, :1])
  assert len(np.unique(offsets[:, 0])) > 1


def test_grid_mask_rejects_bad_grids():
  with pytest.raises(ValueError, match='stride'):
    masking.grid_mask((7, 8))
  with pytest.raises(ValueError, match='63'):
    masking.grid_mask((8, 8))(jax.random.key(0), 2, 63)


# ------------------------------------------------------------------ given


def _fixed_count_masks(rng, b, length, hidden):
  m = np.zeros((b, length), np.float32)
  for i in range(b):
    m[i, rng.choice(length, hidden, replace=False)] = 1
  return m


def test_given_round_trips():
  rng = np.random.default_rng(0)
  m1 = _fixed_count_masks(rng, 5, 64, 48)
  (mask,) = masking.given(m1)(jax.random.key(0), 5, 64)
  _check_consistent(mask, 64, 16)
  np.testing.assert_array_equal(np.asarray(mask.mask), m1)
  # Several views, as a list; the rng is ignored.
  m2 = _fixed_count_masks(rng, 5, 64, 10)
  views = masking.given([m1, m2])(jax.random.key(7), 5, 64)
  assert len(views) == 2
  np.testing.assert_array_equal(np.asarray(views[0].mask), m1)
  np.testing.assert_array_equal(np.asarray(views[1].mask), m2)
  _check_consistent(views[1], 64, 54)


def test_given_rejects_unequal_counts_and_shapes():
  m = np.zeros((3, 16), np.float32)
  m[0, :4] = 1
  m[1, :4] = 1
  m[2, :5] = 1
  with pytest.raises(ValueError, match='visible'):
    masking.given(m)
  ok = np.zeros((3, 16), np.float32)
  ok[:, :4] = 1
  with pytest.raises(ValueError, match='shape'):
    masking.given(ok)(jax.random.key(0), 4, 16)


# -------------------------------------------------------------- bad input


BAD_RATIOS = [0.0, 1.0, -0.1, 1.5]


@pytest.mark.parametrize('ratio', BAD_RATIOS)
@pytest.mark.parametrize('factory', [
    masking.random, masking.complementary, masking.independent,
    lambda r: masking.block((8, 8), r),
    lambda r: masking.from_noise(jnp.zeros((2, 16)), r),
], ids=['random', 'complementary', 'independent', 'block', 'from_noise'])
def test_bad_ratio(factory, ratio):
  with pytest.raises(ValueError) as err:
    factory(ratio)
  msg = str(err.value)
  assert 'ratio' in msg
  assert re.search(rf'(?<![\d.]){re.escape(str(ratio))}(?![\d])', msg), msg


@pytest.mark.parametrize('size', [(30, 30), (32, 30)])
def test_image_not_divisible_by_patch(size):
  enc = Encoder(patch_size=4, width=64, depth=2, num_heads=4)
  model = mim.build(enc, masking.random(0.75), objectives.mae(),
                    width=32, depth=1, num_heads=4)
  images = jnp.zeros((2, *size, 3))
  keys = {'params': jax.random.key(0), 'mask': jax.random.key(1)}
  # eval_shape only traces: the error comes before anything is compiled.
  for fn in (lambda: model.init(keys, images),
             lambda: enc.init(jax.random.key(0), images)):
    with pytest.raises(ValueError) as err:
      jax.eval_shape(fn)
    msg = str(err.value)
    assert f'{size[0]}x{size[1]}' in msg, msg
    assert re.search(r'patch size 4\b', msg), msg


# ------------------------------------------------------------------- jit


@pytest.mark.parametrize('name,fn,num_patches', [
    ('random', masking.random(0.75), 64),
    ('complementary', masking.complementary(0.6), 49),
    ('independent', masking.independent(0.5), 64),
    ('block', masking.block((8, 8), 0.5), 64),
    ('grid', masking.grid_mask((8, 8)), 64),
])
def test_jit_matches_eager(name, fn, num_patches):
  key = jax.random.key(11)
  eager = fn(key, 8, num_patches)
  jitted = jax.jit(fn, static_argnums=(1, 2))(key, 8, num_patches)
  assert len(eager) == len(jitted)
  for e, j in zip(eager, jitted):
    for field in ('ids_keep', 'ids_restore', 'mask'):
      np.testing.assert_array_equal(np.asarray(getattr(e, field)),
                                    np.asarray(getattr(j, field)), err_msg=name)
  # Drawn on device from the key: a different key under jit differs.
  other = jax.jit(fn, static_argnums=(1, 2))(jax.random.key(12), 8, num_patches)
  assert not np.array_equal(np.asarray(other[0].mask), np.asarray(eager[0].mask))
