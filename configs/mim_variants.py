"""The paper's variants of MAE pre-training (Kong & Zhang, CVPR 2023).

  --config=configs/mim_variants.py:siamese    siamese-form MAE (inner loop)
  --config=configs/mim_variants.py:rmae       R-MAE (RelaxMIM)
  --config=configs/mim_variants.py:cmae       C-MAE, patch-level InfoNCE
  --config=configs/mim_variants.py:cmae_image C-MAE, image-level InfoNCE
  --config=configs/mim_variants.py:simsiam    complementary masks + SimSiam

Add ',B' (default) or ',L' for the ViT size. Everything else is the MAE
ImageNet recipe (configs/mae_imagenet.py).
"""

import importlib.util
import os

import ml_collections as mlc

VARIANTS = {
    'mae': ('random', 'mae', dict(norm_pix=True)),
    'siamese': ('complementary', 'siamese', dict(norm_pix=True, inner_steps=1)),
    'rmae': ('complementary', 'rmae', dict(norm_pix=True, lam=1.0)),
    'cmae': ('complementary', 'cmae', dict(level='patch', temperature=0.2,
                                           max_positions=16)),
    'cmae_image': ('complementary', 'cmae', dict(level='image',
                                                 temperature=0.2)),
    'simsiam': ('complementary', 'simsiam', dict()),
}


def _mae_config(size):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'mae_imagenet.py')
  spec = importlib.util.spec_from_file_location('mae_imagenet', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(size)


def get_config(arg: str = 'rmae'):
  variant, _, size = arg.partition(',')
  if variant not in VARIANTS:
    raise ValueError(f'unknown variant {variant!r}; known: {sorted(VARIANTS)}')
  c = _mae_config(size or 'B')
  mask, objective, kwargs = VARIANTS[variant]
  c.pretrain.mask, c.pretrain.objective = mask, objective
  c.pretrain.objective_kwargs = mlc.ConfigDict(kwargs)
  if objective == 'cmae' and kwargs['level'] == 'patch':
    c.pretrain.decoder.out_dim = 256  # feature head
  c.reference = dict(note='paper: R-MAE and C-MAE fine-tune close to MAE '
                     '(C-MAE about equal, R-MAE somewhat lower)')
  return c
