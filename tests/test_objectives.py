"""Tests for mimjax.objectives: each loss against an independent computation."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimjax import masking
from mimjax import mim
from mimjax import objectives
from mimjax.models import Decoder
from mimjax.models import Encoder
from fast_jit import FAST

sg = jax.lax.stop_gradient

B, SIZE, P = 8, 32, 4
GRID = (SIZE // P, SIZE // P)
L = GRID[0] * GRID[1]
RATIO = 0.75
K_A = int(L * (1 - RATIO))  # visible to view A = 16
K_B = L - K_A               # visible to view B = 48
ENC = Encoder(patch_size=P, width=64, depth=2, num_heads=4)
DEC_KW = dict(width=32, depth=1, num_heads=4)
PIX_DEC = Decoder(out_dim=P * P * 3, **DEC_KW)
FEAT_DEC = Decoder(out_dim=32, **DEC_KW)


RNGS = lambda key: {'mask': key, 'dropout': key}


def build(loss_fn, mask_fn=None, decoder=None):
  mask_fn = mask_fn or masking.complementary(RATIO)
  return mim.build(ENC, mask_fn, loss_fn, decoder=decoder or PIX_DEC)


@functools.cache
def model(name, feature_decoder=False, **knobs):
  """One model object per configuration, so its compiled functions are
  shared by the tests that use it."""
  return build(objectives.get(name, **knobs),
               decoder=FEAT_DEC if feature_decoder else None)


def forward(m, params, images, masks, key=None):
  """(loss, aux) of model `m` on the given views, compiled once per model."""
  key = jax.random.key(0) if key is None else key
  return _jit_forward(m)(params, images, masks, key)


@functools.cache
def _jit_forward(m):
  def f(params, images, masks, key):
    return m.apply({'params': params}, images, masks=masks, rngs=RNGS(key))
  return jax.jit(f, compiler_options=FAST)


def grads(m, params, images, masks, key=None):
  """((loss, aux), d loss / d params)."""
  key = jax.random.key(0) if key is None else key
  return _jit_grads(m)(params, images, masks, key)


@functools.cache
def _jit_grads(m):
  def f(params, images, masks, key):
    return m.apply({'params': params}, images, masks=masks, train=True,
                   rngs=RNGS(key))
  return jax.jit(jax.value_and_grad(f, has_aux=True), compiler_options=FAST)


def init(m, images, seed=0):
  return jax.jit(m.init, compiler_options=FAST)(
      {'params': jax.random.key(seed), 'mask': jax.random.key(seed + 1)},
      images)['params']


# ----------------------------------------------------- independent helpers


def np_patches(images, p=P):
  """P(x) by explicit slicing: row-major grid, pixels then channels."""
  images = np.asarray(images, np.float64)
  b, h, w, _ = images.shape
  out = [images[:, i:i + p, j:j + p, :].reshape(b, -1)
         for i in range(0, h, p) for j in range(0, w, p)]
  return np.stack(out, axis=1)


def np_targets(images, norm_pix):
  t = np_patches(images)
  if norm_pix:
    mean = t.mean(-1, keepdims=True)
    var = ((t - mean) ** 2).sum(-1, keepdims=True) / (t.shape[-1] - 1)
    t = (t - mean) / np.sqrt(var + 1e-6)
  return t


def np_masked_mse(pred, target, weights):
  pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
  weights = np.asarray(weights, np.float64)
  per_patch = ((pred - target) ** 2).mean(-1)
  return (per_patch * weights).sum() / weights.sum()


@functools.partial(jax.jit, compiler_options=FAST)
def decode(dec_params, latent, mask):
  return PIX_DEC.apply({'params': dec_params}, latent, mask.ids_restore, GRID)


@functools.partial(jax.jit, compiler_options=FAST)
def encode(enc_params, images, ids_keep):
  return ENC.apply({'params': enc_params}, images, ids_keep)['tokens']


def leaves_max(tree):
  return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(tree))


def assert_trees_close(a, b, rtol=1e-4, atol=1e-7):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope='module')
def images():
  # Pixels in [0, 1] with per-image offsets, so patch means are far from 0
  # and norm-pix matters.
  x = jax.random.uniform(jax.random.key(42), (B, SIZE, SIZE, 3))
  return x + jnp.arange(B, dtype=jnp.float32)[:, None, None, None] / B


@pytest.fixture(scope='module')
def views():
  return masking.complementary(RATIO)(jax.random.key(7), B, L)


@pytest.fixture(scope='module')
def params(images):
  """Encoder + pixel decoder: the tree shared by MAE, siamese and R-MAE."""
  p = init(model('mae'), images)
  assert set(p) == {'encoder', 'decoder'}
  return p


# --------------------------------------------------------------------- MAE


@pytest.mark.parametrize('norm_pix', [True, False])
@pytest.mark.parametrize('hidden_only', [True, False])
def test_mae_matches_numpy(images, views, params, norm_pix, hidden_only):
  loss, aux = forward(model('mae', norm_pix=norm_pix, hidden_only=hidden_only),
                      params, images, views[:1])
  pred = np.asarray(aux['pred'])
  assert pred.shape == (B, L, P * P * 3)
  mask = np.asarray(views[0].mask)
  weights = mask if hidden_only else np.ones_like(mask)
  expected = np_masked_mse(pred, np_targets(images, norm_pix), weights)
  np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
  # The knobs matter: the other settings give other numbers.
  other = np_masked_mse(pred, np_targets(images, not norm_pix), weights)
  assert abs(other - expected) > 1e-2 * expected
  if hidden_only:
    visible_only = np_masked_mse(pred, np_targets(images, norm_pix), 1 - mask)
    assert abs(visible_only - expected) > 1e-3 * expected


def test_mae_pred_is_decoder_of_encoder(images, views, params):
  _, aux = forward(model('mae', norm_pix=True, hidden_only=True), params,
                   images, views[:1])
  latent = encode(params['encoder'], images, views[0].ids_keep)
  np.testing.assert_allclose(np.asarray(aux['latents'][0]), np.asarray(latent),
                             rtol=1e-5, atol=1e-6)
  pred = decode(params['decoder'], latent, views[0])
  np.testing.assert_allclose(np.asarray(aux['pred']), np.asarray(pred),
                             rtol=1e-4, atol=1e-5)


# ------------------------------------------------------- siamese-form MAE


def test_siamese_oracle_equals_mae(images, views, params):
  mae_loss, mae_aux = forward(model('mae', norm_pix=True, hidden_only=True),
                              params, images, views[:1])
  siam_loss, siam_aux = forward(model('siamese', oracle=True), params, images,
                                views)
  assert float(siam_loss) == float(mae_loss)
  np.testing.assert_array_equal(np.asarray(siam_aux['pred']),
                                np.asarray(mae_aux['pred']))


def siamese_inner(m, images, seed=0):
  """The 'inner' collection (φ' and its optimiser state) that init makes."""
  return jax.jit(m.init, compiler_options=FAST)(
      {'params': jax.random.key(seed), 'mask': jax.random.key(seed + 1)},
      images)['inner']


@functools.cache
def _jit_siamese(m):
  def f(params, inner, images, masks):
    (loss, aux), new = m.apply({'params': params, 'inner': inner}, images,
                               masks=masks, train=True, mutable=['inner'],
                               rngs=RNGS(jax.random.key(0)))
    return loss, (aux, new['inner'])
  return jax.jit(jax.value_and_grad(f, has_aux=True), compiler_options=FAST)


def siamese_step(m, params, inner, images, masks):
  """((loss, (aux, updated inner)), d loss / d params)."""
  return _jit_siamese(m)(params, inner, images, masks)


def _manual_siamese(phi_prime, stop_gradient):
  """Siamese loss against d_φ'(z_B) for a given, constant φ'."""

  def loss_fn(ctx):
    (view_a, view_b), (z_a, z_b) = ctx.masks, ctx.latents
    pred_a = ctx.decode(z_a, view_a)
    target = ctx.decoder_apply(phi_prime, z_b, view_b)
    target = sg(target) if stop_gradient else target
    return objectives.masked_mse(pred_a, target, view_a.mask), {}
  return loss_fn


def test_siamese_phi_prime_is_persistent_and_starts_as_phi(images, views,
                                                           params):
  m = model('siamese', inner_steps=0)
  inner = siamese_inner(m, images)
  assert set(inner) == {'phi_prime', 'opt_state'}
  # Same seed, same module path: φ' starts as φ's initial value.
  assert_trees_close(inner['phi_prime'], nn.meta.unbox(params['decoder']),
                     rtol=0, atol=0)
  # K = 0: φ' is left as it is and the target is d_φ'(z_B).
  (loss, (aux, new)), _ = siamese_step(m, params, inner, images, views)
  assert_trees_close(new['phi_prime'], inner['phi_prime'], rtol=0, atol=0)
  z_a, z_b = aux['latents']
  pred_a = decode(params['decoder'], z_a, views[0])
  target = decode(inner['phi_prime'], z_b, views[1])
  mask_a = np.asarray(views[0].mask)
  np.testing.assert_allclose(float(loss), np_masked_mse(pred_a, target, mask_a),
                             rtol=1e-4)
  np.testing.assert_allclose(
      float(aux['inner_loss']),
      np_masked_mse(target, np_targets(images, True), mask_a), rtol=1e-4)
  # Applying without the 'inner' collection is a clear error.
  with pytest.raises(ValueError, match="'inner'"):
    forward(m, params, images, views)


def test_siamese_phi_prime_tracks_the_argmin(images, views, params):
  """Warm-started across outer steps, φ' fits what B sees ever better; one
  inner step is one Adam step on the inner loss (z_B fixed)."""
  lr = 1e-2
  m = model('siamese', inner_steps=2, inner_lr=lr)
  inner = siamese_inner(m, images)
  losses = []
  for _ in range(8):
    (_, (aux, inner)), _ = siamese_step(m, params, inner, images, views)
    losses.append(float(aux['inner_loss']))
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  assert losses[-1] < 0.9 * losses[0], losses
  assert int(inner['opt_state'][0].count) == 16

  # One step by hand: Adam from the initial state on the inner loss.
  m1 = model('siamese', inner_steps=1, inner_lr=lr)
  start = siamese_inner(m1, images)
  (_, (aux, after)), _ = siamese_step(m1, params, start, images, views)
  z_b = aux['latents'][1]
  pixels = jnp.asarray(np_targets(images, True), jnp.float32)

  def inner_loss(phi):
    pred = PIX_DEC.apply({'params': phi}, z_b, views[1].ids_restore, GRID)
    return objectives.masked_mse(pred, pixels, views[0].mask)
  grad = jax.grad(inner_loss)(start['phi_prime'])
  # Adam's first moment after one step is (1 - b1) * g; its first update is
  # about lr * sign(g) wherever g is not negligible.
  adam = after['opt_state'][0]
  assert_trees_close(adam.mu, jax.tree.map(lambda g: 0.1 * g, grad),
                     rtol=1e-3, atol=1e-4 * leaves_max(grad))
  big = jax.tree.map(lambda g: jnp.abs(g) > 0.1 * leaves_max(grad), grad)
  moved = jax.tree.map(lambda a, b, g, k: jnp.where(
      k, jnp.abs((a - b) * jnp.sign(g) + lr), 0.0),
                       after['phi_prime'], start['phi_prime'], grad, big)
  assert leaves_max(moved) < 1e-3 * lr


@pytest.mark.parametrize('stop_gradient', [True, False])
def test_siamese_stop_gradient_knob(images, views, params, stop_gradient):
  """On: the encoder learns through view A only (d_φ'(z_B) a constant).
  Off: also through z_B. φ never sees φ' and gets the same gradient."""
  m = model('siamese', inner_steps=0, stop_gradient=stop_gradient)
  inner = siamese_inner(m, images)
  (loss, _), g = siamese_step(m, params, inner, images, views)
  (ref_loss, _), ref = grads(
      build(_manual_siamese(inner['phi_prime'], stop_gradient)), params,
      images, views)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  assert_trees_close(g, ref)
  other = model('siamese', inner_steps=0, stop_gradient=not stop_gradient)
  (_, _), g_other = siamese_step(other, params, inner, images, views)
  assert_trees_close(g['decoder'], g_other['decoder'])
  diff = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), g['encoder'],
                      g_other['encoder'])
  assert leaves_max(diff) > 1e-3 * leaves_max(g['encoder'])


