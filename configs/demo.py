"""The embedded offline default (`make demo`): minutes on 2 CPU cores.

MAE pre-training of a small ViT on scikit-learn's digits (images only), then
fine-tuning on digits from that checkpoint and from random initialisation,
then a linear probe, then the occlusion invariance of the pre-trained and a
random encoder. Prints what each stage measured.

  --config=configs/demo.py:rmae   the same with another variant of the
                                  transform x similarity matrix
                                  (mimjax/matrix.py), as `make compare`
                                  and `make results` run them
"""

import ml_collections as mlc

from mimjax import config as config_lib
from mimjax import matrix


def get_config(arg: str = 'mae'):
  c = config_lib.base_config()
  c.mode = 'pipeline'
  c.model.size, c.model.patch_size = 'mu', 4
  # Digits are tiny and not mirror-symmetric: mild crops, no flips.
  c.data = config_lib.data_config(name='digits', image_size=32, randaug=False,
                                  erase_prob=0.0, min_scale=0.5, flip=False)
  c.pretrain.data = config_lib.data_config(name='digits', image_size=32,
                                           flip=False)
  c.pretrain.decoder.update(dict(width=64, depth=2, num_heads=4))
  matrix.apply(c, arg, feature_dim=64)
  if c.pretrain.views == 'crops':  # digits are not mirror-symmetric
    c.pretrain.view_kwargs = mlc.ConfigDict(dict(scale=(0.2, 1.0),
                                                 flip=False))
  c.pretrain.batch_size, c.pretrain.epochs = 128, 30
  c.pretrain.warmup_epochs = 5
  c.pretrain.base_lr = 1e-3
  c.pretrain.knn_every, c.pretrain.knn_examples = 110, 1500
  c.pretrain.recon_every = 110
  c.finetune.batch_size, c.finetune.epochs = 128, 10
  c.finetune.warmup_epochs = 2
  c.finetune.base_lr = 1e-2
  c.finetune.drop_path = 0.0
  c.finetune.mixup = c.finetune.cutmix = 0.0
  c.finetune.scratch_baseline = True
  c.finetune.scratch_layer_decay = 1.0  # random init also without decay
  # The reference LARS needs thousands of steps; AdamW fits a probe in minutes.
  c.linprobe.optimizer, c.linprobe.base_lr = 'adamw', 1e-2
  c.linprobe.batch_size, c.linprobe.epochs = 256, 20
  c.linprobe.warmup_epochs = 2
  c.eval_batch_size = 128  # divisible by 1 to 128 devices
  c.log_every, c.checkpoint_every = 50, 300
  return c
