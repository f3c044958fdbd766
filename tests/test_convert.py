"""Tests for mimjax.convert: state-dict import and export, layouts, shape
checks, the CLI.

State dicts are built here from numpy arrays of the right shapes by writing
the inverse of the conversion (mimjax tree -> official MAE / HF names) by
hand, independently of `convert.export_state_dict`, which is checked against
it; none of this needs torch; only the `torch.save` CLI cases do.
"""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import safetensors.numpy

from mimjax import checkpoint, convert, masking, mim, objectives, torch_io
from mimjax import config as config_lib
from mimjax.models import Classifier, Decoder, Encoder, posemb_sincos_2d
from mimjax.models import vit

# Matches the 'mu' preset (width 64, depth 2, heads 4), 32x32 images, p=4.
WIDTH, DEPTH, HEADS, PATCH, SIZE = 64, 2, 4, 4, 32
DEC_WIDTH, DEC_DEPTH, DEC_HEADS = 32, 2, 4
GRID = (SIZE // PATCH, SIZE // PATCH)
NUM_CLASSES = 10
IMAGES = np.zeros((1, SIZE, SIZE, 3), np.float32)
RNGS = {'params': jax.random.key(0), 'mask': jax.random.key(1)}


def encoder(**kw):
  return Encoder(patch_size=PATCH, width=WIDTH, depth=DEPTH, num_heads=HEADS,
                 **kw)


def mae_model(scan=False, posemb='sincos'):
  dec = Decoder(out_dim=PATCH * PATCH * 3, width=DEC_WIDTH, depth=DEC_DEPTH,
                num_heads=DEC_HEADS, scan=scan)
  return mim.MIM(encoder(scan=scan, posemb=posemb), dec, masking.random(0.75),
                 objectives.mae())


def mae_shapes(scan=False, posemb='sincos'):
  return jax.eval_shape(mae_model(scan, posemb).init, RNGS, IMAGES)['params']


def classifier_shapes(scan=False):
  model = Classifier(encoder(posemb='learn', scan=scan), NUM_CLASSES,
                     pool='gap')
  return jax.eval_shape(model.init, RNGS, IMAGES)['params']


def random_like(shapes, seed=0):
  """Distinct random float32 values in the shapes of a (boxed) param tree."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: rng.standard_normal(s.shape).astype(np.float32),
      nn.meta.unbox(shapes))


def assert_trees_equal(actual, expected):
  assert (jax.tree_util.tree_structure(actual) ==
          jax.tree_util.tree_structure(expected))
  flat_a = checkpoint.flatten(actual)  # pylint: disable=protected-access
  flat_e = checkpoint.flatten(expected)  # pylint: disable=protected-access
  assert sorted(flat_a) == sorted(flat_e)
  for path, value in flat_e.items():
    np.testing.assert_array_equal(np.asarray(flat_a[path]), value,
                                  err_msg=path)


# ------------------------------------------ inverse mapping: mimjax -> torch


def _linear(sd, name, dense):
  sd[f'{name}.weight'] = np.ascontiguousarray(dense['kernel'].T)
  sd[f'{name}.bias'] = dense['bias']


def _norm(sd, name, norm):
  sd[f'{name}.weight'] = norm['scale']
  sd[f'{name}.bias'] = norm['bias']


def _mae_block(sd, prefix, block):
  """One mimjax block -> official MAE / timm names (q, k, v fused to qkv)."""
  attn = block['attn']
  width = attn['query']['kernel'].shape[0]
  _norm(sd, f'{prefix}.norm1', block['norm1'])
  _norm(sd, f'{prefix}.norm2', block['norm2'])
  sd[f'{prefix}.attn.qkv.weight'] = np.concatenate(
      [attn[n]['kernel'].reshape(width, width).T
       for n in ('query', 'key', 'value')], axis=0)
  sd[f'{prefix}.attn.qkv.bias'] = np.concatenate(
      [attn[n]['bias'].reshape(-1) for n in ('query', 'key', 'value')])
  sd[f'{prefix}.attn.proj.weight'] = np.ascontiguousarray(
      attn['out']['kernel'].reshape(width, width).T)
  sd[f'{prefix}.attn.proj.bias'] = attn['out']['bias']
  _linear(sd, f'{prefix}.mlp.fc1', block['mlp']['fc1'])
  _linear(sd, f'{prefix}.mlp.fc2', block['mlp']['fc2'])


def to_mae_state_dict(params, grid=GRID):
  """A mimjax tree -> an official-MAE-named state dict (numpy)."""
  sd = {}
  enc = params['encoder']
  width = enc['cls_token'].shape[-1]
  sd['cls_token'] = enc['cls_token']
  sd['pos_embed'] = enc.get('pos_embed',
                            posemb_sincos_2d(grid, width)[None])
  sd['patch_embed.proj.weight'] = np.ascontiguousarray(
      enc['patch_embed']['kernel'].transpose(3, 2, 0, 1))
  sd['patch_embed.proj.bias'] = enc['patch_embed']['bias']
  blocks = enc['transformer']
  for i in range(len(blocks)):
    _mae_block(sd, f'blocks.{i}', blocks[f'blocks_{i}'])
  if 'norm' in enc:
    _norm(sd, 'norm', enc['norm'])
  if 'fc_norm' in params:
    _norm(sd, 'fc_norm', params['fc_norm'])
  if 'head' in params:
    _linear(sd, 'head', params['head'])
  if 'decoder' in params:
    dec = params['decoder']
    sd['mask_token'] = dec['mask_token']
    sd['decoder_pos_embed'] = posemb_sincos_2d(
        grid, dec['mask_token'].shape[-1])[None]
    _linear(sd, 'decoder_embed', dec['embed'])
    for i in range(len(dec['transformer'])):
      _mae_block(sd, f'decoder_blocks.{i}', dec['transformer'][f'blocks_{i}'])
    _norm(sd, 'decoder_norm', dec['norm'])
    _linear(sd, 'decoder_pred', dec['pred'])
  return sd


# Official block names -> HF transformers 4.x and 5.x block names.
_HF4_BLOCK = {'norm1': 'layernorm_before', 'norm2': 'layernorm_after',
              'attn.proj': 'attention.output.dense',
              'mlp.fc1': 'intermediate.dense', 'mlp.fc2': 'output.dense'}
_HF4_QKV = ('attention.attention.query', 'attention.attention.key',
            'attention.attention.value')
_HF5_BLOCK = {'norm1': 'layernorm_before', 'norm2': 'layernorm_after',
              'attn.proj': 'attention.o_proj',
              'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2'}
_HF5_QKV = ('attention.q_proj', 'attention.k_proj', 'attention.v_proj')
_HF_TOP = {'cls_token': 'vit.embeddings.cls_token',
           'pos_embed': 'vit.embeddings.position_embeddings',
           'patch_embed.proj': 'vit.embeddings.patch_embeddings.projection',
           'norm': 'vit.layernorm', 'mask_token': 'decoder.mask_token',
           'decoder_pos_embed': 'decoder.decoder_pos_embed',
           'decoder_embed': 'decoder.decoder_embed',
           'decoder_norm': 'decoder.decoder_norm',
           'decoder_pred': 'decoder.decoder_pred'}


def to_hf_state_dict(mae_sd, version):
  """Renames an official-MAE state dict to HF ViTMAE names (4 or 5)."""
  block_names, qkv_names, encoder_stack = {
      4: (_HF4_BLOCK, _HF4_QKV, 'vit.encoder.layer'),
      5: (_HF5_BLOCK, _HF5_QKV, 'vit.layers')}[version]
  out = {}
  for key, value in mae_sd.items():
    if key.startswith(('blocks.', 'decoder_blocks.')):
      stack, index, rest = key.split('.', 2)
      stack = encoder_stack if stack == 'blocks' else 'decoder.decoder_layers'
      name, suffix = rest.rsplit('.', 1)
      if name == 'attn.qkv':
        for part, qkv_name in zip(np.split(value, 3), qkv_names):
          out[f'{stack}.{index}.{qkv_name}.{suffix}'] = part
      else:
        out[f'{stack}.{index}.{block_names[name]}.{suffix}'] = value
    elif key in _HF_TOP:
      out[_HF_TOP[key]] = value
    else:
      name, suffix = key.rsplit('.', 1)
      out[f'{_HF_TOP[name]}.{suffix}'] = value
  return out


@pytest.fixture(scope='module')
def mae_params():
  """Random params of the tiny MIM model with a learned encoder posemb slot."""
  return random_like(mae_shapes(posemb='learn'))


@pytest.fixture(scope='module')
def mae_sd(mae_params):
  return to_mae_state_dict(mae_params)


# ---------------------------------------------------- official MAE layout


def test_official_mae_full_matches_model_and_round_trips(mae_params, mae_sd):
  assert 'blocks.1.attn.qkv.weight' in mae_sd
  assert mae_sd['blocks.1.attn.qkv.weight'].shape == (3 * WIDTH, WIDTH)
  assert mae_sd['decoder_blocks.1.attn.qkv.weight'].shape == (
      3 * DEC_WIDTH, DEC_WIDTH)
  params = convert.import_state_dict(mae_sd, HEADS, DEC_HEADS)
  assert sorted(params) == ['decoder', 'encoder']
  # The official MAE dict stores its (fixed) encoder pos_embed; a model with
  # a learned position embedding takes it.
  checkpoint.check_compatible(mae_shapes(posemb='learn'), params)
  # Fused qkv split into q, k, v per head, and everything else, exactly.
  assert_trees_equal(params, mae_params)
  np.testing.assert_array_equal(
      params['encoder']['transformer']['blocks_0']['attn']['key']['kernel'],
      mae_sd['blocks.0.attn.qkv.weight'][WIDTH:2 * WIDTH].T.reshape(
          WIDTH, HEADS, WIDTH // HEADS))


def test_official_mae_decoder_pos_embed_is_not_imported(mae_sd):
  params = convert.import_state_dict(mae_sd, HEADS, DEC_HEADS)
  assert 'pos_embed' not in params['decoder']
  # It is recomputed: mimjax's own sin-cos table is the one the file holds.
  np.testing.assert_allclose(posemb_sincos_2d(GRID, DEC_WIDTH)[None],
                             mae_sd['decoder_pos_embed'], atol=1e-7)


def test_official_mae_fits_default_sincos_model(mae_sd):
  # A pre-training release stores the fixed sin-cos table: it is dropped.
  mae_sd = {**mae_sd, 'pos_embed': posemb_sincos_2d(GRID, WIDTH)[None]}
  params = convert.import_state_dict(mae_sd, HEADS, DEC_HEADS)
  checkpoint.check_compatible(mae_shapes(), params)
  # A learned (fine-tuned) embedding is kept.
  mae_sd['pos_embed'] = mae_sd['pos_embed'] + 0.01
  params = convert.import_state_dict(mae_sd, HEADS, DEC_HEADS)
  assert params['encoder']['pos_embed'].shape == (1, GRID[0] * GRID[1] + 1,
                                                  WIDTH)


def test_fused_qkv_split_matches_torch_attention(mae_sd):
  """The converted block computes what timm's fused-qkv attention computes."""
  params = convert.import_state_dict(mae_sd, HEADS, DEC_HEADS)
  block = params['encoder']['transformer']['blocks_1']['attn']
  x = np.random.default_rng(3).standard_normal((2, 5, WIDTH)).astype(
      np.float32)
  # timm Attention.forward, in numpy.
  w, b = mae_sd['blocks.1.attn.qkv.weight'], mae_sd['blocks.1.attn.qkv.bias']
  qkv = (x @ w.T + b).reshape(2, 5, 3, HEADS, -1).transpose(2, 0, 3, 1, 4)
  q, k, v = qkv
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(WIDTH // HEADS)
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  y = (attn @ v).transpose(0, 2, 1, 3).reshape(2, 5, WIDTH)
  expected = (y @ mae_sd['blocks.1.attn.proj.weight'].T
              + mae_sd['blocks.1.attn.proj.bias'])
  actual = vit.Attention(HEADS).apply({'params': block}, x)
  # Unscaled random weights give outputs of size ~50: float32 tolerance.
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-3)


def test_module_prefix_is_stripped(mae_sd):
  plain = convert.import_state_dict(mae_sd, HEADS, DEC_HEADS)
  prefixed = convert.import_state_dict(
      {f'module.{k}': v for k, v in mae_sd.items()}, HEADS, DEC_HEADS)
  assert_trees_equal(prefixed, plain)


def test_pretrained_encoder_only_dict(mae_params, mae_sd):
  encoder_sd = {k: v for k, v in mae_sd.items()
                if not k.startswith(('decoder', 'mask_token'))}
  params = convert.import_state_dict(encoder_sd, HEADS)  # no decoder heads
  assert list(params) == ['encoder']
  assert_trees_equal(params['encoder'], mae_params['encoder'])


def test_finetuned_dict_converts_to_classifier():
  expected = classifier_shapes()
  assert sorted(expected) == ['encoder', 'fc_norm', 'head']
  assert 'norm' not in expected['encoder']  # 'gap' pool: fc_norm, no norm
  values = random_like(expected, seed=1)
  sd = to_mae_state_dict(values)
  assert {'fc_norm.weight', 'head.weight', 'pos_embed'} <= set(sd)
  assert 'norm.weight' not in sd
  params = convert.import_state_dict(sd, HEADS)
  checkpoint.check_compatible(expected, params)
  assert_trees_equal(params, values)
  # ... and the classifier runs on it.
  logits, _ = Classifier(encoder(posemb='learn'), NUM_CLASSES).apply(
      {'params': params}, IMAGES)
  assert logits.shape == (1, NUM_CLASSES)


def test_missing_heads_for_a_fused_attention_raise(mae_sd):
  with pytest.raises(ValueError, match=r"'decoder_blocks\.0\.attn\.qkv\..*"
                     r'needs the number of heads'):
    convert.import_state_dict(mae_sd, HEADS)  # decoder_heads missing


# ------------------------------------------------------------ HF layouts


def test_hf_4x_and_5x_names_give_the_same_params(mae_sd):
  hf4 = to_hf_state_dict(mae_sd, 4)
  hf5 = to_hf_state_dict(mae_sd, 5)
  assert 'vit.encoder.layer.1.attention.attention.query.weight' in hf4
  assert 'vit.encoder.layer.0.attention.output.dense.bias' in hf4
  assert 'decoder.decoder_layers.1.intermediate.dense.weight' in hf4
  assert 'vit.layers.1.attention.q_proj.weight' in hf5
  assert 'decoder.decoder_layers.0.attention.o_proj.weight' in hf5
  assert convert.detect_format(hf4) == convert.detect_format(hf5) == 'hf'
  from_hf4 = convert.import_state_dict(hf4, HEADS, DEC_HEADS)
  from_hf5 = convert.import_state_dict(hf5, HEADS, DEC_HEADS)
  assert_trees_equal(from_hf4, from_hf5)
  # Same numbers as the official layout (HF's fixed position table dropped).
  from_mae = convert.import_state_dict(mae_sd, HEADS, DEC_HEADS)
  del from_mae['encoder']['pos_embed']
  assert_trees_equal(from_hf5, from_mae)
  checkpoint.check_compatible(mae_shapes(), from_hf4)


# --------------------------------------------------------- scanned layout


def test_stack_unstack_round_trip_and_scan_model(mae_params, mae_sd):
  stacked = convert.stack_blocks(mae_params)
  for module, depth in (('encoder', DEPTH), ('decoder', DEC_DEPTH)):
    transformer = stacked[module]['transformer']
    assert list(transformer) == ['blocks']
    assert transformer['blocks']['mlp']['fc1']['kernel'].shape[0] == depth
    np.testing.assert_array_equal(
        transformer['blocks']['attn']['query']['kernel'][1],
        mae_params[module]['transformer']['blocks_1']['attn']['query'][
            'kernel'])
  checkpoint.check_compatible(mae_shapes(scan=True, posemb='learn'), stacked)
  assert_trees_equal(convert.unstack_blocks(stacked), mae_params)
  # import_state_dict(scan=True) is the same as stacking afterwards.
  assert_trees_equal(
      convert.import_state_dict(mae_sd, HEADS, DEC_HEADS, scan=True), stacked)


def test_stack_blocks_orders_by_index_not_name():
  tree = {f'blocks_{i}': {'w': np.full((2,), i, np.float32)}
          for i in (0, 10, 2, 1, 3, 4, 5, 6, 7, 8, 9, 11)}
  stacked = convert.stack_blocks({'t': tree})['t']['blocks']['w']
  np.testing.assert_array_equal(stacked[:, 0], np.arange(12))
  assert_trees_equal(convert.unstack_blocks(
      convert.stack_blocks({'t': tree})), {'t': tree})


# ------------------------------------------------------- check_compatible


def test_check_compatible_names_first_mismatch_with_both_shapes(mae_params):
  expected = mae_shapes(posemb='learn')
  loaded = jax.tree.map(lambda x: x, mae_params)
  loaded['encoder']['transformer']['blocks_1']['mlp']['fc1']['kernel'] = (
      np.zeros((WIDTH, 255), np.float32))
  with pytest.raises(ValueError) as err:
    checkpoint.check_compatible(expected, loaded, 'my.pth')
  assert str(err.value) == (
      'my.pth parameter encoder/transformer/blocks_1/mlp/fc1/kernel has shape '
      '(64, 255), the model expects (64, 256)')
  # With two mismatches, exactly the first (in the model's order) is named.
  loaded['encoder']['cls_token'] = np.zeros((1, 1, 3), np.float32)
  with pytest.raises(ValueError) as err:
    checkpoint.check_compatible(expected, loaded)
  first = next(p for p in checkpoint.flatten(nn.meta.unbox(expected))  # pylint: disable=protected-access
               if p in ('encoder/cls_token',
                        'encoder/transformer/blocks_1/mlp/fc1/kernel'))
  assert first in str(err.value)
  assert '\n' not in str(err.value)


def test_check_compatible_reports_missing_and_extra(mae_params):
  expected = mae_shapes(posemb='learn')
  missing = jax.tree.map(lambda x: x, mae_params)
  del missing['decoder']['norm']['scale']
  with pytest.raises(ValueError, match=r'^checkpoint lacks parameter '
                     r'decoder/norm/scale \(32,\)$'):
    checkpoint.check_compatible(expected, missing)
  extra = jax.tree.map(lambda x: x, mae_params)
  extra['encoder']['extra'] = {'kernel': np.zeros((2, 2), np.float32)}
  with pytest.raises(ValueError, match=r'^checkpoint has parameter '
                     r'encoder/extra/kernel the model does not have$'):
    checkpoint.check_compatible(expected, extra)
  checkpoint.check_compatible(expected, mae_params)  # and the original passes


# ------------------------------------------------------------ bad names


@pytest.mark.parametrize('key', [
    'blocks.0.attn.bogus.weight',  # unknown block parameter
    'decoder_blocks.1.ls1.gamma',  # layer scale: not a MAE block
    'dist_token',  # unknown top-level
    'head_dist.weight',
])
def test_unknown_official_names_raise_naming_the_key(mae_sd, key):
  sd = dict(mae_sd, **{key: np.zeros((4,), np.float32)})
  with pytest.raises(ValueError, match=repr(key).replace('.', r'\.')):
    convert.import_state_dict(sd, HEADS, DEC_HEADS)


@pytest.mark.parametrize('key', [
    'vit.encoder.layer.0.attention.attention.bogus.weight',
    'vit.pooler.dense.weight',
])
def test_unknown_hf_names_raise_naming_the_key(mae_sd, key):
  sd = dict(to_hf_state_dict(mae_sd, 4), **{key: np.zeros((4,), np.float32)})
  with pytest.raises(ValueError, match=repr(key).replace('.', r'\.')):
    convert.import_state_dict(sd, HEADS, DEC_HEADS)


def test_dict_with_neither_layout_raises():
  sd = {'encoder.weight': np.zeros((2, 2)), 'fc.bias': np.zeros(2)}
  with pytest.raises(ValueError, match='neither official MAE/timm nor HF'):
    convert.import_state_dict(sd, HEADS)
  with pytest.raises(ValueError, match='neither'):
    convert.import_state_dict({}, HEADS)


# --------------------------------------------------------- resize_posemb


def test_resize_posemb_same_grid_is_identity():
  posemb = np.random.default_rng(0).standard_normal((1, 197, 8)).astype(
      np.float32)
  np.testing.assert_array_equal(convert.resize_posemb(posemb, (14, 14)),
                                posemb)


def test_resize_posemb_14_to_16_keeps_cls_row():
  posemb = np.random.default_rng(0).standard_normal((1, 197, 8)).astype(
      np.float32)
  resized = np.asarray(convert.resize_posemb(posemb, (16, 16)))
  assert resized.shape == (1, 257, 8)
  np.testing.assert_array_equal(resized[:, 0], posemb[:, 0])
  assert not np.allclose(resized[0, 1:17], posemb[0, 1:17])


@pytest.mark.parametrize('grid', [(16, 16), (10, 10), (14, 16)])
def test_resize_posemb_constant_stays_constant(grid):
  posemb = np.full((1, 197, 6), 0.25, np.float32)
  posemb[0, 0] = -1.0  # the cls row is carried over, not interpolated
  resized = np.asarray(convert.resize_posemb(posemb, grid))
  assert resized.shape == (1, 1 + grid[0] * grid[1], 6)
  np.testing.assert_allclose(resized[0, 1:], 0.25, rtol=1e-6)
  np.testing.assert_array_equal(resized[0, 0], -1.0)


def test_resize_posemb_rejects_non_square_grid():
  with pytest.raises(ValueError, match='non-square grid of 6'):
    convert.resize_posemb(np.zeros((1, 7, 4), np.float32), (4, 4))


# ------------------------------------------------------------------- CLI


def _write_safetensors(path, tensors):
  safetensors.numpy.save_file(
      {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
      str(path))


def _run_cli(src, out, *extra, capsys=None):
  rc = convert.main([str(src), str(out), '--model', 'mu',
                     '--decoder_heads', str(DEC_HEADS), *extra])
  assert rc == 0
  if capsys is not None:
    printed = capsys.readouterr().out
    assert printed.startswith(f'wrote {out}: decoder, encoder (')


def test_mu_preset_is_the_tiny_config():
  assert vit.preset('mu') == dict(width=WIDTH, depth=DEPTH, num_heads=HEADS)


def test_cli_torch_save_file(tmp_path, mae_sd, capsys):
  torch = pytest.importorskip('torch')
  src = tmp_path / 'mae_visualize_vit_mu.pth'
  torch.save({'model': {k: torch.from_numpy(np.array(v))
                        for k, v in mae_sd.items()}, 'epoch': 3}, src)
  out = tmp_path / 'ckpt'
  _run_cli(src, out, capsys=capsys)
  expected = convert.import_state_dict(mae_sd, HEADS, DEC_HEADS)
  assert_trees_equal(checkpoint.load_params(str(out)), expected)


@pytest.mark.parametrize('fmt', ['npz', 'safetensors'])
def test_cli_without_torch(tmp_path, mae_sd, fmt, capsys):
  src = tmp_path / f'weights.{fmt}'
  if fmt == 'npz':
    torch_io.save_npz_state_dict(src, mae_sd)
  else:
    _write_safetensors(src, mae_sd)
  out = tmp_path / 'ckpt'
  _run_cli(src, out, capsys=capsys)
  expected = convert.import_state_dict(mae_sd, HEADS, DEC_HEADS)
  restored = checkpoint.load_params(str(out))
  assert_trees_equal(restored, expected)
  if fmt == 'npz':
    # Restoring against the model's shapes works ...
    like = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                        nn.meta.unbox(mae_shapes(posemb='learn')))
    assert_trees_equal(checkpoint.load_params(str(out), like=like), expected)
    # ... and a wrong shape is named before anything is read.
    like['decoder']['pred']['kernel'] = jax.ShapeDtypeStruct(
        (DEC_WIDTH, 12), np.float32)
    with pytest.raises(ValueError, match=r'decoder/pred/kernel has shape '
                       r'\(32, 48\), the model expects \(32, 12\)'):
      checkpoint.load_params(str(out), like=like)


def test_cli_scan_writes_stacked_blocks(tmp_path, mae_sd):
  src = tmp_path / 'weights.npz'
  torch_io.save_npz_state_dict(src, mae_sd)
  out = tmp_path / 'ckpt_scan'
  _run_cli(src, out, '--scan')
  restored = checkpoint.load_params(str(out))
  checkpoint.check_compatible(mae_shapes(scan=True, posemb='learn'), restored)
  assert_trees_equal(
      restored, convert.import_state_dict(mae_sd, HEADS, DEC_HEADS, scan=True))


def test_load_params_accepts_eval_shape_output(tmp_path, mae_params):
  out = tmp_path / 'ckpt'
  checkpoint.save_params(str(out), mae_params)
  restored = checkpoint.load_params(str(out), like=mae_shapes(posemb='learn'))
  assert_trees_equal(nn.meta.unbox(restored), mae_params)


@pytest.mark.parametrize('content', [
    b'\x00\x01 definitely not a checkpoint \xff' * 3,
    b'PK\x03\x04 truncated zip',
])
def test_cli_corrupt_pth_fails_with_one_line_naming_the_path(tmp_path,
                                                             content):
  src = tmp_path / 'mae_pretrain_vit_mu.pth'
  src.write_bytes(content)
  out = tmp_path / 'ckpt'
  with pytest.raises(ValueError) as err:
    convert.main([str(src), str(out), '--model', 'mu'])
  message = str(err.value)
  assert message.startswith(f'{src}: not a readable checkpoint')
  assert '\n' not in message
  assert not os.path.exists(out)


def test_cli_truncated_torch_file(tmp_path, mae_sd):
  torch = pytest.importorskip('torch')
  whole = tmp_path / 'whole.pth'
  torch.save({'model': {k: torch.from_numpy(np.array(v))
                        for k, v in mae_sd.items()}}, whole)
  src = tmp_path / 'truncated.pth'
  src.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
  with pytest.raises(ValueError) as err:
    convert.main([str(src), str(tmp_path / 'ckpt'), '--model', 'mu'])
  assert str(err.value).startswith(f'{src}: not a readable checkpoint')
  assert '\n' not in str(err.value)


# ------------------------------------------------------------------ export


@pytest.fixture(scope='module')
def sincos_params():
  """Random params of the tiny MIM model with the fixed sin-cos encoder."""
  return random_like(mae_shapes(), seed=2)


def assert_state_dicts_equal(actual, expected):
  assert sorted(actual) == sorted(expected)
  for key, value in expected.items():
    assert actual[key].dtype == np.float32 and actual[key].flags.c_contiguous
    np.testing.assert_array_equal(actual[key], value, err_msg=key)


def test_export_is_the_hand_written_inverse(mae_params, sincos_params):
  """export_state_dict gives, bit for bit, what the test's own inverse writes:
  the official MAE layout, and the HF 5.x ('hf') and 4.x ('hf4') layouts."""
  sd, left_out = convert.export_state_dict(mae_params, 'mae', SIZE)
  assert left_out == []
  assert_state_dicts_equal(sd, to_mae_state_dict(mae_params))
  for layout, version in (('hf', 5), ('hf4', 4)):
    sd, _ = convert.export_state_dict(sincos_params, layout, SIZE)
    assert_state_dicts_equal(
        sd, to_hf_state_dict(to_mae_state_dict(sincos_params), version))
  classifier = random_like(classifier_shapes(), seed=3)
  sd, _ = convert.export_state_dict(classifier, 'mae', SIZE)
  assert_state_dicts_equal(sd, to_mae_state_dict(classifier))
  assert {'fc_norm.weight', 'head.weight', 'pos_embed'} <= set(sd)


@pytest.mark.parametrize('layout', ['mae', 'hf', 'hf4'])
def test_import_export_import_is_bit_exact(sincos_params, layout):
  first = convert.import_state_dict(
      convert.export_state_dict(sincos_params, layout, SIZE)[0], HEADS,
      DEC_HEADS)
  assert_trees_equal(first, sincos_params)
  exported, _ = convert.export_state_dict(first, layout, SIZE)
  second = convert.import_state_dict(exported, HEADS, DEC_HEADS)
  assert_trees_equal(second, first)
  # ... and export -> import -> export gives back the very same state dict.
  assert_state_dicts_equal(convert.export_state_dict(second, layout, SIZE)[0],
                           exported)


def test_round_trip_of_official_dicts_and_scanned_blocks(mae_params, mae_sd):
  # A fine-tuned-style dict (learned pos_embed) and a classifier, unchanged.
  assert_state_dicts_equal(convert.export_state_dict(
      convert.import_state_dict(mae_sd, HEADS, DEC_HEADS), 'mae', SIZE)[0],
                           mae_sd)
  classifier_sd = to_mae_state_dict(random_like(classifier_shapes(), seed=4))
  assert_state_dicts_equal(convert.export_state_dict(
      convert.import_state_dict(classifier_sd, HEADS), 'mae', SIZE)[0],
                           classifier_sd)
  # Scanned (stacked) blocks export as the unrolled ones do.
  assert_state_dicts_equal(
      convert.export_state_dict(convert.stack_blocks(mae_params), 'mae',
                                SIZE)[0], mae_sd)
  # An encoder alone exports alone.
  encoder_only, _ = convert.export_state_dict(
      {'encoder': mae_params['encoder']}, 'mae', SIZE)
  assert_state_dicts_equal(encoder_only, {
      k: v for k, v in mae_sd.items()
      if not k.startswith(('decoder', 'mask_token'))})


def test_export_leaves_out_other_parts_and_refuses_what_a_layout_lacks(
    mae_params, sincos_params):
  extra = dict(mae_params, predictor={'kernel': np.zeros((2, 2), np.float32)})
  sd, left_out = convert.export_state_dict(extra, 'mae', SIZE)
  assert left_out == ['predictor'] and not any('predictor' in k for k in sd)
  with pytest.raises(ValueError, match='learned position embedding.*'
                     '--layout=mae'):
    convert.export_state_dict(mae_params, 'hf', SIZE)
  classifier = random_like(classifier_shapes(), seed=3)
  with pytest.raises(ValueError, match='holds no classifier'):
    convert.export_state_dict(classifier, 'hf4', SIZE)
  odd = jax.tree.map(lambda x: x, sincos_params)
  odd['encoder']['transformer']['blocks_0']['ls1'] = {
      'gamma': np.ones(WIDTH, np.float32)}
  with pytest.raises(ValueError, match=r'encoder/transformer/blocks_0/ls1/'
                     r'gamma has no name in the mae layout'):
    convert.export_state_dict(odd, 'mae', SIZE)
  with pytest.raises(ValueError, match='not a multiple of the patch size'):
    convert.export_state_dict(sincos_params, 'mae', 30)
  with pytest.raises(ValueError, match='unknown layout'):
    convert.export_state_dict(sincos_params, 'keras', SIZE)


def _export(src, out, *extra, capsys=None):
  rc = convert.main(['--export', str(src), str(out), '--model', 'mu',
                     '--image_size', str(SIZE), *extra])
  assert rc == 0
  if capsys is not None:
    return capsys.readouterr().out
  return None


@pytest.mark.parametrize('layout,version', [('mae', None), ('hf', 5),
                                            ('hf4', 4)])
def test_cli_import_export_import_through_files(tmp_path, sincos_params,
                                                layout, version, capsys):
  """file -> mimjax-convert -> orbax -> mimjax-convert --export -> file: the
  same tensors, bit for bit, and the same parameters when imported again."""
  sd = to_mae_state_dict(sincos_params)
  if version:
    sd = to_hf_state_dict(sd, version)
  src = tmp_path / 'weights.safetensors'
  _write_safetensors(src, sd)
  _run_cli(src, tmp_path / 'ckpt', capsys=capsys)
  printed = _export(tmp_path / 'ckpt', tmp_path / 'out.safetensors',
                    '--layout', layout, capsys=capsys)
  assert printed.startswith(f'wrote {tmp_path / "out.safetensors"}: encoder, '
                            f'decoder in the {layout} layout (')
  assert not (tmp_path / 'out.safetensors.tmp').exists()
  exported = torch_io.load_state_dict(tmp_path / 'out.safetensors')
  assert_state_dicts_equal(exported, sd)
  assert_trees_equal(convert.import_state_dict(exported, HEADS, DEC_HEADS),
                     checkpoint.load_params(str(tmp_path / 'ckpt')))


def test_cli_export_from_a_training_run(tmp_path, mae_params, capsys):
  """A run's pre-training checkpoints (a train state, scanned or not) export;
  an objective's own parameters are named as left out."""
  run = tmp_path / 'run'
  params = dict(convert.stack_blocks(mae_params),
                predictor={'kernel': np.ones((2, 2), np.float32)})
  ckpts = checkpoint.Checkpoints(str(run / 'pretrain' / 'checkpoints'),
                                 async_save=False)
  ckpts.save(7, {'params': params, 'step': np.int32(7)}, {'position': 0})
  ckpts.close()
  printed = _export(run, tmp_path / 'mae.safetensors', capsys=capsys)
  assert printed.rstrip().endswith('; left out: predictor')
  assert_state_dicts_equal(
      torch_io.load_state_dict(tmp_path / 'mae.safetensors'),
      to_mae_state_dict(mae_params))


def test_cli_export_refusals(tmp_path, mae_params, sincos_params):
  ckpt = tmp_path / 'ckpt'
  checkpoint.save_params(str(ckpt), sincos_params)
  out = tmp_path / 'out.safetensors'
  with pytest.raises(ValueError, match='must end in .safetensors'):
    _export(ckpt, tmp_path / 'out.pth')
  with pytest.raises(ValueError, match=r'width 64 and depth 2.*--model=B'):
    convert.main(['--export', str(ckpt), str(out), '--image_size', '32'])
  assert not out.exists()
  with pytest.raises(ValueError, match='patch size 4'):
    _export(ckpt, out, '--patch_size', '16')
  with pytest.raises(ValueError, match='go with --export'):
    convert.main([str(ckpt), str(tmp_path / 'x'), '--layout', 'hf'])
  with pytest.raises(ValueError, match='is a file; --export reads'):
    _export(tmp_path / 'ckpt' / checkpoint.CHECKSUMS, out)
  # An existing OUT: refused without --overwrite; with it, only a previous
  # export is replaced.
  _export(ckpt, out)
  with pytest.raises(ValueError, match='exists; choose another name, or '
                     '--overwrite'):
    _export(ckpt, out)
  _export(ckpt, out, '--overwrite')
  precious = tmp_path / 'precious.safetensors'
  _write_safetensors(precious, {'w': np.ones(3)})
  before = precious.read_bytes()
  with pytest.raises(ValueError, match='not a file mimjax-convert --export '
                     'wrote'):
    _export(ckpt, precious, '--overwrite')
  assert precious.read_bytes() == before
  learned = tmp_path / 'learned'
  checkpoint.save_params(str(learned), mae_params)
  with pytest.raises(ValueError, match='learned position embedding'):
    _export(learned, tmp_path / 'hf.safetensors', '--layout', 'hf')


def test_cli_export_error_is_one_plain_line(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr('sys.argv', ['mimjax-convert', '--export',
                                   str(tmp_path / 'nothing'),
                                   str(tmp_path / 'out.safetensors')])
  assert convert.main() == 1
  err = capsys.readouterr().err
  assert err == (f'mimjax-convert: error: checkpoint={tmp_path / "nothing"}: '
                 'no such file or directory\n')


# ------------------------------------------------- export of a run, as it is


def _run(tmp_path, params, image_size=SIZE, name='run'):
  """A run as pipeline.run leaves it: a train-state checkpoint in
  pretrain/checkpoints and the invocation's config.json at its root."""
  run = tmp_path / name
  ckpts = checkpoint.Checkpoints(str(run / 'pretrain' / 'checkpoints'),
                                 async_save=False)
  ckpts.save(7, {'params': params, 'step': np.int32(7)}, {'position': 0})
  ckpts.close()
  c = config_lib.base_config()
  c.model.size, c.model.patch_size = 'mu', PATCH
  c.pretrain.data.image_size = image_size
  c.pretrain.decoder.update(dict(width=DEC_WIDTH, depth=DEC_DEPTH,
                                 num_heads=DEC_HEADS))
  (run / 'config.json').write_text(c.to_json_best_effort(indent=1))
  return run, c


def test_cli_export_of_a_run_reads_its_config(tmp_path, sincos_params, capsys):
  """No --model or --image_size: the run's own (its latest config-N.json);
  a flag given overrides them."""
  run, c = _run(tmp_path, sincos_params)
  out = tmp_path / 'mae.safetensors'
  assert convert.main(['--export', str(run), str(out)]) == 0
  assert capsys.readouterr().out.rstrip().endswith(
      f'ViT-mu, patch 4, image {SIZE}, as {run / "config.json"} says)')
  assert_state_dicts_equal(torch_io.load_state_dict(out),
                           to_mae_state_dict(sincos_params))
  # A later invocation's config-2.json is the one read ...
  c.pretrain.data.image_size = 16
  (run / 'config-2.json').write_text(c.to_json_best_effort(indent=1))
  for source in (run, run / 'pretrain', run / 'pretrain' / 'checkpoints'):
    convert.main(['--export', str(source), str(out), '--overwrite'])
    assert 'image 16, as' in capsys.readouterr().out
    assert torch_io.load_state_dict(out)['pos_embed'].shape == (1, 17, WIDTH)
  # ... and flags given explicitly win.
  convert.main(['--export', str(run), str(out), '--overwrite',
                '--image_size', '32'])
  assert torch_io.load_state_dict(out)['pos_embed'].shape == (1, 65, WIDTH)
  with pytest.raises(ValueError, match=r'width 64 and depth 2.*--model=mu'):
    convert.main(['--export', str(run), str(out), '--overwrite', '--model',
                  'B'])


def test_cli_export_hf_config_writes_a_from_pretrained_directory(
    tmp_path, sincos_params, capsys):
  run, _ = _run(tmp_path, sincos_params)
  out = tmp_path / 'hf'
  assert convert.main(['--export', str(run), str(out), '--hf_config']) == 0
  assert capsys.readouterr().out.startswith(
      f'wrote {out / "model.safetensors"}: encoder, decoder in the hf layout (')
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors']
  assert_state_dicts_equal(
      torch_io.load_state_dict(out / 'model.safetensors'),
      to_hf_state_dict(to_mae_state_dict(sincos_params), 5))
  assert json.loads((out / 'config.json').read_text()) == dict(
      architectures=['ViTMAEForPreTraining'], model_type='vit_mae',
      hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
      intermediate_size=4 * WIDTH, hidden_act='gelu', hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6, qkv_bias=True,
      image_size=SIZE, patch_size=PATCH, num_channels=3,
      decoder_hidden_size=DEC_WIDTH, decoder_num_hidden_layers=DEC_DEPTH,
      decoder_num_attention_heads=DEC_HEADS,
      decoder_intermediate_size=4 * DEC_WIDTH, mask_ratio=0.75,
      norm_pix_loss=True)
  # transformers 4.x names, over the previous export.
  with pytest.raises(ValueError, match='exists; choose another name'):
    convert.main(['--export', str(run), str(out), '--hf_config'])
  convert.main(['--export', str(run), str(out), '--hf_config', '--overwrite',
                '--layout', 'hf4'])
  assert 'vit.encoder.layer.0.attention.attention.query.weight' in (
      torch_io.load_state_dict(out / 'model.safetensors'))
  # Nothing mimjax did not write is replaced.
  foreign = tmp_path / 'foreign'
  foreign.mkdir()
  (foreign / 'config.json').write_text('{"mine": 1}')
  with pytest.raises(ValueError, match='not next to a model.safetensors '
                     'mimjax-convert --export wrote'):
    convert.main(['--export', str(run), str(foreign), '--hf_config',
                  '--overwrite'])
  assert (foreign / 'config.json').read_text() == '{"mine": 1}'
  for extra, message in (
      (['--layout', 'mae'], 'OUTPUT a directory, --layout hf or hf4'),
      ([], 'OUTPUT a directory')):
    with pytest.raises(ValueError, match=message):
      convert.main(['--export', str(run), str(tmp_path / 'x.safetensors')
                    if not extra else str(tmp_path / 'y'), '--hf_config',
                    *extra])
  with pytest.raises(ValueError, match='go with --export'):
    convert.main([str(run), str(tmp_path / 'z'), '--hf_config'])
  encoder_only, _ = _run(tmp_path, {'encoder': sincos_params['encoder']},
                         name='encoder_only')
  with pytest.raises(ValueError, match='has no decoder'):
    convert.main(['--export', str(encoder_only), str(tmp_path / 'e'),
                  '--hf_config'])


def test_load_and_export_print_no_orbax_metadata_warning(
    tmp_path, sincos_params, caplog, capfd):
  run, _ = _run(tmp_path, sincos_params)
  caplog.set_level('INFO')
  checkpoint.load_state_params(str(run / 'pretrain' / 'checkpoints'))
  _export(run, tmp_path / 'out.safetensors')
  checkpoint.save_params(str(tmp_path / 'params'), sincos_params)
  checkpoint.load_params(str(tmp_path / 'params'))
  printed = capfd.readouterr()
  for text in (caplog.text, printed.out, printed.err):
    assert 'Metadata file does not exist' not in text
