"""The Python API (mimjax.load_encoder, mimjax.export) on a tiny trained
run: the README's "From Python" block, embeddings, a from_pretrained
export that HF transformers runs as mimjax does; and --help's recipes."""

import importlib.util
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import mimjax
from mimjax import build, checkpoint, convert, errors, masking, objectives
from mimjax.training import pipeline
import reference
from tiny_config import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, 'README.md')
HAVE_TORCH = all(importlib.util.find_spec(m) for m in ('torch', 'transformers'))
TOL = dict(rtol=1e-5, atol=1e-5)
SIZE, WIDTH = 16, 64  # tiny_config: ViT-mu, patch 4, 16x16 digits


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A pre-training run of a few steps, as `python -m mimjax.main` leaves it."""
  workdir = tmp_path_factory.mktemp('run')
  c = tiny_config(tmp_path_factory.mktemp('tfds'), mode='pretrain')
  c.pretrain.steps = 4
  pipeline.run(c, str(workdir))
  return workdir


def test_readme_from_python_block_runs(run, tmp_path, capsys):
  text = open(README).read()
  code = re.search(r'### From Python.*?```python\n(.*?)```', text,
                   re.S).group(1)
  code = code.replace("'workdir/demo_hf'", repr(str(tmp_path / 'hf'))
                      ).replace("'workdir/demo'", repr(str(run)))
  scope = {}
  exec(compile(code, README, 'exec'), scope)  # pylint: disable=exec-used
  assert scope['features'].shape == scope['cls'].shape == (8, WIDTH)
  assert scope['encoder'].image_size == SIZE
  assert sorted(os.listdir(tmp_path / 'hf')) == ['config.json',
                                                 'model.safetensors']
  assert capsys.readouterr().out.startswith(f'(8, {WIDTH}) mu\nwrote ')


def test_load_encoder_embeds_as_the_module_does(run):
  encoder = mimjax.load_encoder(str(run))
  assert isinstance(encoder, mimjax.LoadedEncoder)
  assert type(encoder.module).__name__ == 'Encoder'
  assert encoder.config.model.size == 'mu' and encoder.image_size == SIZE
  params = checkpoint.load_state_params(str(run / 'pretrain' / 'checkpoints'))
  jax.tree.map(np.testing.assert_array_equal, encoder.params,
               params['encoder'])
  pixels = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3),
                                             dtype=np.uint8)
  images = reference.images(3, SIZE)
  tokens = encoder.module.apply({'params': encoder.params}, images)['tokens']
  np.testing.assert_allclose(encoder.embed(images), tokens[:, 1:].mean(1),
                             **TOL)
  np.testing.assert_allclose(encoder.embed(images, pool='cls'), tokens[:, 0],
                             **TOL)
  # uint8 pixels are normalised as mimjax.data normalises them.
  normalised = ((pixels / 255 - np.float32([0.485, 0.456, 0.406])) /
                np.float32([0.229, 0.224, 0.225])).astype(np.float32)
  np.testing.assert_allclose(encoder.embed(pixels), encoder.embed(normalised),
                             **TOL)
  # A stage directory and its checkpoints are the same run.
  for where in (run / 'pretrain', run / 'pretrain' / 'checkpoints'):
    np.testing.assert_array_equal(mimjax.load_encoder(str(where)).embed(images),
                                  encoder.embed(images))
  with pytest.raises(errors.Invalid, match="pool must be 'mean' or 'cls'"):
    encoder.embed(images, pool='max')
  with pytest.raises(errors.Invalid, match=r'\(batch, height, width, 3\)'):
    encoder.embed(images[0])


def test_load_encoder_outside_a_run_needs_the_size(run, tmp_path):
  params = checkpoint.load_state_params(str(run / 'pretrain' / 'checkpoints'))
  checkpoint.save_params(str(tmp_path / 'orbax'), params)
  with pytest.raises(errors.Invalid, match=r'not in a run.*model=\.\.\.'):
    mimjax.load_encoder(str(tmp_path / 'orbax'))
  encoder = mimjax.load_encoder(str(tmp_path / 'orbax'), model='mu')
  assert encoder.config is None
  images = reference.images(2, SIZE)
  np.testing.assert_array_equal(
      encoder.embed(images), mimjax.load_encoder(str(run)).embed(images))
  with pytest.raises(errors.Invalid, match=r'\(ViT-nano\) parameter '
                     r'cls_token has shape \(1, 1, 64\), the model expects '
                     r'\(1, 1, 128\)'):
    mimjax.load_encoder(str(tmp_path / 'orbax'), model='nano')
  with pytest.raises(errors.Missing, match='no such file or directory'):
    mimjax.load_encoder(str(tmp_path / 'nothing'))


def _mimjax_outputs(run, images, noise):
  """mimjax's MAE forward on the run's weights, masks from `noise`."""
  config, _ = convert.run_config(run / 'pretrain' / 'checkpoints')
  params = checkpoint.load_state_params(str(run / 'pretrain' / 'checkpoints'))
  mask = masking.from_noise(noise, config.pretrain.mask_ratio)
  out = {'mask': mask.mask}
  for norm_pix in (False, True):
    model = build.mim_model(config).clone(
        loss_fn=objectives.mae(norm_pix=norm_pix))
    loss, aux = jax.jit(lambda p, x, m, model=model: model.apply(
        {'params': p}, x, masks=m))(params, images, mask)
    out[f'loss_normpix{int(norm_pix)}'] = loss
  out['pred'], out['encoder'] = aux['pred'], aux['latents'][0]
  return out


@pytest.mark.skipif(not HAVE_TORCH, reason='needs torch and transformers')
def test_exported_run_loads_with_from_pretrained_as_is(run, tmp_path):
  """export(hf_config=True) -> ViTMAEForPreTraining.from_pretrained(dir),
  nothing else: the same losses, predictions and encoder outputs as mimjax
  within 1e-5, given the same noise."""
  import transformers  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'hf'
  mimjax.export(str(run), str(out), hf_config=True,
                layout=reference.hf_layout())
  model = transformers.ViTMAEForPreTraining.from_pretrained(str(out)).eval()
  assert model.config.image_size == SIZE and model.config.norm_pix_loss
  images = reference.images(3, SIZE, seed=7)
  noise = np.random.default_rng(8).uniform(size=(3, 16)).astype(np.float32)
  expected = reference.hf_outputs(model, images, noise)
  actual = _mimjax_outputs(run, images, noise)
  np.testing.assert_array_equal(actual['mask'], expected['mask'])
  for key in ('encoder', 'pred', 'loss_normpix0', 'loss_normpix1'):
    np.testing.assert_allclose(actual[key], expected[key], **TOL, err_msg=key)


def test_help_names_only_recipes_that_exist():
  """Every configs/...py path in --help and main.py's docstring exists."""
  from mimjax import main  # pylint: disable=g-import-not-at-top
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'}
  result = subprocess.run([sys.executable, '-m', 'mimjax.main', '--help'],
                          cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
  assert 'mimjax entry point' in result.stdout, result.stderr[-2000:]
  for text in (main.__doc__, result.stdout + result.stderr):
    named = set(re.findall(r'configs/[\w/.-]*?\.py', text))
    assert {'configs/demo.py', 'configs/mae_imagenet.py'} <= named
    missing = sorted(p for p in named
                     if not os.path.isfile(os.path.join(REPO, p)))
    assert not missing, f'--help names recipes that do not exist: {missing}'
