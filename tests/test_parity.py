"""mimjax vs external references (HF ViTMAE, timm ViT): same weights, same masks."""

import importlib.util
import os

import jax
import numpy as np
import pytest
import safetensors.numpy

from mimjax import checkpoint, convert, masking, mim, objectives
from mimjax.models import Classifier, Decoder, Encoder
import reference

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden')
HAVE_TORCH = all(importlib.util.find_spec(m) for m in ('torch', 'transformers'))
HAVE_TIMM = HAVE_TORCH and importlib.util.find_spec('timm') is not None
TOL = dict(rtol=1e-5, atol=1e-5)


def mae_model(name, norm_pix, scan=False):
  c = reference.HF_CONFIGS[name]
  encoder = Encoder(patch_size=c['patch_size'], width=c['hidden_size'],
                    depth=c['num_hidden_layers'],
                    num_heads=c['num_attention_heads'],
                    mlp_ratio=c['intermediate_size'] / c['hidden_size'],
                    scan=scan)
  decoder = Decoder(out_dim=c['patch_size']**2 * 3,
                    width=c['decoder_hidden_size'],
                    depth=c['decoder_num_hidden_layers'],
                    num_heads=c['decoder_num_attention_heads'],
                    mlp_ratio=c['decoder_intermediate_size'] /
                    c['decoder_hidden_size'], scan=scan)
  return mim.MIM(encoder, decoder, masking.random(0.75),
                 objectives.mae(norm_pix=norm_pix))


def mimjax_mae_outputs(name, names, images, noise, scan=False, params=None):
  c = reference.HF_CONFIGS[name]
  if params is None:
    params = convert.import_state_dict(
        reference.weights(names), c['num_attention_heads'],
        c['decoder_num_attention_heads'], scan=scan)
  mask = masking.from_noise(noise, 0.75)
  out = {}
  for norm_pix in (False, True):
    model = mae_model(name, norm_pix, scan)
    loss, aux = jax.jit(lambda p, x, m: model.apply({'params': p}, x, masks=m))(
        params, images, mask)
    out[f'loss_normpix{int(norm_pix)}'] = loss
  out['pred'] = aux['pred']
  out['mask'] = mask.mask
  out['encoder'] = aux['latents'][0]
  return out


def check_mae(expected, actual):
  np.testing.assert_array_equal(actual['mask'], expected['mask'])
  for key in ('encoder', 'pred', 'loss_normpix0', 'loss_normpix1'):
    np.testing.assert_allclose(actual[key], expected[key], **TOL, err_msg=key)


@pytest.mark.parametrize('name', ['tiny', 'base16'])
def test_hf_vitmae_golden(name):
  g = np.load(os.path.join(GOLDEN, f'hf_vitmae_{name}.npz'))
  names = reference.unpack_names(g['names'])
  check_mae(g, mimjax_mae_outputs(name, names, g['images'], g['noise']))


def test_hf_vitmae_golden_scanned_layout():
  g = np.load(os.path.join(GOLDEN, 'hf_vitmae_tiny.npz'))
  names = reference.unpack_names(g['names'])
  check_mae(g, mimjax_mae_outputs('tiny', names, g['images'], g['noise'],
                                  scan=True))


def classifier(name, scan=False):
  c = reference.TIMM_CONFIGS[name]
  encoder = Encoder(patch_size=c['patch_size'], width=c['embed_dim'],
                    depth=c['depth'], num_heads=c['num_heads'],
                    posemb='learn', scan=scan)
  return Classifier(encoder, c['num_classes'], pool='gap')


def mimjax_logits(name, names, images, scan=False, params=None):
  c = reference.TIMM_CONFIGS[name]
  if params is None:
    params = convert.import_state_dict(reference.weights(names),
                                       c['num_heads'], scan=scan)
  return jax.jit(lambda p, x: classifier(name, scan).apply({'params': p}, x)[0]
                 )(params, images)


@pytest.mark.parametrize('name', ['tiny', 'base16'])
def test_timm_vit_golden(name):
  g = np.load(os.path.join(GOLDEN, f'timm_vit_{name}.npz'))
  names = reference.unpack_names(g['names'])
  np.testing.assert_allclose(mimjax_logits(name, names, g['images']),
                             g['logits'], **TOL)


def test_timm_golden_scanned_layout():
  g = np.load(os.path.join(GOLDEN, 'timm_vit_tiny.npz'))
  names = reference.unpack_names(g['names'])
  np.testing.assert_allclose(mimjax_logits('tiny', names, g['images'], True),
                             g['logits'], **TOL)


@pytest.mark.skipif(not HAVE_TORCH, reason='needs torch and transformers')
def test_hf_vitmae_live():
  model, names = reference.hf_mae('tiny')
  images = reference.images(3, 32, seed=7)
  noise = np.random.default_rng(8).uniform(size=(3, 64)).astype(np.float32)
  check_mae(reference.hf_outputs(model, images, noise),
            mimjax_mae_outputs('tiny', names, images, noise))


