"""The paper's analyses as a run mode: occlusion invariance and cross-model CKA."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimjax import main as main_lib
from mimjax import sharding
from mimjax.analysis import report
from tiny_config import tiny_config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


class VisiblePatchIds(nn.Module):
  """A stand-in encoder whose one 'block' outputs the one-hot id of every
  visible patch, so an image feature says exactly which patches a view saw."""
  num_patches: int

  @nn.compact
  def __call__(self, images, ids_keep=None, train=False):
    b = images.shape[0]
    if ids_keep is None:
      ids_keep = jnp.broadcast_to(jnp.arange(self.num_patches),
                                  (b, self.num_patches))
    tokens = jax.nn.one_hot(ids_keep, self.num_patches)
    cls = jnp.zeros((b, 1, self.num_patches))
    return {'layers': jnp.concatenate([cls, tokens], axis=1)[None]}


def test_views_are_complementary_and_features_are_patch_means(data_dir):
  c = tiny_config(data_dir)
  c.analyze.examples, c.analyze.mask_ratio = 150, 0.25
  num_patches = (16 // 4)**2
  feats = report.layer_features(
      c, VisiblePatchIds(num_patches), {}, sharding.config_mesh(c),
      sharding.rules_from(None))
  assert {k: v.shape for k, v in feats.items()} == {
      k: (1, 150, num_patches) for k in ('whole', 'view_a', 'view_b')}
  whole, a, b = feats['whole'][0], feats['view_a'][0], feats['view_b'][0]
  np.testing.assert_allclose(whole, 1 / num_patches)
  # View A sees 12 of 16 patches, view B exactly the other 4.
  np.testing.assert_allclose(a * 12 + b * 4, 1.0, atol=1e-6)
  assert ((a > 0) != (b > 0)).all()
  assert len({tuple(row) for row in (a > 0)}) > 100  # a fresh mask per image
  # An image's masks do not depend on how the stream is batched.
  c.eval_batch_size = 30
  again = report.layer_features(
      c, VisiblePatchIds(num_patches), {}, sharding.config_mesh(c),
      sharding.rules_from(None))
  np.testing.assert_array_equal(again['view_a'], feats['view_a'])


def test_analyze_mode_same_encoder_twice(tmp_path, data_dir):
  c = tiny_config(data_dir, mode='analyze')
  c.analyze.encoders = 'one=random, two=random'
  summaries = main_lib.run(c, str(tmp_path))
  assert [(s['stage'], s['init']) for s in summaries] == [
      ('analyze', 'one'), ('analyze', 'two')]
  with open(tmp_path / 'analyze' / 'analysis.json') as f:
    analysis = json.load(f)
  one, two = analysis['encoders']['one'], analysis['encoders']['two']
  assert one['invariance_cka'] == two['invariance_cka']
  matrix = np.array(analysis['cka']['one vs two'])
  np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-5)
  assert (matrix <= 1 + 1e-5).all()
  assert os.path.exists(tmp_path / 'analyze' / 'cka_one_vs_two.png')


@pytest.mark.parametrize('spec, error, message', [
    ('mae', ValueError, "analyze.encoders: 'mae' is not name=path"),
    ('mae=/no/such/run', FileNotFoundError,
     'analyze.encoders: mae=/no/such/run does not exist'),
])
def test_bad_encoder_list_fails_before_training(tmp_path, data_dir, spec,
                                                 error, message):
  c = tiny_config(data_dir, mode='pipeline')
  c.analyze.encoders = spec
  with pytest.raises(error, match=message):
    main_lib.run(c, str(tmp_path))
  assert not os.path.exists(tmp_path / 'pretrain')
