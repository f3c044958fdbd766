"""Per-device memory of a train step, compiled ahead of time (no arrays).

`python -m mimjax.tools.memcheck` is the command line; this is the library.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mimjax import build
from mimjax import config as config_lib
from mimjax import sharding
from mimjax.training import state as state_lib
from mimjax.training import trainers


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


# Examples per epoch the schedules are built for: ImageNet-1k's train split.
# Only the learning-rate schedule depends on it; it must keep epochs × steps
# per epoch within int32 down to one image per step.
NUM_TRAIN = 1_281_167


def compile_step(config, stage: str = 'pretrain', num_classes: int = 1000):
  """The stage's train step (with the stage's `accumulate`) compiled ahead
  of time, its abstract state and its mesh."""
  config_lib.validate(config, *sharding.topology())
  mesh, rules = build.setup(config)
  if stage == 'pretrain':
    recipe = trainers.pretrain_recipe(config, mesh, num_train=NUM_TRAIN)
    batch_size = config.pretrain.batch_size
  else:
    recipe = trainers.finetune_recipe(config, mesh, NUM_TRAIN, num_classes)
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
                                   rules, recipe.accumulate)
  with sharding.active(mesh, rules):
    compiled = step.jitted.lower(state, batch).compile()
  return compiled, state, mesh


def check(config, stage: str = 'pretrain', num_classes: int = 1000) -> dict:
  """Lowers and compiles the stage's train step; returns memory figures."""
  compiled, state, mesh = compile_step(config, stage, num_classes)
  memory = compiled.memory_analysis()
  return {
      'batch_size': config[stage].batch_size,
      'accumulate': config[stage].accumulate,
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
      'platform': jax.devices()[0].platform,
  }
