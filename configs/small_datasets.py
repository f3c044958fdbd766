"""MAE pipeline on small public datasets (tfds must have them prepared).

  --config=configs/small_datasets.py:cifar10
  --config=configs/small_datasets.py:cifar100
  --config=configs/small_datasets.py:imagenette
"""

from mimjax import config as config_lib

DATASETS = {
    # name: (image size, model, patch, eval split, pretrain epochs)
    'cifar10': (32, 'S', 4, 'test', 400),
    'cifar100': (32, 'S', 4, 'test', 400),
    'imagenette': (224, 'S', 16, 'validation', 800),
}


def get_config(arg: str = 'cifar10'):
  size, model, patch, eval_split, epochs = DATASETS[arg]
  c = config_lib.base_config()
  c.model.size, c.model.patch_size = model, patch
  c.data = config_lib.data_config(name=arg, image_size=size,
                                  eval_split=eval_split, prepare=False)
  c.pretrain.data = config_lib.data_config(name=arg, image_size=size,
                                           prepare=False)
  c.pretrain.decoder.update(dict(width=256, depth=4, num_heads=8))
  c.pretrain.batch_size, c.pretrain.epochs = 512, epochs
  c.pretrain.warmup_epochs = 20
  c.pretrain.knn_every = 2000
  c.pretrain.recon_every = 2000
  c.finetune.batch_size, c.finetune.epochs = 512, 100
  c.linprobe.batch_size, c.linprobe.epochs = 4096, 90
  c.eval_batch_size = 512
  c.log_every, c.checkpoint_every = 100, 2000
  return c
