"""Compile a train step ahead of time and report its per-device memory.

  python -m mimjax.tools.memcheck --config=configs/mae_imagenet.py:L \
      --devices=64 --config.mesh='(8,8,1)' [--stage=finetune]

With --devices, that many CPU devices are simulated, so a pod's sharding can
be checked on a laptop (the memory figures are XLA's for the CPU backend:
parameters and optimizer state are exact, activations indicative). Without
it, the real local devices are used.
"""

from __future__ import annotations

import os
import sys


def _simulate_devices(argv):
  for arg in argv:
    if arg.startswith('--devices='):
      count = int(arg.split('=', 1)[1])
      os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                                 f' --xla_force_host_platform_device_count={count}')
      os.environ['JAX_PLATFORMS'] = 'cpu'


_simulate_devices(sys.argv)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from mimjax import config as config_lib
from mimjax import sharding
from mimjax.training import state as state_lib
from mimjax.training import trainers

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Recipe file.',
                                          lock_config=True)
flags.DEFINE_integer('devices', None, 'Simulated CPU devices (default: real).')
_STAGE = flags.DEFINE_enum('stage', 'pretrain', ['pretrain', 'finetune'],
                           'Which train step to compile.')
_CLASSES = flags.DEFINE_integer('num_classes', 1000, 'Fine-tuning classes.')


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (max)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard)) * jnp.dtype(leaf.dtype).itemsize
  return total


def total_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def check(config, stage: str = 'pretrain', num_classes: int = 1000) -> dict:
  """Lowers and compiles the stage's train step; returns memory figures."""
  config_lib.validate(config, jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from(config.sharding_rules)
  if stage == 'pretrain':
    recipe = trainers.pretrain_recipe(config, mesh, num_train=10**9)
    batch_size = config.pretrain.batch_size
  else:
    recipe = trainers.finetune_recipe(config, mesh, 10**9, num_classes)
    batch_size = config.finetune.batch_size
  state, shardings = state_lib.abstract(recipe.init_variables, recipe.tx,
                                        config.seed, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh)
  size = recipe.image_size
  batch = {
      'image': jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32,
                                    sharding=batch_sharding),
      'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32,
                                    sharding=batch_sharding)}
  step = state_lib.make_train_step(recipe.loss_fn, recipe.tx, shardings, mesh,
                                   rules)
  with sharding.active(mesh, rules):
    compiled = step.jitted.lower(state, batch).compile()
  memory = compiled.memory_analysis()
  return {
      'devices': jax.device_count(),
      'mesh': dict(mesh.shape),
      'params_total': total_bytes(state.params),
      'params_per_device': per_device_bytes(state.params),
      'opt_state_total': total_bytes(state.opt_state),
      'opt_state_per_device': per_device_bytes(state.opt_state),
      'temp_per_device': getattr(memory, 'temp_size_in_bytes', None),
      'argument_per_device': getattr(memory, 'argument_size_in_bytes', None),
      'num_params': sum(int(np.prod(x.shape))
                        for x in jax.tree.leaves(state.params)),
  }


def _gib(n):
  return 'n/a' if n is None else f'{n / 2**30:.3f} GiB'


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise app.UsageError('--config is required')
  try:
    r = check(_CONFIG.value, _STAGE.value, _CLASSES.value)
  except ValueError as e:
    print(f'memcheck: error: {e}', file=sys.stderr)
    sys.exit(1)
  print(f"{_STAGE.value} step compiled for {r['devices']} devices, mesh "
        f"{r['mesh']}, {r['num_params']:,} parameters")
  print(f"  parameters      {_gib(r['params_per_device'])} per device "
        f"({_gib(r['params_total'])} in all)")
  print(f"  optimizer state {_gib(r['opt_state_per_device'])} per device "
        f"({_gib(r['opt_state_total'])} in all)")
  print(f"  activations and scratch (XLA temp) "
        f"{_gib(r['temp_per_device'])} per device")


if __name__ == '__main__':
  app.run(main)