# ------------------------------------------------------------------ R-MAE


@pytest.fixture(scope='module')
def params_two_decoders(images):
  p = init(model('rmae', share_decoder=False), images)
  assert set(p) == {'encoder', 'decoder', 'target_decoder'}
  return p


@pytest.mark.parametrize('stop_gradient', [True, False])
def test_rmae_gradients(images, views, params_two_decoders, stop_gradient):
  """Separate decoders φ, φ': which term's gradient reaches which."""
  lam = 0.5
  m = model('rmae', lam=lam, share_decoder=False, stop_gradient=stop_gradient)
  p = params_two_decoders

  def terms(p):
    loss, aux = m.apply({'params': p}, images, masks=views, train=True,
                        rngs=RNGS(jax.random.key(0)))
    return (loss, aux['siamese_loss'], aux['recon_loss']), aux['latents']

  @functools.partial(jax.jit, compiler_options=FAST)
  def all_grads(p):
    out, vjp, latents = jax.vjp(terms, p, has_aux=True)
    one, zero = jnp.ones(()), jnp.zeros(())
    # d loss, d siam (= d loss at λ = 0), d λ·recon.
    return (out, latents, vjp((one, zero, zero))[0],
            vjp((zero, one, zero))[0], vjp((zero, zero, lam * one))[0])

  (loss, siam, recon), (z_a, z_b), g_total, g_siam, g_recon = all_grads(p)
  np.testing.assert_allclose(float(loss), float(siam) + lam * float(recon),
                             rtol=1e-6)
  # The terms, by hand from the two decoders.
  pred_a = decode(p['decoder'], z_a, views[0])
  pred_b = decode(p['target_decoder'], z_b, views[1])
  mask_a = np.asarray(views[0].mask)
  np.testing.assert_allclose(float(siam), np_masked_mse(pred_a, pred_b, mask_a),
                             rtol=1e-4)
  np.testing.assert_allclose(
      float(recon), np_masked_mse(pred_b, np_targets(images, True), mask_a),
      rtol=1e-4)

  # λ = 0: the loss is the siamese term alone.
  assert leaves_max(g_siam['decoder']) > 0
  assert leaves_max(g_siam['encoder']) > 0
  if stop_gradient:
    # ... and it does not reach φ' at all.
    for leaf in jax.tree.leaves(g_siam['target_decoder']):
      np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    # λ > 0: φ' learns from λ·recon only.
    assert_trees_close(g_total['target_decoder'], g_recon['target_decoder'],
                       rtol=1e-5, atol=1e-9)
  else:
    assert leaves_max(g_siam['target_decoder']) > 1e-6
    diff = jax.tree.map(lambda x, y: x - y, g_total['target_decoder'],
                        g_recon['target_decoder'])
    assert leaves_max(diff) > 1e-6
  assert leaves_max(g_recon['target_decoder']) > 0
  # The online decoder φ is not in the reconstruction term.
  for leaf in jax.tree.leaves(g_recon['decoder']):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  assert_trees_close(g_total['decoder'], g_siam['decoder'], rtol=1e-5,
                     atol=1e-9)


