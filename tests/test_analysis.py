"""The paper's analyses as a run mode: occlusion invariance and cross-model CKA."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimjax.training import pipeline
from mimjax import sharding
from mimjax.analysis import plots, report
from mimjax.models import vit
from mimjax import build
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


class PatchPixels(nn.Module):
  """A stand-in encoder that compiles in no time, with two 'blocks': each
  patch's pixels, and a random non-linear projection of them plus a large
  offset every image shares (as a ViT's features have)."""
  patch_size: int

  @nn.compact
  def __call__(self, images, ids_keep=None, train=False):
    patches = vit.patchify(images, self.patch_size)
    if ids_keep is not None:
      patches = jnp.take_along_axis(patches, ids_keep[..., None], axis=1)
    d = patches.shape[-1]
    w = self.param('w', nn.initializers.normal(1.0), (d, d))
    blocks = jnp.stack([patches, jnp.tanh(patches @ w / np.sqrt(d)) + 3.0])
    cls = jnp.zeros_like(blocks[:, :, :1])
    return {'layers': jnp.concatenate([cls, blocks], axis=2)}


def _analyze(monkeypatch, workdir, data_dir, examples, eval_batch_size,
             encoders='one=random,two=random'):
  """report.run with the stand-in encoder: (summaries, analysis.json)."""
  monkeypatch.setattr(build, 'encoder',
                      lambda model: PatchPixels(model.patch_size))
  c = tiny_config(data_dir, mode='analyze')
  c.analyze.examples, c.eval_batch_size = examples, eval_batch_size
  summaries = report.run(c, str(workdir),
                         report.parse_encoders(encoders, ''))
  with open(workdir / 'analysis.json') as f:
    return summaries, json.load(f)


def test_minibatch_estimator_leaves_out_a_last_batch_of_3_or_fewer(
    monkeypatch, tmp_path, data_dir):
  # analyze.examples cuts the third batch of 100 to 2 images.
  summaries, analysis = _analyze(monkeypatch, tmp_path, data_dir, 202, 100)
  assert analysis['cka_estimator'] == 'minibatch_unbiased'
  assert analysis['cka_batch_size'] == 100
  assert analysis['examples'] == 200
  assert analysis['dropped_examples'] == 2
  assert 'had 2 image(s)' in analysis['note']
  np.testing.assert_allclose(np.diag(analysis['cka']['one vs two']), 1.0,
                             atol=1e-5)
  one = analysis['encoders']['one']
  assert summaries[0] == {
      'stage': 'analyze', 'init': 'one',
      'invariance': one['invariance_cka'][-1],
      'invariance_cosine_centred': one['invariance_cosine_centred'][-1]}


def test_minibatch_and_full_batch_agree_on_the_same_images(
    monkeypatch, tmp_path, data_dir):
  # The split's 300 images in batches of 99: the last batch is 3 images and
  # 96 of padding, and is left out. The same 297 images at once (one batch
  # of 297): the full-batch linear CKA.
  _, streamed = _analyze(monkeypatch, tmp_path / 'a', data_dir, 300, 99)
  _, full = _analyze(monkeypatch, tmp_path / 'b', data_dir, 297, 297)
  assert streamed['cka_estimator'] == 'minibatch_unbiased'
  assert streamed['cka_batch_size'] == 99
  assert streamed['examples'] == 297 and streamed['dropped_examples'] == 3
  assert 'had 3 image(s)' in streamed['note']
  assert full['cka_estimator'] == 'linear'
  assert full['examples'] == full['cka_batch_size'] == 297
  assert full['dropped_examples'] == 0 and 'note' not in full
  s, f = streamed['encoders']['one'], full['encoders']['one']
  # Per-image means over the same images: the same up to float rounding.
  for key in ('invariance_cosine', 'invariance_cosine_centred'):
    np.testing.assert_allclose(s[key], f[key], atol=1e-5)
  # Two estimators of CKA: within 0.05 of each other on 297 images.
  np.testing.assert_allclose(s['invariance_cka'], f['invariance_cka'],
                             atol=0.05)
  # The shared offset of block 2 inflates the plain cosine only.
  assert f['invariance_cosine'][1] > 0.9
  assert f['invariance_cosine_centred'][1] < f['invariance_cosine'][1] - 0.2
  for analysis in (streamed, full):
    np.testing.assert_allclose(np.diag(analysis['cka']['one vs two']), 1.0,
                               atol=1e-5)


def test_cka_overview_of_seven_encoders(tmp_path):
  names = ['mae', 'siamese', 'rmae', 'cmae', 'simclr', 'one_image', 'random']
  rng = np.random.default_rng(0)
  pairs = {(a, b): rng.uniform(size=(12, 12))
           for i, a in enumerate(names) for b in names[i + 1:]}
  plots.plot_cka_overview(str(tmp_path / 'overview.png'), names, pairs)
  with open(tmp_path / 'overview.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


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
  summaries = pipeline.run(c, str(tmp_path))
  assert [(s['stage'], s['init']) for s in summaries] == [
      ('analyze', 'one'), ('analyze', 'two')]
  with open(tmp_path / 'analyze' / 'analysis.json') as f:
    analysis = json.load(f)
  one, two = analysis['encoders']['one'], analysis['encoders']['two']
  assert one['invariance_cka'] == two['invariance_cka']
  assert one['invariance_cosine_centred'] == two['invariance_cosine_centred']
  assert len(one['invariance_cosine_centred']) == len(one['invariance_cka'])
  assert summaries[0]['invariance_cosine_centred'] == (
      one['invariance_cosine_centred'][-1])
  # 200 images > eval_batch_size 100: the minibatch estimator.
  assert analysis['cka_estimator'] == 'minibatch_unbiased'
  assert analysis['cka_batch_size'] == 100
  assert analysis['examples'] == 200 and analysis['dropped_examples'] == 0
  matrix = np.array(analysis['cka']['one vs two'])
  np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-5)
  assert (matrix <= 1 + 1e-5).all()
  for png in ('cka_one_vs_two.png', 'cka_overview.png'):
    assert os.path.exists(tmp_path / 'analyze' / png)


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
    pipeline.run(c, str(tmp_path))
  assert not os.path.exists(tmp_path / 'pretrain')
