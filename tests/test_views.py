"""View transforms: each gives the views it claims, and composes with masks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimjax import config as config_lib
from mimjax import masking, mim, objectives, views
from mimjax.models import Encoder
from fast_jit import FAST

B, SIZE, P = 8, 16, 4
L = (SIZE // P) ** 2
ENC = Encoder(patch_size=P, width=32, depth=1, num_heads=4)
DEC_KW = dict(width=32, depth=1, num_heads=4)
MEAN, STD = np.array(views.IMAGENET_MEAN), np.array(views.IMAGENET_STD)


@pytest.fixture(scope='module')
def images():
  pixels = jax.random.uniform(jax.random.key(0), (B, SIZE, SIZE, 3))
  return (pixels - MEAN) / STD


def test_crop_boxes_inside_the_image_and_varied():
  boxes = jax.vmap(views.crop_box)(jax.random.split(jax.random.key(0), 500))
  boxes = np.asarray(boxes)
  top, left, bottom, right = boxes.T
  assert np.all(top >= 0) and np.all(left >= 0)
  assert np.all(bottom <= 1 + 1e-6) and np.all(right <= 1 + 1e-6)
  area = (bottom - top) * (right - left)
  assert np.all(area >= 0.08 - 1e-6) and np.all(area <= 1 + 1e-6)
  aspect = (right - left) / (bottom - top)
  fitted = area < 0.99
  assert np.all((aspect[fitted] > 0.75 - 1e-4) & (aspect[fitted] < 4 / 3 + 1e-4))
  assert area.std() > 0.1


def test_crops_give_independent_views_per_sample(images):
  a, b = views.crops()(jax.random.key(1), images)
  for v in (a, b):
    assert v.images.shape == images.shape and not v.aligned
    assert np.all(np.asarray(v.boxes)[:, :2] >= 0)
    assert np.all(np.asarray(v.boxes)[:, 2:] <= 1 + 1e-6)
  assert not np.allclose(np.asarray(a.boxes), np.asarray(b.boxes))
  # Per sample: the rows of one view have different boxes.
  assert len(np.unique(np.asarray(a.boxes)[:, 0].round(5))) == B
  # Pixels stay in the normalised range of [0, 1] pixels.
  pixels = np.asarray(a.images) * STD + MEAN
  assert pixels.min() > -1e-4 and pixels.max() < 1 + 1e-4


def test_full_box_without_colour_or_flip_is_the_image(images):
  (v,) = views.crops(num_views=1, scale=(1.0, 1.0), flip=False,
                     jitter_prob=0.0, grayscale_prob=0.0)(
                         jax.random.key(2), images)
  assert v.aligned
  np.testing.assert_allclose(np.asarray(v.images), np.asarray(images),
                             atol=1e-5)
  # A box is the region it names: the top-left quarter, resized (the
  # bilinear kernel of the last row and column reaches one source pixel
  # past the box).
  pixels = jnp.asarray(np.asarray(images) * STD + MEAN)[0]
  quarter = views.resized_crop(pixels, jnp.array([0.0, 0.0, 0.5, 0.5]))
  expected = jax.image.resize(pixels[:SIZE // 2, :SIZE // 2], pixels.shape,
                              'bilinear')
  np.testing.assert_allclose(np.asarray(quarter)[:-1, :-1],
                             np.asarray(expected)[:-1, :-1], atol=1e-5)


def test_flip_and_grayscale(images):
  (v,) = views.crops(num_views=1, scale=(1.0, 1.0), flip=True,
                     jitter_prob=0.0, grayscale_prob=1.0)(
                         jax.random.key(3), images)
  flipped = np.asarray(v.flipped)
  assert 0 < flipped.sum() < B
  pixels = np.asarray(v.images) * STD + MEAN
  np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-5)
  grey = np.asarray(images) * STD + MEAN
  grey = grey @ np.array([0.299, 0.587, 0.114])
  i = int(np.argmax(flipped))
  np.testing.assert_allclose(pixels[i, :, :, 0], grey[i, :, ::-1], atol=1e-5)


def test_colour_jitter_hue_round_trip():
  rgb = jax.random.uniform(jax.random.key(4), (64, 3))
  back = views._hsv_to_rgb(views._rgb_to_hsv(rgb))  # pylint: disable=protected-access
  np.testing.assert_allclose(np.asarray(back), np.asarray(rgb), atol=1e-5)
  image = jax.random.uniform(jax.random.key(5), (8, 8, 3))
  same = views.colour_jitter(jax.random.key(6), image, 0.0, 0.0, 0.0, 0.0)
  np.testing.assert_allclose(np.asarray(same), np.asarray(image), atol=1e-5)
  moved = views.colour_jitter(jax.random.key(6), image)
  assert np.abs(np.asarray(moved) - np.asarray(image)).mean() > 1e-3


@functools.cache
def _loss(view_fn, mask_fn, loss_fn):
  model = mim.build(ENC, mask_fn, loss_fn, view_fn=view_fn, **DEC_KW)

  def f(images):
    variables = model.init({'params': jax.random.key(0),
                            'mask': jax.random.key(1)}, images)
    return model.apply(variables, images, rngs={'mask': jax.random.key(2)})
  return jax.jit(f, compiler_options=FAST)


def explicit_identity(rng, images):
  del rng
  return (views.identity_view(images),)


def test_identity_views_are_mae_bit_for_bit(images):
  """The view path (views drawn, paired with masks, targets from each
  view's own image) with an identity view gives MAE's numbers exactly."""
  mae = objectives.mae()
  mask_fn = masking.random(0.75)
  assert mim.build(ENC, mask_fn, mae, **DEC_KW).view_fn is None
  assert views.get('identity') is None
  plain, aux = _loss(None, mask_fn, mae)(images)
  same, aux_same = _loss(explicit_identity, mask_fn, mae)(images)
  assert float(plain) == float(same)
  np.testing.assert_array_equal(np.asarray(aux['pred']),
                                np.asarray(aux_same['pred']))
  # A view function does change the numbers (the test can see one).
  other, _ = _loss(views.crops(num_views=1), mask_fn, mae)(images)
  assert float(other) != float(plain)


def test_crop_plus_mask_composes(images):
  """Two crops, each with its own random mask; every view is encoded from
  its own crop."""
  view_fn = views.crops()
  loss, aux = _loss(view_fn, masking.independent(0.75),
                    objectives.simsiam(proj_dim=8, proj_hidden=16,
                                       pred_hidden=8))(images)
  assert np.isfinite(float(loss))
  a, b = aux['latents']
  assert a.shape == b.shape == (B, 1 + L // 4, 32)
  assert not np.allclose(np.asarray(a), np.asarray(b))


def test_pair_views_refuses_mismatched_counts(images):
  with pytest.raises(ValueError, match='2 views and the mask function 3'):
    mim.pair_views((1, 2), 3)


def _pretrain(**kw):
  c = config_lib.base_config().pretrain
  c.update({k: v for k, v in kw.items() if k != 'view_kwargs'})
  if 'view_kwargs' in kw:
    c.view_kwargs.update(kw['view_kwargs'])
  return c


# (views, mask, objective, objective knobs) that make sense: the matrix.
MEANINGFUL = [
    ('identity', 'random', 'mae', {}),
    ('identity', 'complementary', 'siamese', {}),
    ('identity', 'independent', 'rmae', {}),
    ('identity', 'complementary', 'cmae', {'level': 'patch'}),
    ('identity', 'independent', 'cmae', {'level': 'patch'}),
    ('identity', 'independent', 'cmae', {'level': 'image'}),
    ('crops', 'none', 'cmae', {'level': 'image'}),        # SimCLR-like
    ('crops', 'none', 'simsiam', {}),
    ('crops', 'independent', 'cmae', {'level': 'image'}),  # crop + mask
    ('crops', 'independent', 'mae', {}),
]


@pytest.mark.parametrize('views_name,mask,objective,kwargs', MEANINGFUL)
def test_meaningful_pairs_validate(views_name, mask, objective, kwargs):
  config_lib.check_transform(_pretrain(views=views_name, mask=mask,
                                       objective=objective,
                                       objective_kwargs=kwargs))


@pytest.mark.parametrize('views_name,mask,objective,kwargs,why', [
    ('crops', 'none', 'cmae', {'level': 'patch'}, 'positions do not'),
    ('crops', 'independent', 'rmae', {}, 'positions do not'),
    ('crops', 'none', 'mae', {}, 'hides none'),
    ('identity', 'none', 'cmae', {'level': 'image'}, 'identical views'),
    ('identity', 'random', 'rmae', {}, 'gives one'),
    ('crops', 'random', 'simsiam', {}, 'need one mask each'),
    ('warp', 'random', 'mae', {}, 'unknown view transform'),
])
def test_meaningless_pairs_refused(views_name, mask, objective, kwargs, why):
  with pytest.raises(ValueError, match=why):
    config_lib.check_transform(_pretrain(views=views_name, mask=mask,
                                         objective=objective,
                                         objective_kwargs=kwargs))


def test_layout_is_what_the_view_function_gives(images):
  for fn in (views.crops(), views.crops(num_views=3, scale=(1.0, 1.0),
                                        flip=False)):
    num, aligned = views.layout(fn)
    got = fn(jax.random.key(0), images)
    assert len(got) == num and all(v.aligned == aligned for v in got)
  assert views.layout(None) == (1, True)


def test_colour_only_views_allow_patch_objectives():
  config_lib.check_transform(_pretrain(
      views='crops', mask='independent', objective='rmae',
      view_kwargs={'scale': (1.0, 1.0), 'flip': False}))
