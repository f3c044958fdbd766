"""Every recipe in configs/ loads and passes validation on a plausible mesh."""

import importlib.util
import os

import pytest

from mimjax import config as config_lib
from mimjax import matrix

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'configs')

RECIPES = [
    ('demo.py', ''), ('demo.py', 'siamese'), ('demo.py', 'cmae'),
    ('demo.py', 'simclr'), ('demo.py', 'crop_mask'),
    ('mae_imagenet.py', 'B'), ('mae_imagenet.py', 'L,1600'),
    ('mae_imagenet.py', 'H'),
    *[('mim_variants.py', v) for v in ('mae', 'siamese', 'rmae', 'cmae',
                                       'cmae_image', 'simsiam', 'simclr',
                                       'crop_mask', 'rmae,L')],
    ('one_image.py', 'digits'), ('one_image.py', 'imagenette'),
    *[('small_datasets.py', d) for d in ('cifar10', 'cifar100', 'imagenette')],
]


def _load(name):
  spec = importlib.util.spec_from_file_location(name[:-3],
                                                os.path.join(CONFIGS, name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_recipe_is_listed():
  assert {name for name, _ in RECIPES} == {
      f for f in os.listdir(CONFIGS)
      if f.endswith('.py') and f != '__init__.py'}


@pytest.mark.parametrize('name, arg', RECIPES)
@pytest.mark.parametrize('devices', [1, 8])
def test_recipe_is_valid(name, arg, devices):
  config = _load(name).get_config(arg)
  config_lib.validate(config, devices)


# The cells of the transform x similarity matrix that make no sense, and
# the reason each is refused with.
REFUSED = {
    'crops+l2': 'positions do not correspond',
    'crops+l2_relaxed': 'positions do not correspond',
    'crops+patch_nce': 'positions do not correspond',
    'crop_mask+l2': 'positions do not correspond',
    'crop_mask+l2_relaxed': 'positions do not correspond',
    'crop_mask+patch_nce': 'positions do not correspond',
}


@pytest.mark.parametrize('variant', matrix.names())
def test_every_matrix_cell_validates_or_says_why(variant):
  config = _load('demo.py').get_config(variant)
  if variant in REFUSED:
    with pytest.raises(ValueError, match=REFUSED[variant]):
      config_lib.validate(config, 1)
  else:
    config_lib.validate(config, 1)


def test_attention_leaves_the_stage_fingerprint_alone():
  """model.attention changes no parameter: a stage resumes under any
  choice, and a fingerprint written before the key existed still matches."""
  config = config_lib.base_config()
  before = config_lib.stage_fingerprint(config, 'pretrain')
  assert not any('attention' in key for key in before)
  config.model.attention = 'xla'
  assert config_lib.stage_fingerprint(config, 'pretrain') == before
  assert not config_lib.fingerprint_changes(
      {**before, 'model.attention': 'cudnn'}, before)


def test_a_key_added_to_the_schema_resumes_at_its_default():
  old = {'data.name': 'digits'}  # written before data.holdout existed
  assert config_lib.fingerprint_changes(
      old, {'data.name': 'digits', 'data.holdout': 0.1}) == []
  assert config_lib.fingerprint_changes(
      old, {'data.name': 'digits', 'data.holdout': 0.2}) == [
          "data.holdout '<unset>' -> 0.2"]
