"""mimjax's real train steps vs the official MAE recipes in torch, step by step.

Pre-training: `trainers.pretrain_recipe` (its tx and loss_fn) stepped by
`state.make_train_step`, next to HF ViTMAEForPreTraining + torch AdamW set up
as the official main_pretrain.py (tests/reference.py). Fine-tuning:
`trainers.finetune_recipe` next to the global-pool classifier on HF's ViTModel
with the official layer-wise AdamW. Both start from the same weights (a numpy
draw, through mimjax's converter), see the same batches, and HF is given the
mask mimjax draws at each step as its noise. 12 steps: 4 of warmup (from lr 0),
8 of cosine.

Tolerance (float32): every step's loss within rtol 1e-5, every final
parameter within atol 2e-6. Measured on CPU: losses agree to <= 1.1e-6
relative, parameters to 2.4e-7 (they move 1e-3 to 6e-3). A parameter in the
wrong decay group ends ~5e-5 off (lr * wd * |p| a step), a wrong layer scale,
lr or schedule index ~1e-4 and more. The key biases are the exception: their
true gradient is 0 (q . b_k is the same for every key, and softmax ignores
it), so AdamW turns rounding noise into steps of arbitrary sign in any two
implementations; they are only checked to stay within the summed lr of their
start.

Without torch and transformers the reference comes from
tests/golden/step_{pretrain,finetune}.npz (tests/golden/make_golden.py): its
losses, the masks it was fed, and the final parameters as their change from
the initial ones, quantised per tensor to int16 (error <= max|change| / 65534,
added to the tolerance).
"""

import importlib.util
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from mimjax import checkpoint, config as config_lib, convert, sharding
from mimjax.models import vit
from mimjax.training import state as state_lib
from mimjax.training import trainers
import reference

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden')
HAVE_TORCH = all(importlib.util.find_spec(m) for m in ('torch', 'transformers'))

STEPS_PER_EPOCH, EPOCHS, WARMUP_EPOCHS = 4, 3, 1
BATCH, SIZE, NUM_CLASSES, SEED = 8, 32, 10, 0
BASE_LR = 0.032  # lr = 0.032 * 8 / 256 = 1e-3 (the recipe's 1.5e-4: 4.7e-6)
LOSS_RTOL, PARAMS_ATOL = 1e-5, 2e-6
KEY_BIAS = ('k_proj.bias', 'key.bias')  # the 'hf' and 'hf4' names


def config(scan=False):
  """mimjax's recipe at the size of reference.HF_CONFIGS['tiny']."""
  c = config_lib.base_config()
  c.model.update(size='mu', patch_size=4, scan=scan)
  c.data.image_size = c.pretrain.data.image_size = SIZE
  c.pretrain.decoder.update(width=32, depth=2, num_heads=4)
  schedule = dict(batch_size=BATCH, epochs=EPOCHS,
                  warmup_epochs=WARMUP_EPOCHS, base_lr=BASE_LR)
  c.pretrain.update(schedule)
  c.finetune.update(schedule, drop_path=0.0, mixup=0.0, cutmix=0.0)
  return c


def batches(stage):
  seed = 100 if stage == 'pretrain' else 200
  out = []
  for i in range(STEPS_PER_EPOCH * EPOCHS):
    batch = {'image': reference.images(BATCH, SIZE, seed=seed + i)}
    if stage == 'finetune':
      batch['label'] = np.random.default_rng(seed + i).integers(
          0, NUM_CLASSES, BATCH).astype(np.int32)
    out.append(batch)
  return out


def recipe(stage, scan=False):
  c = config(scan)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  num_train = STEPS_PER_EPOCH * BATCH
  if stage == 'pretrain':
    return trainers.pretrain_recipe(c, mesh, num_train), c, mesh
  return trainers.finetune_recipe(c, mesh, num_train, NUM_CLASSES), c, mesh