def test_rmae_symmetric_averages_both_directions(images, views, params):
  ab, _ = forward(model('rmae'), params, images, views)
  ba, _ = forward(model('rmae'), params, images, views[::-1])
  sym, _ = forward(model('rmae', symmetric=True), params, images, views)
  np.testing.assert_allclose(float(sym), (float(ab) + float(ba)) / 2,
                             rtol=1e-5)
  assert abs(float(ab) - float(ba)) > 1e-3


# ------------------------------------------------------------------ C-MAE


@pytest.fixture(scope='module')
def cmae_params(images):
  p = init(model('cmae', feature_decoder=True), images)
  assert set(p) == {'encoder', 'decoder', 'projector', 'key_projector'}
  return p


@pytest.mark.parametrize('symmetric', [False, True])
def test_cmae_patch_init_loss_near_log_keys(images, views, cmae_params,
                                            symmetric):
  loss, aux = forward(model('cmae', feature_decoder=True, symmetric=symmetric),
                      cmae_params, images, views)
  # A→B: a key for every (image, position hidden from A) = B·K_B keys;
  # B→A: B·K_A keys. The symmetric loss averages the two directions.
  expected = math.log(B * K_B)
  if symmetric:
    expected = (math.log(B * K_B) + math.log(B * K_A)) / 2
    assert tuple(map(int, aux['keys_per_direction'])) == (B * K_B, B * K_A)
  else:
    assert tuple(map(int, aux['keys_per_direction'])) == (B * K_B,)
  assert abs(float(loss) - expected) < 0.05 * expected, (float(loss), expected)


