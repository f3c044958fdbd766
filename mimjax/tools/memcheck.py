"""Compile a train step ahead of time and report its per-device memory.

  python -m mimjax.tools.memcheck --config=configs/mae_imagenet.py:L \
      --devices=64 --config.mesh='(8,8,1)' [--stage=finetune]

With --devices, that many CPU devices are simulated, so a pod's sharding can
be checked on a laptop (the memory figures are XLA's for the CPU backend:
parameters and optimizer state are exact, activations indicative). Without
it, the real local devices are used. The step is the stage's, accumulate
included: --config.pretrain.accumulate=k compiles k micro-batches of
batch_size / k images each.
"""

from __future__ import annotations

import sys


from mimjax.tools import quiet_logs, simulate_devices  # pylint: disable=g-import-not-at-top


simulate_devices(sys.argv)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags
from ml_collections import config_flags

from mimjax.tools import memory

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Recipe file.',
                                          lock_config=True)
flags.DEFINE_integer('devices', None, 'Simulated CPU devices (default: real).')
_STAGE = flags.DEFINE_enum('stage', 'pretrain', ['pretrain', 'finetune'],
                           'Which train step to compile.')
_CLASSES = flags.DEFINE_integer('num_classes', 1000, 'Fine-tuning classes.')


def _gib(n):
  return 'n/a' if n is None else f'{n / 2**30:.3f} GiB'


def main(argv):
  del argv
  quiet_logs()
  if _CONFIG.value is None:
    raise app.UsageError('--config is required')
  try:
    r = memory.check(_CONFIG.value, _STAGE.value, _CLASSES.value)
  except ValueError as e:
    print(f'memcheck: error: {e}', file=sys.stderr)
    sys.exit(1)
  k = r['accumulate']
  micro = (f", {k} micro-batches of {r['batch_size'] // k} images" if k > 1
           else '')
  print(f"{_STAGE.value} step compiled for {r['devices']} devices, mesh "
        f"{r['mesh']}, {r['num_params']:,} parameters{micro}")
  print(f"  parameters      {_gib(r['params_per_device'])} per device "
        f"({_gib(r['params_total'])} in all)")
  print(f"  optimizer state {_gib(r['opt_state_per_device'])} per device "
        f"({_gib(r['opt_state_total'])} in all)")
  print(f"  activations and scratch (XLA temp) "
        f"{_gib(r['temp_per_device'])} per device")
  if r['platform'] == 'cpu' and _CONFIG.value.model.remat:
    print('  note: the CPU backend schedules remat\'s recomputation early, so '
          'its temp figure shows no saving from model.remat; compile on the '
          'target device for that')


if __name__ == '__main__':
  app.run(main)
