"""A tiny recipe for tests: ViT-mu on 16x16 digits, seconds per stage.

  --config=tests/tiny_config.py:/path/to/tfds_data_dir
"""

from mimjax import config as config_lib


def get_config(data_dir: str = ''):
  return tiny_config(data_dir or None)


def tiny_config(data_dir, **overrides):
  """A ViT-mu on 16x16 digits: seconds per stage on a CPU."""
  c = config_lib.base_config()
  c.model.size, c.model.patch_size = 'mu', 4
  for data in (c.data, c.pretrain.data):
    data.update(dict(name='digits', image_size=16, data_dir=str(data_dir) if data_dir else None,
                     randaug=False, erase_prob=0.0, min_scale=0.5, flip=False))
  c.pretrain.decoder.update(dict(width=32, depth=1, num_heads=4))
  c.pretrain.update(dict(batch_size=32, steps=40, warmup_steps=5,
                         base_lr=2e-3))
  c.finetune.update(dict(batch_size=32, steps=120, warmup_steps=10,
                         base_lr=3e-2, drop_path=0.0, mixup=0.0, cutmix=0.0))
  c.linprobe.update(dict(batch_size=64, steps=60, warmup_steps=5,
                         optimizer='adamw', base_lr=4e-2))
  c.analyze.examples = 200
  c.eval_batch_size = 100
  c.log_every, c.checkpoint_every = 5, 20
  for key, value in overrides.items():
    node = c
    *path, last = key.split('.')
    for p in path:
      node = node[p]
    node[last] = value
  return c
