"""accumulate=k: one update per step from k micro-batches of batch / k."""

import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fast_jit import fast_xla_flags
from mimjax import sharding
from mimjax.tools import memory
from mimjax.training import state as state_lib
from tiny_config import tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))


def _mlp_steps(loss_fn, batch_size=16, width=4):
  """One SGD step of a small MLP on a fixed batch, with accumulate 1 and 4:
  [(state, metrics), (state, metrics)]."""
  model = nn.Sequential([nn.Dense(8), nn.gelu, nn.Dense(3)])

  def init_variables(key):
    variables = model.init(key, jnp.zeros((1, width)))
    return {**variables, 'seen': {'micro_batches': jnp.zeros((), jnp.int32),
                                  'rng': jnp.zeros((2,), jnp.uint32)}}

  tx = optax.sgd(0.1)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = sharding.rules_from(None)
  x = np.random.default_rng(0).standard_normal((batch_size, width))
  batch = sharding.global_batch({'image': x.astype(np.float32)}, mesh)
  out = []
  for accumulate in (1, 4):
    state, shardings = state_lib.create(init_variables, tx, 0, mesh, rules)
    step = state_lib.make_train_step(
        lambda p, e, b, r: loss_fn(model, p, e, b, r), tx, shardings, mesh,
        rules, accumulate)
    out.append(step(state, batch))
  return out


def _squares(model, params, extra, batch, rng):
  """A per-example mean that ignores `rng`; counts its calls in `extra`
  and keeps the last key it was given."""
  out = model.apply({'params': params}, batch['image'])
  seen = {'micro_batches': extra['seen']['micro_batches'] + 1,
          'rng': jax.random.key_data(rng)}
  metrics = {'rows': jnp.float32(batch['image'].shape[0])}
  return jnp.mean(out ** 2), (metrics, {'seen': seen})


def test_four_micro_batches_make_the_full_batch_update():
  (one, m1), (four, m4) = _mlp_steps(_squares)
  for a, b in zip(jax.tree.leaves(jax.device_get(one.params)),
                  jax.tree.leaves(jax.device_get(four.params))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m1['loss'], m4['loss'], rtol=1e-6)
  np.testing.assert_allclose(m1['grad_norm'], m4['grad_norm'], rtol=1e-5)
  assert float(m1['rows']) == 16 and float(m4['rows']) == 4
  assert int(one.step) == int(four.step) == 1
  # `extra` passes through the micro-batches; the last draws fold_in(key, 3).
  assert int(one.extra['seen']['micro_batches']) == 1
  assert int(four.extra['seen']['micro_batches']) == 4
  key = jax.random.fold_in(jax.random.wrap_key_data(one.rng), 0)
  np.testing.assert_array_equal(one.extra['seen']['rng'],
                                jax.random.key_data(key))
  np.testing.assert_array_equal(
      four.extra['seen']['rng'],
      jax.random.key_data(jax.random.fold_in(key, 3)))


def test_a_non_finite_micro_batch_skips_the_update():
  def nan_in_the_last(model, params, extra, batch, rng):
    loss, aux = _squares(model, params, extra, batch, rng)
    return jnp.where(aux[1]['seen']['micro_batches'] == 4, jnp.nan,
                     loss), aux

  (_, _), (four, metrics) = _mlp_steps(nan_in_the_last)
  assert not bool(metrics['finite'])
  assert int(four.extra['seen']['micro_batches']) == 0  # the old extra


def test_micro_batches_cut_the_step_memory():
  """The tiny pre-training step at batch 256: XLA's temp memory with
  accumulate=4 is well under that of the whole batch."""
  temp = {}
  for accumulate in (1, 4):
    c = tiny_config(None, mode='pretrain', mesh=(1, 1, 1))
    c.pretrain.update(dict(batch_size=256, accumulate=accumulate))
    compiled = memory.compile_step(c)[0]
    temp[accumulate] = compiled.memory_analysis().temp_size_in_bytes
  assert temp[4] < 0.6 * temp[1], temp


def test_micro_batches_stay_on_their_devices():
  """On a 4-way data-parallel mesh the accumulate=4 step moves no batch
  between devices: its only collectives are the gradient all-reduces."""
  code = (
      'from mimjax.tools import memory;'
      'from tiny_config import tiny_config;'
      'c = tiny_config(None, mode="pretrain", mesh=(4, 1, 1));'
      'c.pretrain.update(dict(batch_size=64, accumulate=4));'
      'print(memory.compile_step(c)[0].as_text())')
  four = fast_xla_flags('--xla_force_host_platform_device_count=4')
  env = {**os.environ, 'XLA_FLAGS': four, 'JAX_PLATFORMS': 'cpu',
         'TF_CPP_MIN_LOG_LEVEL': '3', 'PYTHONPATH': HERE}
  result = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, timeout=300, env=env, cwd=HERE)
  assert result.returncode == 0, result.stderr[-3000:]
  collectives = set(re.findall(
      r'\b(all-gather|all-to-all|collective-permute|reduce-scatter|all-reduce)'
      r'(?:-start)?\(', result.stdout))
  assert collectives == {'all-reduce'}, collectives