def test_cmae_symmetric_is_mean_of_directions(images, views, cmae_params):
  one_way = model('cmae', feature_decoder=True, symmetric=False)
  both = model('cmae', feature_decoder=True, symmetric=True)
  ab, _ = forward(one_way, cmae_params, images, views)
  ba, _ = forward(one_way, cmae_params, images, views[::-1])
  sym, _ = forward(both, cmae_params, images, views)
  np.testing.assert_allclose(float(sym), (float(ab) + float(ba)) / 2,
                             rtol=1e-5)
  assert abs(float(sym) - float(ab)) > 0.1


@pytest.mark.parametrize('symmetric', [False, True])
def test_cmae_max_positions_bounds_keys(images, views, cmae_params, symmetric):
  m = 4
  mp = model('cmae', feature_decoder=True, symmetric=symmetric, max_positions=m)
  loss, aux = forward(mp, cmae_params, images, views)
  assert set(map(int, aux['keys_per_direction'])) == {B * m}
  expected = math.log(B * m)
  assert abs(float(loss) - expected) < 0.1 * expected, (float(loss), expected)
  # Other positions are sampled under another 'mask' key.
  loss2, _ = forward(mp, cmae_params, images, views, jax.random.key(3))
  assert float(loss2) != float(loss)


def test_cmae_image_init_loss_near_log_batch(images, views):
  m = model('cmae', level='image', symmetric=False)
  loss, aux = forward(m, init(m, images), images, views)
  assert tuple(map(int, aux['keys_per_direction'])) == (B,)
  assert abs(float(loss) - math.log(B)) < 0.05 * math.log(B), float(loss)


