"""Run by test_scale.py under 8 simulated CPU devices: prints JSON.

For each mesh, 3 pre-training and 3 fine-tuning steps on fixed random
batches; reports the largest difference to the single-device run.
"""

import json
import sys

from flax import traverse_util
import jax
import numpy as np

from mimjax import sharding
from mimjax.training import state as state_lib
from mimjax.training import trainers
from tiny_config import tiny_config

MESHES = [(8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]


def max_difference(params, ref_params) -> float:
  """Largest |a - b| over the parameters, attention key biases excepted.

  A key bias adds the same q.b_k to every logit of a query, so softmax makes
  its true gradient zero; what it gets is rounding noise, which Adam turns
  into steps of about lr either way, so it is not compared.
  """
  a = traverse_util.flatten_dict(params, sep='/')
  b = traverse_util.flatten_dict(ref_params, sep='/')
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a
             if not k.endswith('key/bias'))


def run(config, stage, devices, mesh_shape):
  mesh = sharding.make_mesh(mesh_shape, devices)
  rules = sharding.rules_from(None)
  if stage == 'pretrain':
    recipe = trainers.pretrain_recipe(config, mesh, num_train=10**6)
  else:
    recipe = trainers.finetune_recipe(config, mesh, 10**6, num_classes=10)
  state, shardings = state_lib.create(recipe.init_variables, recipe.tx,
                                      config.seed, mesh, rules)
  step = state_lib.make_train_step(recipe.loss_fn, recipe.tx, shardings, mesh,
                                   rules, recipe.accumulate)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(3):
    batch = {'image': rng.standard_normal((32, 16, 16, 3), np.float32),
             'label': rng.integers(0, 10, (32,)).astype(np.int32)}
    state, metrics = step(state, sharding.global_batch(batch, mesh))
    losses.append(float(metrics['loss']))
  return losses, jax.tree.map(np.asarray, jax.device_get(state.params))


def main():
  config = tiny_config(None)
  config.finetune.update(dict(drop_path=0.1, mixup=0.8, cutmix=1.0))
  devices = jax.devices()
  assert len(devices) == 8, devices
  out = {}
  for stage in ('pretrain', 'finetune'):
    ref_loss, ref_params = run(config, stage, devices[:1], (1, 1, 1))
    for mesh in MESHES:
      loss, params = run(config, stage, devices, mesh)
      diff = max_difference(params, ref_params)

      out[f'{stage} {mesh}'] = {
          'loss_diff': max(abs(a - b) for a, b in zip(loss, ref_loss)),
          'param_diff': diff}
  json.dump(out, sys.stdout)


if __name__ == '__main__':
  main()
