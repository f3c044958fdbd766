"""MAE on ImageNet-1k: pre-train, fine-tune, linear probe (He et al. 2021).

  --config=configs/mae_imagenet.py:B        ViT-B/16, 800 pre-training epochs
  --config=configs/mae_imagenet.py:L,1600   ViT-L/16, 1600 epochs
  --config=configs/mae_imagenet.py:H        ViT-H/14

Numbers from the paper and the official repository (PRETRAIN.md,
FINETUNE.md). ImageNet must be prepared for tfds (manual download).
"""

from mimjax import config as config_lib

# size: patch, fine-tune (base lr, layer decay, drop path, epochs), reference top-1
SIZES = {
    'B': (16, 5e-4, 0.65, 0.1, 100, 83.6, 68.0),
    'L': (16, 1e-3, 0.75, 0.2, 50, 85.9, 75.8),
    'H': (14, 1e-3, 0.75, 0.3, 50, 86.9, 76.6),
}


def get_config(arg: str = 'B'):
  size, _, epochs = arg.partition(',')
  patch, ft_lr, layer_decay, drop_path, ft_epochs, top1, lin = SIZES[size]
  c = config_lib.base_config()
  c.mode = 'pipeline'
  c.model.size, c.model.patch_size = size, patch
  c.model.dtype = 'bfloat16'
  c.data = config_lib.data_config(name='imagenet2012', image_size=224,
                                  train_split='train', eval_split='validation',
                                  prepare=False)
  c.pretrain.data = config_lib.data_config(name='imagenet2012', image_size=224,
                                           prepare=False)
  c.pretrain.epochs = int(epochs or 800)
  c.pretrain.batch_size = 4096
  c.pretrain.knn_every = 5000
  c.pretrain.recon_every = 5000
  c.finetune.base_lr, c.finetune.layer_decay = ft_lr, layer_decay
  c.finetune.drop_path, c.finetune.epochs = drop_path, ft_epochs
  c.linprobe.batch_size = 16384
  c.eval_batch_size = 1024
  c.log_every = 100
  c.checkpoint_every = 2000
  c.reference = dict(finetune_top1=top1, linprobe_top1=lin,
                     source='MAE paper, Table 3 / official repo')
  return c
