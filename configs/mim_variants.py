"""The paper's variants of MAE pre-training (Kong & Zhang, CVPR 2023).

  --config=configs/mim_variants.py:siamese    siamese-form MAE (Eq. 7)
  --config=configs/mim_variants.py:rmae       R-MAE (RelaxMIM)
  --config=configs/mim_variants.py:cmae       C-MAE, patch-level InfoNCE
  --config=configs/mim_variants.py:cmae_image C-MAE, image-level InfoNCE
  --config=configs/mim_variants.py:simsiam    complementary masks + SimSiam
  --config=configs/mim_variants.py:simclr     two crops + colour, image InfoNCE
  --config=configs/mim_variants.py:crop_mask  two masked crops, image InfoNCE
  --config=configs/mim_variants.py:crops+simsiam   any transform+similarity
                                                   cell (mimjax/matrix.py)

Add ',B' (default) or ',L' for the ViT size. Everything else is the MAE
ImageNet recipe (configs/mae_imagenet.py).
"""

from mimjax import matrix
from configs import mae_imagenet


def get_config(arg: str = 'rmae'):
  variant, _, size = arg.partition(',')
  c = mae_imagenet.get_config(size or 'B')
  matrix.apply(c, variant, feature_dim=256)
  c.reference = dict(note='paper: R-MAE and C-MAE fine-tune close to MAE '
                     '(C-MAE about equal, R-MAE somewhat lower)')
  return c
