"""Every recipe in configs/ loads and passes validation on a plausible mesh."""

import importlib.util
import os

import pytest

from mimjax import config as config_lib

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'configs')

RECIPES = [
    ('demo.py', ''), ('demo.py', 'siamese'), ('demo.py', 'cmae'),
    ('mae_imagenet.py', 'B'), ('mae_imagenet.py', 'L,1600'),
    ('mae_imagenet.py', 'H'),
    *[('mim_variants.py', v) for v in ('mae', 'siamese', 'rmae', 'cmae',
                                       'cmae_image', 'simsiam', 'rmae,L')],
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
      f for f in os.listdir(CONFIGS) if f.endswith('.py')}


@pytest.mark.parametrize('name, arg', RECIPES)
@pytest.mark.parametrize('devices', [1, 8])
def test_recipe_is_valid(name, arg, devices):
  config = _load(name).get_config(arg)
  config_lib.validate(config, devices)
