"""One-image pre-training (the paper's data-agnostic evidence).

MAE pre-trained on random-resized crops of one photo, then fine-tuned on the
target dataset; compare with `scratch_baseline` (random init).

  --config=configs/one_image.py                  ViT-mu on the bundled photo, digits
  --config=configs/one_image.py:imagenette       ViT-S/16 on imagenette
  --config.pretrain.data.one_image_path=/path/to/photo.jpg
"""

from mimjax import config as config_lib


def get_config(arg: str = 'digits'):
  c = config_lib.base_config()
  c.mode = 'pipeline'
  c.finetune.scratch_baseline = True
  c.linprobe.enabled = False
  if arg == 'imagenette':
    c.model.size, c.model.patch_size = 'S', 16
    c.data = config_lib.data_config(name='imagenette', image_size=224,
                                    train_split='train',
                                    eval_split='validation', prepare=False)
    c.pretrain.data = config_lib.data_config(name='one_image', image_size=224)
    c.pretrain.steps, c.pretrain.warmup_steps = 20_000, 1_000
    c.pretrain.batch_size = 256
    c.finetune.batch_size, c.finetune.epochs = 256, 100
  else:  # configs/demo.py's recipe, pre-trained on one photo
    c.model.size, c.model.patch_size = 'mu', 4
    c.data = config_lib.data_config(name='digits', image_size=32,
                                    randaug=False, erase_prob=0.0,
                                    min_scale=0.5, flip=False)
    c.pretrain.data = config_lib.data_config(name='one_image', image_size=32)
    c.pretrain.steps, c.pretrain.warmup_steps = 330, 55
    c.pretrain.batch_size, c.pretrain.base_lr = 128, 1e-3
    c.pretrain.decoder.update(dict(width=64, depth=2, num_heads=4))
    c.finetune.batch_size, c.finetune.epochs = 128, 10
    c.finetune.warmup_epochs, c.finetune.base_lr = 2, 1e-2
    c.finetune.drop_path = 0.0
    c.finetune.mixup = c.finetune.cutmix = 0.0
    c.eval_batch_size = 128
    c.log_every, c.checkpoint_every = 50, 300
  return c