def initial_params(r, scan):
  """reference.weights (numpy, seeded per name) over the parameters' names
  in the official layout, read back by mimjax's converter; a fine-tuned
  position embedding starts as the sin-cos table, as from an MAE encoder."""
  abstract = nn.meta.unbox(jax.eval_shape(r.init_variables,
                                          jax.random.key(0)))['params']
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  names = [(n, v.shape) for n, v in
           convert.export_state_dict(zeros, 'mae', SIZE)[0].items()
           if 'pos_embed' not in n]
  c = reference.HF_CONFIGS['tiny']
  params = convert.import_state_dict(reference.weights(names),
                                     c['num_attention_heads'],
                                     c['decoder_num_attention_heads'], scan)
  if 'pos_embed' in abstract['encoder']:
    params['encoder']['pos_embed'] = vit.posemb_sincos_2d(
        (SIZE // 4,) * 2, c['hidden_size'])[None]
  checkpoint.check_compatible(abstract, params)
  return params


def torch_state_dict(stage, params, layout):
  if stage == 'pretrain':
    return convert.export_state_dict(params, layout, SIZE)[0]
  return reference.hf_vit_gap_state_dict(params, layout, SIZE)


def run_mimjax(stage, scan=False):
  """The recipe's real step, N times. Returns the initial and final
  parameters, the losses and (pre-training) each step's mask as the ranks of
  its noise (ids_restore)."""
  r, c, mesh = recipe(stage, scan)
  params0 = initial_params(r, scan)
  rules = sharding.rules_from(c.sharding_rules)
  state, shardings = state_lib.create(r.init_variables, r.tx, SEED, mesh,
                                      rules, params_override=params0)
  step = state_lib.make_train_step(r.loss_fn, r.tx, shardings, mesh, rules,
                                   r.accumulate)

  @jax.jit
  def drawn(state, images):
    # The pre-training loss_fn's draw: the mask key split off step_rng().
    k_mask, k_drop = jax.random.split(state.step_rng())
    loss, aux = r.model.apply({'params': state.params}, images, train=True,
                              rngs={'mask': k_mask, 'dropout': k_drop})
    return loss, aux['masks'][0].ids_restore

  losses, ranks = [], []
  with sharding.active(mesh, rules):
    for batch in batches(stage):
      if stage == 'pretrain':
        loss, ids_restore = drawn(state, batch['image'])
        ranks.append(np.asarray(ids_restore))
      state, metrics = step(state, sharding.global_batch(batch, mesh))
      assert bool(metrics['finite'])
      losses.append(float(metrics['loss']))
      if stage == 'pretrain':  # the mask taken here is the step's
        np.testing.assert_allclose(loss, losses[-1], rtol=1e-6,
                                   err_msg='not the mask of the step')
  return (params0, jax.device_get(state.params), np.array(losses),
          np.array(ranks, np.uint8))


def official_lrs(stage):
  s = config()[stage]
  return reference.official_lrs(STEPS_PER_EPOCH, EPOCHS, WARMUP_EPOCHS,
                                s.base_lr * BATCH / 256, s.min_lr)


def run_reference(stage, params0, ranks):
  """The official recipe in torch from the same weights and batches."""
  s = config()[stage]
  lrs = official_lrs(stage)
  state_dict = torch_state_dict(stage, params0, reference.hf_layout())
  if stage == 'pretrain':
    assert s.weight_decay == 0.05 and s.b2 == 0.95 and s.mask_ratio == 0.75
    images = [b['image'] for b in batches(stage)]
    noises = [x.astype(np.float32) for x in ranks]  # argsort: the same mask
    return reference.official_pretrain(state_dict, images, noises, lrs,
                                       s.weight_decay)
  assert s.weight_decay == 0.05 and s.b2 == 0.999 and s.label_smoothing == 0.1
  return reference.official_finetune(
      state_dict, batches(stage), lrs, NUM_CLASSES, s.weight_decay,
      s.layer_decay, s.label_smoothing)


def compare(stage, start, final, losses, ref_final, ref_losses, quantum=None):
  """Every step's loss and every final parameter (torch names, from `start`);
  `quantum`: the golden file's quantisation step per parameter."""
  np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL,
                             err_msg=f'{stage} losses, step by step')
  assert sorted(final) == sorted(ref_final)
  for name, want in ref_final.items():
    if name.endswith(KEY_BIAS):
      reach = sum(official_lrs(stage))
      for got in (final[name], want):
        assert np.abs(got - start[name]).max() <= reach, name
    else:
      np.testing.assert_allclose(
          final[name], want, rtol=0,
          atol=PARAMS_ATOL + (quantum or {}).get(name, 0.0) / 2,
          err_msg=f'{stage}: final {name}')


# ------------------------------------------------------------------ tests


def test_lr_schedule_step_parity():
  """The lr of each optimizer update (the schedule at update k, 0-based)
  is the official one of iteration k, over the ViT-B recipe's schedule
  (first updates, both sides of the warmup's end, the last one). Within
  float32: optax's warmup is peak - peak * (1 - k / warmup), its rounding
  ~ peak * 2^-24, 5e-5 of the lr at update 1 (none in the 12-step tests:
  k / 4 is exact)."""
  c = config()
  c.pretrain.update(batch_size=4096, epochs=800, warmup_epochs=40,
                    base_lr=1.5e-4, min_lr=1e-6)
  per_epoch = 1_281_167 // 4096
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  r = trainers.pretrain_recipe(c, mesh, 1_281_167)
  assert r.total_steps == 800 * per_epoch
  lr = 1.5e-4 * 4096 / 256
  steps = [0, 1, 2, 40 * per_epoch - 1, 40 * per_epoch, 40 * per_epoch + 1,
           400 * per_epoch, r.total_steps - 1]
  want = [reference.official_lr(k / per_epoch, lr, 1e-6, 40, 800)
          for k in steps]
  np.testing.assert_allclose([r.lr_at(k + 1) for k in steps], want,
                             rtol=1e-6, atol=lr * 2**-23)


STAGES = [('pretrain', False), ('pretrain', True), ('finetune', False),
          ('finetune', True)]


@pytest.mark.parametrize('stage,scan', STAGES)
def test_step_parity_golden(stage, scan):
  """mimjax now vs the reference's run stored in the golden file (blocks
  scanned or not: the same reference)."""
  g = np.load(os.path.join(GOLDEN, f'step_{stage}.npz'))
  params0, final, losses, ranks = run_mimjax(stage, scan)
  if stage == 'pretrain':  # the masks the reference was fed
    np.testing.assert_array_equal(ranks, g['ranks'], err_msg=(
        'mimjax draws other masks than when the golden file was made: '
        'regenerate it (make golden)'))
  layout = str(g['layout'])
  start = torch_state_dict(stage, params0, layout)
  names = json.loads(str(g['names']))
  sizes = np.cumsum([start[n].size for n in names])[:-1]
  ref_final = {n: start[n] + q.reshape(start[n].shape) * scale
               for n, q, scale in zip(names, np.split(g['deltas'], sizes),
                                      g['scales'])}
  compare(stage, start, torch_state_dict(stage, final, layout), losses,
          ref_final, g['losses'], dict(zip(names, g['scales'])))


@pytest.mark.skipif(not HAVE_TORCH, reason='needs torch and transformers')
@pytest.mark.parametrize('stage', ['pretrain', 'finetune'])
def test_step_parity_live(stage):
  """mimjax vs the official recipe computed now in torch."""
  params0, final, losses, ranks = run_mimjax(stage)
  ref_losses, ref_final = run_reference(stage, params0, ranks)
  layout = reference.hf_layout()
  compare(stage, torch_state_dict(stage, params0, layout),
          torch_state_dict(stage, final, layout), losses, ref_final,
          ref_losses)


def golden(stage):
  """What tests/golden/make_golden.py writes for `stage` (needs torch): the
  reference's losses, the masks it was fed and its final parameters, as
  their change from the start, int16 per tensor."""
  params0, _, _, ranks = run_mimjax(stage)
  losses, ref_final = run_reference(stage, params0, ranks)
  layout = reference.hf_layout()
  start = torch_state_dict(stage, params0, layout)
  assert sorted(start) == sorted(ref_final)
  names, deltas, scales = list(ref_final), [], []
  for name in names:
    delta = ref_final[name].astype(np.float64) - start[name]
    scale = max(np.abs(delta).max(), 1e-30) / 32767
    deltas.append(np.round(delta / scale).astype(np.int16).ravel())
    scales.append(scale)
  return dict(layout=np.array(layout), names=np.array(json.dumps(names)),
              losses=losses, ranks=ranks, deltas=np.concatenate(deltas),
              scales=np.array(scales))
