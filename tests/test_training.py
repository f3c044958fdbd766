"""The pretrain -> finetune pipeline end to end, exact resume, many devices."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fast_jit import fast_env
from mimjax import checkpoint
from mimjax import config as config_lib
from mimjax import sharding
from mimjax.training import loop
from mimjax.training import optim
from mimjax.training import pipeline
from mimjax.training import state as state_lib
from mimjax.training import trainers
from tiny_config import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


def test_pipeline_end_to_end(tmp_path, data_dir):
  c = tiny_config(data_dir, mode='pipeline')
  c.finetune.scratch_baseline = True
  c.pretrain.knn_every = c.pretrain.recon_every = 20
  summaries = pipeline.run(c, str(tmp_path))
  pre, fine, scratch, probe, *analyzed = summaries
  assert pre['stage'] == 'pretrain' and pre['knn_top1'] > 20.0
  assert pre['loss'] < 0.8 * pre['loss_first'], pre
  assert fine['top1'] > 40.0, fine  # chance is 10%
  assert fine['eval_examples'] == 300
  assert probe['stage'] == 'linprobe' and probe['top1'] > 15.0, probe
  assert 'top1' in scratch
  finetuned = checkpoint.load_state_params(
      str(tmp_path / 'finetune' / 'checkpoints'))
  assert set(finetuned) == {'encoder', 'fc_norm', 'head'}
  assert 'reconstructions_40.png' in os.listdir(tmp_path / 'pretrain'), (
      os.listdir(tmp_path / 'pretrain'))
  # Artefacts a person looks at.
  assert os.path.exists(tmp_path / 'config.json')
  assert any(f.startswith('events.out.tfevents')
             for f in os.listdir(tmp_path / 'pretrain'))
  with open(tmp_path / 'summary.json') as f:
    assert [s['stage'] for s in json.load(f)] == [
        'pretrain', 'finetune', 'finetune', 'linprobe', 'analyze', 'analyze']
  # The paper's analyses of the pre-trained and a random encoder.
  assert [s['init'] for s in analyzed] == ['pre-trained', 'random init']
  with open(tmp_path / 'analyze' / 'analysis.json') as f:
    analysis = json.load(f)
  assert analysis['examples'] == 200
  for name, s in zip(('pre-trained', 'random init'), analyzed):
    r = analysis['encoders'][name]
    assert len(r['invariance_cka']) == len(r['invariance_cosine']) == 2
    assert all(0 < v <= 1 for v in r['invariance_cka'])
    assert s['invariance'] == r['invariance_cka'][-1]
  assert np.shape(analysis['cka']['pre-trained vs random init']) == (2, 2)
  for png in ('occlusion_invariance.png', 'cka_pre_trained_vs_random_init.png'):
    with open(tmp_path / 'analyze' / png, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_finetune_loads_pretrained_encoder(tmp_path, data_dir):
  c = tiny_config(data_dir, mode='pretrain')
  c.pretrain.steps = 2
  pipeline.run(c, str(tmp_path))
  pre = checkpoint.load_state_params(str(tmp_path / 'pretrain' / 'checkpoints'))
  c.finetune.steps = 1
  c.finetune.base_lr = 0.0
  c.finetune.warmup_steps = 0
  state, _ = trainers.finetune(c, str(tmp_path / 'ft'),
                               str(tmp_path / 'pretrain' / 'checkpoints'))
  kernel = lambda p: np.asarray(
      p['encoder']['transformer']['blocks_1']['mlp']['fc1']['kernel'])
  np.testing.assert_array_equal(kernel(state.params), kernel(pre))


def _run_cli(workdir, data_dir, extra=(), env=None, wait=True):
  cmd = [sys.executable, '-m', 'mimjax.main', f'--workdir={workdir}',
         f'--config={REPO}/tests/tiny_config.py:{data_dir}', *extra]
  # Fast-compiling XLA (tests/fast_jit.py), in every run a test compares.
  env = fast_env({**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3', **(env or {})})
  if wait:
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
  return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)


def test_exact_resume_after_sigkill(tmp_path, data_dir):
  steps = ['--config.mode=pretrain', '--config.pretrain.steps=60',
           '--config.checkpoint_every=4', '--config.keep_checkpoints=50']
  straight = _run_cli(tmp_path / 'straight', data_dir, steps)
  assert straight.returncode == 0, straight.stderr[-2000:]
  # A quiet console: the stage, its progress and the table; the library
  # logs in log.txt, the parameter table in a file.
  shown = straight.stdout + straight.stderr
  assert 'pretrain: steps 1-60 of 60 on digits' in straight.stdout
  assert 'pretrain step 60/60  loss' in straight.stdout
  assert 'TensorBoard: tensorboard --logdir' in straight.stdout
  assert 'orbax' not in shown and 'Saving checkpoint' not in shown
  # (stderr may also hold tfds's one-time preparation of the data)
  assert len(straight.stdout.splitlines()) < 30, straight.stdout
  assert 'Saving checkpoint' in (tmp_path / 'straight' / 'log.txt').read_text()
  assert 'encoder/' in (tmp_path / 'straight' / 'pretrain' /
                        'parameters.txt').read_text()
  assert (tmp_path / 'straight' / 'summary.md').read_text().startswith(
      '| stage |')

  ckpts = tmp_path / 'killed' / 'pretrain' / 'checkpoints'
  proc = _run_cli(tmp_path / 'killed', data_dir, steps, wait=False)
  deadline = time.time() + 300
  while not (ckpts.exists() and any(p.isdigit() for p in os.listdir(ckpts))):
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  killed_at = max(int(p) for p in os.listdir(ckpts) if p.isdigit())
  assert killed_at < 60, 'the run finished before it could be killed'
  resumed = _run_cli(tmp_path / 'killed', data_dir, steps)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'of 60 (resumed)' in resumed.stdout

  a = checkpoint.load_state_params(
      str(tmp_path / 'straight' / 'pretrain' / 'checkpoints'), step=60)
  b = checkpoint.load_state_params(str(ckpts), step=60)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_data_parallel_over_8_devices_matches_one(tmp_path, data_dir):
  steps = ['--config.mode=pretrain', '--config.pretrain.steps=3',
           '--config.checkpoint_every=3']
  one = _run_cli(tmp_path / 'one', data_dir, [*steps, '--config.mesh=(1,1,1)'])
  assert one.returncode == 0, one.stderr[-2000:]
  eight = _run_cli(
      tmp_path / 'eight', data_dir,
      [*steps, '--config.mesh=(8,1,1)', '--config.eval_batch_size=96'],
      env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert eight.returncode == 0, eight.stderr[-2000:]
  a = checkpoint.load_state_params(str(tmp_path / 'one' / 'pretrain' /
                                       'checkpoints'))
  b = checkpoint.load_state_params(str(tmp_path / 'eight' / 'pretrain' /
                                       'checkpoints'))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), a, b)
  loss = lambda d: json.load(open(d / 'pretrain' / 'summary.json'))['loss']
  assert abs(loss(tmp_path / 'one') - loss(tmp_path / 'eight')) < 1e-5


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path,
                                                            data_dir):
  from mimjax.training import loop  # pylint: disable=g-import-not-at-top
  c = tiny_config(data_dir, mode='pretrain')
  c.pretrain.update(dict(steps=12, warmup_steps=0, base_lr=1e30))
  c.checkpoint_every = 1
  with pytest.raises(loop.NonFiniteError, match=r'non-finite .* at step \d+; '
                     r'last finite metrics .*last good checkpoint: step \d+'):
    pipeline.run(c, str(tmp_path))
  ckpts = str(tmp_path / 'pretrain' / 'checkpoints')
  params = checkpoint.load_state_params(ckpts)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize('key, value, message', [
    ('pretrain.batch_size', 30, 'not divisible by the data-parallel size 8'),
    ('pretrain.accumulate', 8, 'pretrain.batch_size 32 is not divisible by '
     'pretrain.accumulate 8 x the data-parallel size 8 = 64'),
    ('model.patch_size', 5, 'not divisible by model.patch_size 5'),
    ('pretrain.mask_ratio', 1.0, r'mask ratio must be in \(0, 1\)'),
    ('mesh', (2, 1, 1), 'has 2 devices, but 8 are present'),
    ('mesh', (1, 1, 8), 'tensor axis 8 does not divide the 4 heads'),
    ('mesh_dcn', (2, 1, 1), 'mesh_dcn .* has 2 slices or processes, but 1 are'),
    ('pretrain.objective', 'nope', 'unknown pretrain.objective'),
    ('analyze.examples', 2, 'analyze.examples must be at least 4'),
    ('linprobe.optimizer', 'sgd', "linprobe.optimizer must be 'lars' or"),
    ('analyze.mask_ratio', 0.0, r'analyze.mask_ratio must be in \(0, 1\)'),
    ('mode', 'train', 'mode must be one of'),
])
def test_bad_config_values_are_one_clear_line(data_dir, key, value, message):
  c = tiny_config(data_dir, mesh=(8, 1, 1), eval_batch_size=96)
  c.update_from_flattened_dict({key: value})
  with pytest.raises(ValueError, match=message) as error:
    config_lib.validate(c, num_devices=8)
  assert '\n' not in str(error.value)


def test_tensor_axis_must_divide_the_decoder_too(data_dir):
  c = tiny_config(data_dir, mesh=(2, 1, 4), eval_batch_size=96)
  config_lib.validate(c, num_devices=8)
  c.pretrain.decoder.num_heads = 2
  with pytest.raises(ValueError, match='tensor axis 4 does not divide the 2 '
                     'heads and width 32 of the decoder'):
    config_lib.validate(c, num_devices=8)
  c.mode = 'finetune'  # no decoder then
  config_lib.validate(c, num_devices=8)


def test_bad_config_fails_before_anything_runs(tmp_path, data_dir):
  c = tiny_config(data_dir)
  c.pretrain.mask_ratio = 0.0
  with pytest.raises(ValueError, match=r'mask ratio must be in \(0, 1\)'):
    pipeline.run(c, str(tmp_path))
  assert not os.path.exists(tmp_path / 'pretrain')


def test_unknown_config_key_is_one_clear_line(tmp_path, data_dir):
  result = _run_cli(tmp_path, data_dir, ['--config.pretrain.bach_size=8'])
  assert result.returncode != 0
  assert 'bach_size' in result.stderr


def test_checkpoint_of_another_architecture_is_named(tmp_path, data_dir):
  c = tiny_config(data_dir, mode='pretrain')
  c.pretrain.steps = 1
  pipeline.run(c, str(tmp_path))
  c.model.size = 'nano'
  with pytest.raises(ValueError, match=r'pre-trained encoder .* parameter '
                     r'cls_token has shape \(1, 1, 64\), the model expects '
                     r'\(1, 1, 128\)'):
    trainers.finetune(c, str(tmp_path / 'ft'),
                      str(tmp_path / 'pretrain' / 'checkpoints'))


def test_logged_lr_counts_optimizer_updates():
  """accumulate=4 splits each step's batch into 4 micro-batches: still one
  optimizer update per training step, and the lr of the batch itself
  (base_lr × batch / 256), not of 4 batches."""
  c = tiny_config(None, mode='pretrain')
  c.pretrain.update(dict(batch_size=256, accumulate=4, steps=40,
                         warmup_steps=8))
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  recipe = trainers.pretrain_recipe(c, mesh, num_train=10**6)
  assert recipe.accumulate == 4 and recipe.total_steps == 40
  schedule = optim.warmup_cosine(c.pretrain.base_lr, 40, 8,
                                 c.pretrain.min_lr)
  assert [recipe.lr_at(s) for s in (1, 4, 5, 8, 9, 40)] == [
      float(schedule(u)) for u in (0, 3, 4, 7, 8, 39)]
  assert recipe.lr_at(9) == pytest.approx(c.pretrain.base_lr)  # the peak


def _dense_step(model, width):
  """A real train step (state.create, make_train_step: AdamW, donated) of
  `model` on (B, width) inputs, loss mean(out²) × batch['scale']."""
  init_variables = lambda key: model.init(key, jnp.zeros((1, width)))
  abstract = jax.eval_shape(init_variables, jax.random.key(0))['params']
  tx = optim.adamw(optax.constant_schedule(0.1), abstract)

  def loss_fn(params, extra, batch, rng):
    del rng
    out = model.apply({'params': params}, batch['image'])
    return jnp.mean(out ** 2) * batch['scale'][0], ({}, extra)

  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = sharding.rules_from(None)
  state, shardings = state_lib.create(init_variables, tx, 0, mesh, rules)
  step = state_lib.make_train_step(loss_fn, tx, shardings, mesh, rules)
  x = np.random.default_rng(0).standard_normal((2, width)).astype(np.float32)
  batch = lambda scale: sharding.global_batch(
      {'image': x, 'scale': np.full((2,), scale, np.float32)}, mesh)
  return state, step, batch, (tx, loss_fn, x, mesh, rules)


def test_non_finite_step_keeps_the_state_and_a_finite_one_is_adamw():
  """make_train_step: a NaN loss leaves params and moments exactly as they
  were (the step count moves on); a finite one is optax's update."""
  state, step, batch, (tx, loss_fn, x, _, _) = _dense_step(nn.Dense(3), 4)
  before = jax.device_get((state.params, state.opt_state))

  state, metrics = step(state, batch(np.nan))
  assert not bool(metrics['finite']) and int(state.step) == 1
  for got, want in zip(jax.tree.leaves(jax.device_get(
      (state.params, state.opt_state))), jax.tree.leaves(before)):
    np.testing.assert_array_equal(got, want)

  state, metrics = step(state, batch(1.0))
  assert bool(metrics['finite']) and int(state.step) == 2
  params, opt_state = before
  grads = jax.grad(lambda p: loss_fn(p, None, {'image': x, 'scale': [1.0]},
                                     None)[0])(params)
  updates, _ = tx.update(grads, opt_state, params)
  want = optax.apply_updates(params, updates)
  for got, w in zip(jax.tree.leaves(jax.device_get(state.params)),
                    jax.tree.leaves(want)):
    np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7)


def test_the_step_updates_adam_moments_without_copying_them():
  """The non-finite guard (a lax.cond) leaves XLA free to update the donated
  moments in place; a select per leaf made it copy every one first."""
  model = nn.Sequential([nn.Dense(64), nn.Dense(64)])
  state, step, batch, (_, _, _, mesh, rules) = _dense_step(model, 64)
  with sharding.active(mesh, rules):
    text = step.jitted.lower(state, batch(1.0)).compile().as_text()
  copied = re.findall(r'copy\(%state_opt_state\w*', text)
  assert not copied, copied


def test_on_devices_keeps_two_batches_in_flight():
  """The loop's input: each batch is placed on the mesh two steps before
  the step that takes it, and every batch arrives once, in order."""
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  read = []

  def batches():
    for i in range(5):
      read.append(i)
      yield {'image': np.full((2, 1), i, np.float32)}

  placed = loop.on_devices(batches(), mesh)
  first = next(placed)
  assert read == [0, 1, 2]  # 1 and 2 already on their way
  assert isinstance(first['image'], jax.Array)
  rest = [int(b['image'][0, 0]) for b in placed]
  assert [int(first['image'][0, 0])] + rest == [0, 1, 2, 3, 4]
