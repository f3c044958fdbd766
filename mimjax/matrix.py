"""The paper's transform x similarity matrix, as named config settings.

A variant is a transform (how the views are made) and a similarity (how
they are compared); `apply` writes one into a config's `pretrain`:

  transforms    complementary   two complementary masks of the image
                independent     two independent random masks
                crops           two random-resized crops + flip + colour
                crop_mask       two crops, each with its own random mask
  similarities  l2              pixel L2 through the decoder, Eq. 7 (siamese)
                l2_relaxed      the same, relaxed (R-MAE)
                patch_nce       patch-level InfoNCE (C-MAE)
                image_nce       image-level InfoNCE
                simsiam         negative cosine, predictor + stop-gradient

Spell a cell 'transform+similarity' ('crops+image_nce' is SimCLR-like), or
use a paper name from VARIANTS. Cells that make no sense are refused by
`config.check_transform`, which says why.
"""

from __future__ import annotations

import ml_collections as mlc

from mimjax import errors

TRANSFORMS = {
    'complementary': ('identity', 'complementary'),
    'independent': ('identity', 'independent'),
    'crops': ('crops', 'none'),
    'crop_mask': ('crops', 'independent'),
}
SIMILARITIES = {
    'l2': ('siamese', dict(norm_pix=True, inner_steps=1)),
    'l2_relaxed': ('rmae', dict(norm_pix=True, lam=1.0)),
    'patch_nce': ('cmae', dict(level='patch', temperature=0.2,
                               max_positions=16)),
    'image_nce': ('cmae', dict(level='image', temperature=0.2)),
    'simsiam': ('simsiam', dict()),
}
VARIANTS = {
    'siamese': 'complementary+l2',
    'rmae': 'complementary+l2_relaxed',
    'cmae': 'complementary+patch_nce',
    'cmae_image': 'complementary+image_nce',
    'simsiam': 'complementary+simsiam',
    'simclr': 'crops+image_nce',
    'crop_mask': 'crop_mask+image_nce',
}


def names() -> list[str]:
  """Every variant name `apply` accepts: 'mae', the paper's, every cell."""
  return ['mae', *VARIANTS,
          *(f'{t}+{s}' for t in TRANSFORMS for s in SIMILARITIES)]


def apply(c: mlc.ConfigDict, variant: str, feature_dim: int):
  """Sets c.pretrain's views, mask and objective for `variant`.

  `feature_dim`: the decoder's output width for patch InfoNCE (a feature
  head instead of pixels).
  """
  p = c.pretrain
  if variant in ('', 'mae'):
    p.views, p.mask, p.objective = 'identity', 'random', 'mae'
    p.objective_kwargs = mlc.ConfigDict(dict(norm_pix=True))
    return c
  transform, _, similarity = VARIANTS.get(variant, variant).partition('+')
  if transform not in TRANSFORMS or similarity not in SIMILARITIES:
    raise errors.Invalid(f'unknown variant {variant!r}; known: mae, '
                         f'{", ".join(VARIANTS)} or transform+similarity with '
                         f'transform in {sorted(TRANSFORMS)}, similarity in '
                         f'{sorted(SIMILARITIES)}')
  p.views, p.mask = TRANSFORMS[transform]
  p.objective, kwargs = SIMILARITIES[similarity]
  p.objective_kwargs = mlc.ConfigDict(kwargs)
  if similarity == 'patch_nce':
    p.decoder.out_dim = feature_dim
  return c