@pytest.mark.parametrize('stop_gradient_keys', [True, False])
def test_cmae_stop_gradient_keys(images, views, cmae_params,
                                 stop_gradient_keys):
  m = model('cmae', feature_decoder=True, symmetric=False,
            stop_gradient_keys=stop_gradient_keys)
  _, g = grads(m, cmae_params, images, views)
  assert leaves_max(g['projector']) > 0
  assert leaves_max(g['decoder']) > 0
  assert leaves_max(g['encoder']) > 0
  if stop_gradient_keys:
    for leaf in jax.tree.leaves(g['key_projector']):
      np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  else:
    assert leaves_max(g['key_projector']) > 1e-6


# ---------------------------------------------------------------- SimSiam


def test_simsiam(images, views):
  m = model('simsiam', proj_dim=32, proj_hidden=64, pred_hidden=16)
  p = init(m, images)
  assert {'projector', 'predictor'} <= set(p)
  (loss, aux), g = grads(m, p, images, views)
  assert -1.0 <= float(loss) <= 1.0
  assert leaves_max(g['projector']) > 0
  assert leaves_max(g['predictor']) > 0
  assert leaves_max(g['encoder']) > 0
  # By hand: symmetric negative cosine of predictor output vs projection.
  proj = objectives.Projector(32, 64, 2)
  pred = objectives.Projector(32, 16, 2)
  z = [proj.apply({'params': p['projector']}, lat[:, 1:].mean(1))
       for lat in aux['latents']]
  h = [pred.apply({'params': p['predictor']}, zi) for zi in z]
  unit = lambda x: np.asarray(x, np.float64) / np.linalg.norm(
      np.asarray(x, np.float64), axis=-1, keepdims=True)
  cos = lambda u, v: (unit(u) * unit(v)).sum(-1).mean()
  expected = -(cos(h[0], z[1]) + cos(h[1], z[0])) / 2
  np.testing.assert_allclose(float(loss), expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- errors


def test_get_unknown_objective():
  with pytest.raises(ValueError, match='nope'):
    objectives.get('nope')
  assert objectives.get('mae', norm_pix=False) is not None


@pytest.mark.parametrize('name', ['siamese', 'rmae', 'cmae', 'simsiam'])
def test_two_view_loss_needs_two_views(images, name):
  m = build(objectives.get(name), mask_fn=masking.random(RATIO))
  with pytest.raises(ValueError, match=r'masking\.complementary'):
    jax.eval_shape(lambda: m.init(
        {'params': jax.random.key(0), 'mask': jax.random.key(1)}, images))


# ------------------------------------------- any pair of masks: A hides, B sees


@pytest.fixture(scope='module')
def independent_views():
  return masking.independent(0.5)(jax.random.key(11), B, L)


def test_hidden_and_seen_weights(views, independent_views):
  a, b = views
  np.testing.assert_array_equal(np.asarray(masking.hidden_and_seen(a, b)),
                                np.asarray(a.mask))
  a, b = independent_views
  w = np.asarray(masking.hidden_and_seen(a, b))
  expected = np.asarray(a.mask) * (1 - np.asarray(b.mask))
  np.testing.assert_array_equal(w, expected)
  # Independent masks: some patches A hides are hidden from B too.
  assert 0 < w.sum() < np.asarray(a.mask).sum()


def test_rmae_independent_masks_weigh_hidden_in_a_seen_by_b(
    images, independent_views, params):
  loss, aux = forward(model('rmae'), params, images, independent_views)
  a, b = independent_views
  w = np.asarray(a.mask) * (1 - np.asarray(b.mask))
  pred_a, pred_b = aux['pred'], aux['target_pred']
  np.testing.assert_allclose(float(aux['siamese_loss']),
                             np_masked_mse(pred_a, pred_b, w), rtol=1e-4)
  np.testing.assert_allclose(
      float(aux['recon_loss']),
      np_masked_mse(pred_b, np_targets(images, True), w), rtol=1e-4)
  # Not plain MAE on view B over everything A hides.
  plain = np_masked_mse(pred_b, np_targets(images, True), np.asarray(a.mask))
  assert abs(plain - float(aux['recon_loss'])) > 1e-3 * plain


def test_cmae_patch_positions_are_hidden_in_a_and_seen_by_b(independent_views):
  a, b = independent_views
  w = masking.hidden_and_seen(a, b)
  pick = objectives.patch_positions(w, b.num_visible)
  chosen_w = np.asarray(jnp.take_along_axis(w, pick, axis=1))
  # Every position A hides and B sees is used, and nothing else counts.
  np.testing.assert_array_equal(chosen_w.sum(1), np.asarray(w).sum(1))
  seen_by_b = 1 - np.asarray(jnp.take_along_axis(b.mask, pick, axis=1))
  assert np.all(seen_by_b[chosen_w > 0] == 1)


def test_info_nce_weights_drop_pairs():
  q = jax.random.normal(jax.random.key(0), (6, 8))
  k = q + 0.1 * jax.random.normal(jax.random.key(1), (6, 8))
  w = jnp.array([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
  keep = np.asarray(w) > 0
  weighted = objectives.info_nce(q, k, 0.2, w)
  dropped = objectives.info_nce(q[keep], k[keep], 0.2)
  np.testing.assert_allclose(float(weighted), float(dropped), rtol=1e-6)


def test_cmae_alignment_minimum_and_shift():
  """Identity projector, keys equal to the queries at the right positions:
  with orthonormal queries the InfoNCE minimum is known exactly; keys
  shifted by one position must score worse."""
  t, n_img, n_pos = 0.2, 2, 4
  n = n_img * n_pos
  q = jnp.eye(16)[:n].reshape(n_img, n_pos, 16)  # orthonormal rows
  w = jnp.ones((n_img, n_pos))
  best = objectives.info_nce(q, q, t, w)
  expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + n - 1))
  np.testing.assert_allclose(float(best), expected, rtol=1e-5)
  shifted = objectives.info_nce(q, jnp.roll(q, 1, axis=1), t, w)
  assert float(shifted) > float(best) + 1.0

  # End to end through C-MAE: decoder features = B's tokens at the positions
  # A hides, and identity projectors. The grid pairing is what makes it
  # reach the minimum.
  a, b = masking.complementary(0.5)(jax.random.key(3), n_img, 16)
  latent_b = jnp.concatenate([jnp.zeros((n_img, 1, 16)), jnp.eye(16)[
      :n_img * b.num_visible].reshape(n_img, b.num_visible, 16)], 1)
  grid_b = objectives.grid_tokens(latent_b, b)
  pick = objectives.patch_positions(masking.hidden_and_seen(a, b),
                                    b.num_visible)
  keys = vit_gather(grid_b, pick)
  aligned = objectives.info_nce(keys, keys, t)
  np.testing.assert_allclose(
      float(aligned),
      -math.log(math.exp(1 / t) / (math.exp(1 / t) + n_img * b.num_visible
                                   - 1)), rtol=1e-5)
  off = objectives.info_nce(keys, vit_gather(grid_b, jnp.roll(pick, 1, 1)), t)
  assert float(off) > float(aligned) + 1.0


def vit_gather(x, ids):
  return jnp.take_along_axis(x, ids[..., None], axis=1)
