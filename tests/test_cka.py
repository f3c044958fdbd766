"""Tests for mimjax.analysis (CKA and occlusion invariance)."""

import itertools

import jax
import numpy as np
import pytest

from mimjax.analysis import cka_matrix
from mimjax.analysis import hsic_unbiased
from mimjax.analysis import linear_cka
from mimjax.analysis import MinibatchCKA
from mimjax.analysis import occlusion_invariance
from mimjax.analysis.cka import gram_matrices
from mimjax.analysis.invariance import MinibatchInvariance


def _rng(seed=0):
  return np.random.default_rng(seed)


def _correlated_pair(rng, n, p=16, q=12, noise=1.0):
  x = rng.normal(size=(n, p))
  y = x @ rng.normal(size=(p, q)) + noise * rng.normal(size=(n, q))
  return x.astype(np.float32), y.astype(np.float32)


def _np_cka(x, y):
  """Biased-HSIC CKA in float64 via the centering matrix H."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  n = x.shape[0]
  h = np.eye(n) - np.ones((n, n)) / n
  def hsic(k, l):
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2
  k, l = x @ x.T, y @ y.T
  return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def _np_hsic_unbiased(k, l):
  """Closed-form unbiased HSIC (Song et al. 2012) in float64."""
  k, l = np.array(k, np.float64), np.array(l, np.float64)
  n = k.shape[0]
  np.fill_diagonal(k, 0.0)
  np.fill_diagonal(l, 0.0)
  ones = np.ones(n)
  term1 = np.trace(k @ l)
  term2 = (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
  term3 = 2.0 / (n - 2) * (ones @ k @ l @ ones)
  return (term1 + term2 - term3) / (n * (n - 3))


def _np_hsic_ustat(k, l):
  """Unbiased HSIC as a brute-force U-statistic over distinct quadruples."""
  n = k.shape[0]
  total = 0.0
  for i, j, q, r in itertools.permutations(range(n), 4):
    total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
  return total / (n * (n - 1) * (n - 2) * (n - 3))


def _np_minibatch_cka(xs, ys):
  xy = sum(_np_hsic_unbiased(x @ x.T, y @ y.T) for x, y in zip(xs, ys))
  xx = sum(_np_hsic_unbiased(x @ x.T, x @ x.T) for x in xs)
  yy = sum(_np_hsic_unbiased(y @ y.T, y @ y.T) for y in ys)
  return xy / np.sqrt(xx * yy)


class TestLinearCKA:

  def test_self_similarity_is_one(self):
    x = _rng().normal(size=(50, 20))
    np.testing.assert_allclose(linear_cka(x, x), 1.0, atol=1e-5)

  def test_flattens_trailing_dims(self):
    x = _rng().normal(size=(30, 4, 5)).astype(np.float32)
    y = _rng(1).normal(size=(30, 7)).astype(np.float32)
    np.testing.assert_allclose(
        linear_cka(x, y), linear_cka(x.reshape(30, 20), y), rtol=1e-5)

  def test_invariant_to_orthogonal_and_isotropic_scaling(self):
    rng = _rng()
    x, y = _correlated_pair(rng, n=100)
    q, _ = np.linalg.qr(rng.normal(size=(y.shape[1], y.shape[1])))
    base = linear_cka(x, y)
    np.testing.assert_allclose(linear_cka(x, y @ q), base, rtol=1e-4)
    np.testing.assert_allclose(linear_cka(3.7 * x, y), base, rtol=1e-4)
    np.testing.assert_allclose(linear_cka(x, 0.01 * (y @ q)), base, rtol=1e-4)

  def test_not_invariant_to_general_linear_map(self):
    rng = _rng()
    x = rng.normal(size=(100, 10))
    a = np.diag(np.geomspace(1.0, 100.0, 10)) @ rng.normal(size=(10, 10))
    assert abs(np.linalg.det(a)) > 1e-6
    assert float(linear_cka(x, x @ a)) < 0.9

  @pytest.mark.parametrize('shape_x, shape_y', [
      ((40, 8), (40, 5)),    # n > p: feature form is cheaper.
      ((10, 64), (10, 32)),  # n < p: Gram form is cheaper.
  ])
  def test_matches_numpy_and_forms_agree(self, shape_x, shape_y):
    rng = _rng()
    x = rng.normal(size=shape_x).astype(np.float32)
    y = (x[:, :shape_y[1]] + rng.normal(size=shape_y)).astype(np.float32)
    expected = _np_cka(x, y)
    for method in ('auto', 'gram', 'feature'):
      np.testing.assert_allclose(
          linear_cka(x, y, method=method), expected, rtol=1e-4)

  def test_jit(self):
    x, y = _correlated_pair(_rng(), n=32)
    np.testing.assert_allclose(
        jax.jit(linear_cka)(x, y), _np_cka(x, y), rtol=1e-4)

  def test_cka_matrix_self_comparison(self):
    rng = _rng()
    feats = [rng.normal(size=(20, 6)), rng.normal(size=(20, 3, 4)),
             rng.normal(size=(20, 9))]
    heatmap = cka_matrix(feats, feats)
    assert heatmap.shape == (3, 3)
    np.testing.assert_allclose(np.diag(heatmap), 1.0, atol=1e-5)
    np.testing.assert_allclose(heatmap, heatmap.T, atol=1e-5)
    assert cka_matrix(feats, feats[:2]).shape == (3, 2)


class TestUnbiasedHSIC:

  def test_closed_form_matches_ustatistic(self):
    x, y = _correlated_pair(_rng(), n=7, p=3, q=2)
    x, y = x.astype(np.float64), y.astype(np.float64)
    k, l = x @ x.T, y @ y.T
    np.testing.assert_allclose(
        _np_hsic_unbiased(k, l), _np_hsic_ustat(k, l), rtol=1e-10)

  def test_matches_numpy(self):
    x, y = _correlated_pair(_rng(), n=20)
    k, l = x @ x.T, y @ y.T
    np.testing.assert_allclose(
        hsic_unbiased(k, l), _np_hsic_unbiased(k, l), rtol=1e-4)

  def test_minibatch_matches_numpy(self):
    rng = _rng()
    batches = [_correlated_pair(rng, n=16) for _ in range(4)]
    acc = MinibatchCKA.create()
    for x, y in batches:
      acc = acc.update(x, y)
    expected = _np_minibatch_cka(*zip(*batches))
    np.testing.assert_allclose(acc.compute()[0, 0], expected, rtol=1e-4)

  def test_minibatch_identical_inputs_is_one(self):
    rng = _rng()
    acc = MinibatchCKA.create()
    for _ in range(5):
      x = rng.normal(size=(32, 10))
      acc = acc.update(x, x)
    np.testing.assert_allclose(acc.compute()[0, 0], 1.0, atol=1e-5)

  def test_minibatch_approaches_full_batch(self):
    rng = _rng()
    x, y = _correlated_pair(rng, n=64 * 64, noise=3.0)
    update = jax.jit(MinibatchCKA.update)
    acc = MinibatchCKA.create()
    for xb, yb in zip(np.split(x, 64), np.split(y, 64)):
      acc = update(acc, xb, yb)
    minibatch = float(acc.compute()[0, 0])
    full = float(linear_cka(x, y))
    assert 0.2 < full < 0.9  # A non-trivial pair.
    assert abs(minibatch - full) < 0.03

  def test_minibatch_survives_a_large_shared_mean(self):
    # ViT image features share a large mean; float32 Grams of the raw
    # features would lose the HSIC to cancellation. Centring each batch
    # (which unbiased HSIC does not see) keeps it.
    rng = _rng()
    batches = [_correlated_pair(rng, n=32) for _ in range(4)]
    expected = _np_minibatch_cka(*zip(*batches))
    acc = MinibatchCKA.create()
    for x, y in batches:
      acc = acc.update(x + 300.0, y - 500.0)
    np.testing.assert_allclose(acc.compute()[0, 0], expected, rtol=1e-3)

  def test_update_grams_is_update(self):
    rng = _rng()
    x, y = _correlated_pair(rng, n=20)
    feats_a, feats_b = [x, x**2], [y, np.tanh(y), y[:, :3]]
    by_feats = MinibatchCKA.create(2, 3).update(feats_a, feats_b)
    by_grams = MinibatchCKA.create(2, 3).update_grams(
        gram_matrices(feats_a), gram_matrices(feats_b))
    np.testing.assert_allclose(by_grams.compute(), by_feats.compute(),
                               rtol=1e-6)

  def test_minibatch_heatmap(self):
    rng = _rng()
    acc = MinibatchCKA.create(3, 3)
    for _ in range(3):
      x = rng.normal(size=(24, 8))
      feats = [x, np.tanh(x @ rng.normal(size=(8, 6))), rng.normal(size=(24, 5))]
      acc = acc.update(feats, feats)
    heatmap = acc.compute()
    assert heatmap.shape == (3, 3)
    np.testing.assert_allclose(np.diag(heatmap), 1.0, atol=1e-5)
    assert MinibatchCKA.create(3, 2).compute().shape == (3, 2)


class TestOcclusionInvariance:

  def test_identical_views(self):
    rng = _rng()
    feats = [rng.normal(size=(16, 5, 8)), rng.normal(size=(16, 8))]
    out = occlusion_invariance(feats, feats)
    assert out['cka'].shape == out['cosine'].shape == (2,)
    assert out['cosine_centred'].shape == (2,)
    np.testing.assert_allclose(out['cka'], 1.0, atol=1e-5)
    np.testing.assert_allclose(out['cosine'], 1.0, atol=1e-5)
    np.testing.assert_allclose(out['cosine_centred'], 1.0, atol=1e-5)

  def test_independent_views_are_lower(self):
    rng = _rng()
    feats_a = [rng.normal(size=(64, 5, 8)), rng.normal(size=(64, 8))]
    feats_b = [rng.normal(size=(64, 5, 8)), rng.normal(size=(64, 8))]
    out = occlusion_invariance(feats_a, feats_b)
    assert np.all(out['cka'] < 0.5)
    assert np.all(np.abs(out['cosine']) < 0.3)


  def test_centred_cosine_ignores_a_per_view_offset(self):
    # Two views that agree up to a constant offset each: the plain cosine is
    # dominated by the offsets, the centred one sees the agreement.
    rng = _rng()
    x = rng.normal(size=(64, 8)).astype(np.float32)
    offset_a = 5.0 * rng.normal(size=8).astype(np.float32)
    offset_b = 5.0 * rng.normal(size=8).astype(np.float32)
    out = occlusion_invariance([x + offset_a], [x + offset_b])
    np.testing.assert_allclose(out['cosine_centred'], 1.0, atol=1e-5)
    assert abs(float(out['cosine'][0]) - 1.0) > 0.1
    np.testing.assert_allclose(out['cka'], 1.0, atol=1e-5)
    # The same streamed, given each view's mean over all the examples.
    acc = MinibatchInvariance.create([(x + offset_a).mean(0)],
                                     [(x + offset_b).mean(0)])
    for rows in np.split(np.arange(64), 4):
      acc = acc.update([x[rows] + offset_a], [x[rows] + offset_b])
    streamed = acc.compute()
    np.testing.assert_allclose(streamed['cosine_centred'], 1.0, atol=1e-5)
    np.testing.assert_allclose(streamed['cosine'], out['cosine'], rtol=1e-5)
    np.testing.assert_allclose(streamed['cka'], 1.0, atol=1e-5)

  def test_independent_views_centred_cosine_is_near_zero(self):
    rng = _rng()
    a, b = rng.normal(size=(2, 512, 8)) + 3.0  # a shared mean
    out = occlusion_invariance([a], [b])
    assert float(out['cosine'][0]) > 0.7
    assert abs(float(out['cosine_centred'][0])) < 0.1

  def test_minibatch_agrees_with_full_batch(self):
    # 4096 examples in 32 batches of 128; the features of both views share
    # a large mean, as a ViT's do. Stated tolerance: the minibatch (unbiased
    # HSIC) and full-batch (biased) CKA differ by < 0.03 here; the cosines
    # are per-example means, so they agree to float precision.
    rng = _rng(3)
    layers_a, layers_b = [], []
    for noise in (0.5, 2.0, 4.0):
      x, y = _correlated_pair(rng, n=4096, p=12, q=12, noise=noise)
      layers_a.append(x + 10.0)
      layers_b.append(y + 10.0)
    full = occlusion_invariance(layers_a, layers_b)
    assert np.all(np.asarray(full['cka']) > 0.2)
    acc = MinibatchInvariance.create([a.mean(0) for a in layers_a],
                                     [b.mean(0) for b in layers_b])
    update = jax.jit(MinibatchInvariance.update)
    for rows in np.split(np.arange(4096), 32):
      acc = update(acc, [a[rows] for a in layers_a],
                   [b[rows] for b in layers_b])
    streamed = acc.compute()
    np.testing.assert_allclose(streamed['cka'], full['cka'], atol=0.03)
    for key in ('cosine', 'cosine_centred'):
      np.testing.assert_allclose(streamed[key], full[key], atol=1e-4)
    assert float(acc.count) == 4096


class TestErrors:

  def test_mismatched_n(self):
    with pytest.raises(ValueError):
      linear_cka(np.ones((5, 3)), np.ones((6, 3)))
    with pytest.raises(ValueError):
      MinibatchCKA.create().update(np.ones((8, 3)), np.ones((9, 3)))

  def test_too_few_examples_for_unbiased(self):
    with pytest.raises(ValueError):
      hsic_unbiased(np.eye(3), np.eye(3))
    with pytest.raises(ValueError):
      MinibatchCKA.create().update(np.ones((3, 2)), np.ones((3, 2)))
    with pytest.raises(ValueError):
      MinibatchInvariance.create([np.zeros(2)], [np.zeros(2)]).update(
          [np.ones((3, 2))], [np.ones((3, 2))])

  def test_bad_shapes(self):
    with pytest.raises(ValueError):
      linear_cka(np.ones(5), np.ones(5))
    with pytest.raises(ValueError):
      linear_cka(np.ones((5, 3)), np.ones((5, 3)), method='nope')
    with pytest.raises(ValueError):
      MinibatchCKA.create(2, 1).update([np.ones((8, 3))], [np.ones((8, 3))])
    with pytest.raises(ValueError):
      occlusion_invariance([np.ones((4, 3))], [])
    with pytest.raises(ValueError):
      occlusion_invariance([np.ones((4, 3, 2, 1))], [np.ones((4, 3, 2, 1))])