@pytest.mark.skipif(not HAVE_TIMM, reason='needs torch and timm')
def test_timm_vit_live():
  model, names = reference.timm_vit('tiny')
  images = reference.images(3, 32, seed=7)
  np.testing.assert_allclose(mimjax_logits('tiny', names, images),
                             reference.timm_logits(model, images), **TOL)


def test_converted_params_match_model_structure():
  g = np.load(os.path.join(GOLDEN, 'hf_vitmae_tiny.npz'))
  names = reference.unpack_names(g['names'])
  params = convert.import_state_dict(reference.weights(names), 4, 4)
  model = mae_model('tiny', True)
  expected = jax.eval_shape(
      model.init, {'params': jax.random.key(0), 'mask': jax.random.key(1)},
      g['images'])['params']
  checkpoint.check_compatible(expected, params)
  # A model of another width is named, with both shapes.
  wider = mim.MIM(model.encoder.clone(width=128), model.decoder,
                  model.mask_fn, model.loss_fn)
  expected = jax.eval_shape(
      wider.init, {'params': jax.random.key(0), 'mask': jax.random.key(1)},
      g['images'])['params']
  with pytest.raises(ValueError, match=r'decoder/embed/kernel has shape '
                     r'\(64, 32\), the model expects \(128, 32\)'):
    checkpoint.check_compatible(expected, params)


# ------------------------------------------------ reverse: mimjax -> torch


@pytest.mark.parametrize('golden', ['hf_vitmae_tiny', 'hf_vitmae_base16',
                                    'timm_vit_tiny', 'timm_vit_base16'])
def test_export_golden_reverse(golden):
  """Exported weights are the state dict the reference model computed the
  golden outputs with: its own names and shapes, no more, no fewer, the same
  values bit for bit (the fixed sin-cos tables: mimjax's own, which the
  forward tests above show equal to the reference's)."""
  g = np.load(os.path.join(GOLDEN, f'{golden}.npz'))
  names = reference.unpack_names(g['names'])
  mae = golden.startswith('hf_')
  c = reference.HF_CONFIGS if mae else reference.TIMM_CONFIGS
  c = c[golden.split('_', 2)[2]]
  layout = ('mae' if not mae else 'hf' if any(
      n.startswith('vit.layers.') for n, _ in names) else 'hf4')
  weights = reference.weights(names)
  params = convert.import_state_dict(
      weights, c['num_attention_heads'] if mae else c['num_heads'],
      c.get('decoder_num_attention_heads'), scan=True)
  exported, _ = convert.export_state_dict(
      params, layout, c['image_size' if mae else 'img_size'])
  assert dict(names) == {n: v.shape for n, v in exported.items()}
  for name, value in weights.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)


def _through_file(tmp_path, state_dict):
  """What a user does: write the export to .safetensors, read it back."""
  path = str(tmp_path / 'exported.safetensors')
  safetensors.numpy.save_file(state_dict, path, metadata={'format': 'pt'})
  return safetensors.numpy.load_file(path)


@pytest.mark.skipif(not HAVE_TORCH, reason='needs torch and transformers')
@pytest.mark.parametrize('scan', [False, True])
def test_exported_mimjax_mae_runs_in_hf_vitmae_live(tmp_path, scan):
  """mimjax's own parameters (its init, every leaf moved), exported, loaded
  strictly by HF ViTMAEForPreTraining: the same losses, predictions and
  encoder outputs within 1e-5."""
  images = reference.images(3, 32, seed=5)
  noise = np.random.default_rng(6).uniform(size=(3, 64)).astype(np.float32)
  params = reference.perturb(mae_model('tiny', True, scan).init(
      {'params': jax.random.key(3), 'mask': jax.random.key(4)}, images)[
          'params'], seed=7)
  exported, _ = convert.export_state_dict(params, reference.hf_layout(), 32)
  model = reference.hf_mae_from('tiny', _through_file(tmp_path, exported))
  check_mae(reference.hf_outputs(model, images, noise),
            mimjax_mae_outputs('tiny', None, images, noise, scan, params))


@pytest.mark.skipif(not HAVE_TIMM, reason='needs torch and timm')
def test_exported_mimjax_classifier_runs_in_timm_live(tmp_path):
  images = reference.images(3, 32, seed=5)
  params = reference.perturb(classifier('tiny').init(
      jax.random.key(3), images)['params'], seed=8)
  exported, _ = convert.export_state_dict(params, 'mae', 32)
  model, _ = reference.timm_vit('tiny', _through_file(tmp_path, exported))
  np.testing.assert_allclose(mimjax_logits('tiny', None, images, params=params),
                             reference.timm_logits(model, images), **TOL)
