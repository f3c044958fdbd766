"""A researcher's own mask and loss functions plug in; every objective trains.

Each objective trains a tiny model for 20 steps on a fixed batch of smooth
images and must lower its loss clearly.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mimjax import masking
from mimjax import mim
from mimjax import objectives
from mimjax.models import Decoder
from mimjax.models import Encoder
from fast_jit import FAST

B, SIZE, P = 8, 32, 4
L = (SIZE // P) ** 2
STEPS = 20
ENC = Encoder(patch_size=P, width=64, depth=2, num_heads=4)
DEC_KW = dict(width=32, depth=1, num_heads=4)
FEAT_DEC = Decoder(out_dim=32, **DEC_KW)


def smooth_images(batch=B, size=SIZE, seed=0):
  """Colour gradients plus a few Gaussian blobs per channel."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size),
                       indexing='ij')
  out = np.zeros((batch, size, size, 3), np.float32)
  for i in range(batch):
    for c in range(3):
      a, b, offset = rng.normal(size=3)
      out[i, :, :, c] = a * xx + b * yy + offset
      for _ in range(2):
        cx, cy = rng.uniform(-1, 1, size=2)
        width, amp = rng.uniform(0.2, 0.5), rng.normal()
        out[i, :, :, c] += amp * np.exp(
            -((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * width**2))
  return jnp.asarray(out)


def train(model, images, params=None, steps=STEPS, lr=1e-3, seed=0):
  """`steps` AdamW steps in one compiled program (after an init in the same
  program unless `params` are given); returns the loss of every step.

  A fresh 'mask' (and 'dropout') key every step, the batch fixed."""
  opt = optax.adamw(lr)

  def step(carry, key):
    params, extra, opt_state = carry
    mask_key, dropout_key = jax.random.split(key)

    def loss_fn(params):
      # `extra`: state an objective keeps besides its parameters (siamese φ').
      (loss, _), new = model.apply(
          {'params': params, **extra}, images, train=True, mutable=list(extra),
          rngs={'mask': mask_key, 'dropout': dropout_key})
      return loss, new

    (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), extra, opt_state), loss

  @functools.partial(jax.jit, compiler_options=FAST)
  def run(key, params):
    init_key, mask_key, train_key = jax.random.split(key, 3)
    variables = model.init({'params': init_key, 'mask': mask_key}, images)
    params = variables['params'] if params is None else params
    extra = {k: v for k, v in variables.items() if k != 'params'}
    carry = (params, extra, opt.init(params))
    _, losses = jax.lax.scan(step, carry, jax.random.split(train_key, steps))
    return losses

  return np.asarray(run(jax.random.key(seed), params))


def assert_decreases(losses):
  assert losses.shape == (STEPS,)
  assert np.all(np.isfinite(losses)), losses
  first, last = losses[:5].mean(), losses[-5:].mean()
  margin = 0.15 * max(abs(first), 0.5)
  assert last < first - margin, (first, last, losses)


@pytest.fixture(scope='module')
def images():
  return smooth_images()


@pytest.fixture(scope='module')
def pixel_params(images):
  """Encoder + pixel decoder: the parameters of every objective that has no
  projector (MAE, siamese, R-MAE, the L1 loss below), initialised once."""
  model = mim.build(ENC, masking.complementary(0.75), objectives.mae(),
                    **DEC_KW)
  init = jax.jit(model.init, compiler_options=FAST)
  params = init({'params': jax.random.key(0), 'mask': jax.random.key(1)},
                images)['params']
  assert set(params) == {'encoder', 'decoder'}
  return params


# ------------------------------------------ a researcher's own mask + loss


def left_half_plus_random(num_keep):
  """Hides the left half of the patch grid and all but `num_keep` random
  patches of the right half."""

  def mask_fn(rng, batch_size, num_patches):
    side = math.isqrt(num_patches)
    left = (jnp.arange(num_patches) % side) < side // 2
    scores = jax.random.uniform(rng, (batch_size, num_patches)) + left
    return (masking.from_scores(scores, num_keep),)
  return mask_fn


def l1_hidden(ctx):
  """Mean absolute pixel error on the hidden patches."""
  mask, latent = ctx.masks[0], ctx.latents[0]
  pred = ctx.decode(latent, mask)
  err = jnp.abs(pred - ctx.targets(norm_pix=False)).mean(axis=-1)
  return jnp.sum(err * mask.mask) / jnp.sum(mask.mask), {'pred': pred}


def test_own_mask_function():
  (mask,) = left_half_plus_random(16)(jax.random.key(0), 4, L)
  m = np.asarray(mask.mask).reshape(4, 8, 8)
  np.testing.assert_array_equal(m[:, :, :4], 1)
  np.testing.assert_array_equal(m.sum(axis=(1, 2)), L - 16)
  assert np.all(np.asarray(mask.ids_keep) % 8 >= 4)
  assert not np.array_equal(m[0], m[1])


def test_own_mask_and_loss_train(images, pixel_params):
  model = mim.build(ENC, left_half_plus_random(16), l1_hidden, **DEC_KW)
  # The model draws the new masks and hands them to the new loss.
  (loss, aux), _ = jax.eval_shape(
      lambda: model.init_with_output(
          {'params': jax.random.key(0), 'mask': jax.random.key(1)}, images))
  assert loss.shape == ()
  assert aux['pred'].shape == (B, L, P * P * 3)
  assert aux['latents'][0].shape == (B, 17, 64)
  assert_decreases(train(model, images, pixel_params))


# ------------------------------------------------- every built-in objective


BUILTIN = {
    'mae': (masking.random(0.75), objectives.mae(), None),
    'siamese_oracle': (masking.complementary(0.75),
                       objectives.siamese(oracle=True), None),
    'siamese': (masking.complementary(0.75), objectives.siamese(), None),
    'rmae': (masking.complementary(0.75), objectives.rmae(), None),
    'cmae_patch': (masking.complementary(0.75),
                   objectives.cmae(proj_dim=32, proj_hidden=64), FEAT_DEC),
    'cmae_image': (masking.complementary(0.75),
                   objectives.cmae(level='image', proj_dim=32,
                                   proj_hidden=64), None),
    'simsiam': (masking.complementary(0.75),
                objectives.simsiam(proj_dim=32, proj_hidden=64,
                                   pred_hidden=32), None),
}


@pytest.mark.parametrize('name', list(BUILTIN))
def test_builtin_objective_trains(images, pixel_params, name):
  mask_fn, loss_fn, decoder = BUILTIN[name]
  kwargs = {} if decoder is not None else DEC_KW
  model = mim.build(ENC, mask_fn, loss_fn, decoder=decoder, **kwargs)
  # Objectives with their own projectors initialise inside the program.
  params = None if name.startswith(('cmae', 'simsiam')) else pixel_params
  assert_decreases(train(model, images, params))
