"""Weights in and out: official MAE / timm ViT and HF ViTMAE state dicts <-> mimjax.

Three torch layouts are understood (names after an optional 'module.'):
- official MAE and timm: `blocks.{i}.attn.qkv`, `decoder_blocks.{i}...`,
  `fc_norm`, `head` (pre-trained encoder, `*_full` with decoder, fine-tuned);
- HF transformers `ViTMAEForPreTraining`, both the 4.x names
  (`vit.encoder.layer.{i}.attention.attention.query`) and the 5.x names
  (`vit.layers.{i}.attention.q_proj`).
`import_state_dict` gives a mimjax parameter tree with the parts the file
holds: 'encoder', 'decoder', 'fc_norm', 'head'. `export_state_dict` is its
inverse, from the same name tables, into any of the three layouts. No torch
needed (see torch_io); `mimjax-convert` is the command line of both.
`export` and `load_encoder` (also `mimjax.export`, `mimjax.load_encoder`)
read a run's checkpoints with the settings of its own config.json; `export`
can add the config.json transformers' `from_pretrained` reads.

Why this module is long: import, export and their command line are one
contract over one set of name tables (import -> export -> import is
bit-exact, tests/test_convert.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import safetensors.numpy

from mimjax import build, checkpoint, errors, torch_io, views
from mimjax import config as config_lib
from mimjax.models import vit

Params = dict[str, Any]

# ------------------------------------------------------------ name tables
# Each block-level source name maps to (mimjax path inside a block, kind).

_MAE_BLOCK = {
    'norm1': ('norm1', 'norm'), 'norm2': ('norm2', 'norm'),
    'attn.qkv': ('attn', 'qkv'), 'attn.proj': ('attn/out', 'out'),
    'mlp.fc1': ('mlp/fc1', 'dense'), 'mlp.fc2': ('mlp/fc2', 'dense'),
}
_HF4_BLOCK = {  # transformers 4.x
    'layernorm_before': ('norm1', 'norm'), 'layernorm_after': ('norm2', 'norm'),
    'attention.attention.query': ('attn/query', 'q'),
    'attention.attention.key': ('attn/key', 'q'),
    'attention.attention.value': ('attn/value', 'q'),
    'attention.output.dense': ('attn/out', 'out'),
    'intermediate.dense': ('mlp/fc1', 'dense'),
    'output.dense': ('mlp/fc2', 'dense'),
}
_HF5_BLOCK = {  # transformers 5.x
    'layernorm_before': ('norm1', 'norm'), 'layernorm_after': ('norm2', 'norm'),
    'attention.q_proj': ('attn/query', 'q'), 'attention.k_proj': ('attn/key', 'q'),
    'attention.v_proj': ('attn/value', 'q'), 'attention.o_proj': ('attn/out', 'out'),
    'mlp.fc1': ('mlp/fc1', 'dense'), 'mlp.fc2': ('mlp/fc2', 'dense'),
}
_HF_BLOCK = {**_HF4_BLOCK, **_HF5_BLOCK}
# Top-level names: source -> (mimjax path, kind). 'posemb' is imported as it
# is (and dropped if it is the fixed sin-cos table, see _drop_fixed_posemb);
# 'fixed' is never imported (mimjax recomputes it) and is exported as the
# fixed sin-cos table of the module the path names.
_MAE_TOP = {
    'cls_token': ('encoder/cls_token', 'raw'),
    'pos_embed': ('encoder/pos_embed', 'posemb'),
    'patch_embed.proj': ('encoder/patch_embed', 'conv'),
    'norm': ('encoder/norm', 'norm'),
    'fc_norm': ('fc_norm', 'norm'),
    'head': ('head', 'dense'),
    'mask_token': ('decoder/mask_token', 'raw'),
    'decoder_pos_embed': ('decoder/pos_embed', 'fixed'),
    'decoder_embed': ('decoder/embed', 'dense'),
    'decoder_norm': ('decoder/norm', 'norm'),
    'decoder_pred': ('decoder/pred', 'dense'),
}
_HF_TOP = {
    'vit.embeddings.cls_token': ('encoder/cls_token', 'raw'),
    'vit.embeddings.position_embeddings': ('encoder/pos_embed', 'fixed'),
    'vit.embeddings.patch_embeddings.projection': ('encoder/patch_embed', 'conv'),
    'vit.layernorm': ('encoder/norm', 'norm'),
    'decoder.mask_token': ('decoder/mask_token', 'raw'),
    'decoder.decoder_pos_embed': ('decoder/pos_embed', 'fixed'),
    'decoder.decoder_embed': ('decoder/embed', 'dense'),
    'decoder.decoder_norm': ('decoder/norm', 'norm'),
    'decoder.decoder_pred': ('decoder/pred', 'dense'),
}
_MAE_BLOCK_RE = re.compile(r'^(decoder_blocks|blocks)\.(\d+)\.(.+)$')
_HF_BLOCK_RE = re.compile(
    r'^(vit\.encoder\.layer|vit\.layers|decoder\.decoder_layers)\.(\d+)\.(.+)$')


def detect_format(state_dict: dict[str, np.ndarray]) -> str:
  """'hf' for transformers ViTMAE names, 'mae' for official MAE / timm names."""
  if any(k.startswith(('vit.', 'decoder.decoder_')) for k in state_dict):
    return 'hf'
  if any(k.startswith(('blocks.', 'patch_embed.')) for k in state_dict):
    return 'mae'
  raise errors.Invalid('state dict has neither official MAE/timm nor HF ViTMAE '
                       f'parameter names (first keys: {list(state_dict)[:3]})')


def _convert(kind: str, suffix: str, value: np.ndarray, heads: int):
  """Source tensor -> {mimjax leaf name: array} for one parameter."""
  value = np.asarray(value, np.float32)
  if kind in ('raw', 'posemb'):
    return {'': value}
  if kind == 'norm':
    return {{'weight': 'scale', 'bias': 'bias'}[suffix]: value}
  if kind == 'conv':  # torch (D, C, p, p) -> flax (p, p, C, D)
    return {'kernel' if suffix == 'weight' else 'bias':
            value.transpose(2, 3, 1, 0) if suffix == 'weight' else value}
  if kind == 'dense':
    return {'kernel': value.T} if suffix == 'weight' else {'bias': value}
  if kind == 'q':  # (D_out, D_in) -> (D_in, heads, head_dim)
    if suffix == 'weight':
      return {'kernel': value.T.reshape(value.shape[1], heads, -1)}
    return {'bias': value.reshape(heads, -1)}
  if kind == 'qkv':  # fused (3D, D) -> three (D, heads, head_dim)
    out = {}
    for name, part in zip(('query', 'key', 'value'), np.split(value, 3)):
      for leaf, array in _convert('q', suffix, part, heads).items():
        out[f'{name}/{leaf}'] = array
    return out
  if kind == 'out':  # (D, D_in) -> (heads, head_dim, D)
    if suffix == 'weight':
      return {'kernel': value.T.reshape(heads, -1, value.shape[0])}
    return {'bias': value}
  raise AssertionError(kind)


def _export(kind: str, get) -> dict[str, np.ndarray]:
  """The inverse of `_convert`: `get(leaf)` reads one mimjax leaf of the
  parameter; returns {torch suffix: array}."""
  if kind in ('raw', 'posemb'):
    return {'': get('')}
  if kind == 'norm':
    return {'weight': get('scale'), 'bias': get('bias')}
  if kind == 'conv':  # flax (p, p, C, D) -> torch (D, C, p, p)
    return {'weight': get('kernel').transpose(3, 2, 0, 1), 'bias': get('bias')}
  if kind == 'dense':
    return {'weight': get('kernel').T, 'bias': get('bias')}
  if kind == 'q':  # (D_in, heads, head_dim) -> (D_out, D_in)
    kernel = get('kernel')
    return {'weight': kernel.reshape(kernel.shape[0], -1).T,
            'bias': get('bias').reshape(-1)}
  if kind == 'qkv':  # three (D, heads, head_dim) -> fused (3D, D)
    parts = [_export('q', lambda leaf, n=n: get(f'{n}/{leaf}'))
             for n in ('query', 'key', 'value')]
    return {s: np.concatenate([p[s] for p in parts]) for s in ('weight', 'bias')}
  if kind == 'out':  # (heads, head_dim, D) -> (D, D_in)
    kernel = get('kernel')
    return {'weight': kernel.reshape(-1, kernel.shape[-1]).T,
            'bias': get('bias')}
  raise AssertionError(kind)


def _set(tree: Params, path: str, value):
  parts = [p for p in path.split('/') if p]
  for p in parts[:-1]:
    tree = tree.setdefault(p, {})
  tree[parts[-1]] = value


def import_state_dict(state_dict: dict[str, np.ndarray], encoder_heads: int,
                      decoder_heads: int | None = None,
                      scan: bool = False) -> Params:
  """Converts a torch-layout state dict into mimjax parameters (numpy)."""
  state_dict = {k.removeprefix('module.'): v for k, v in state_dict.items()}
  fmt = detect_format(state_dict)
  top, block_names, block_re = ((_HF_TOP, _HF_BLOCK, _HF_BLOCK_RE)
                                if fmt == 'hf' else
                                (_MAE_TOP, _MAE_BLOCK, _MAE_BLOCK_RE))
  params: Params = {}
  for key, value in state_dict.items():
    match = block_re.match(key)
    if match:
      stack, index, rest = match.groups()
      module = 'decoder' if stack.startswith('decoder') else 'encoder'
      heads = encoder_heads if module == 'encoder' else decoder_heads
      name, _, suffix = rest.rpartition('.')
      if name not in block_names:
        raise errors.Invalid(f'unknown block parameter {key!r}')
      path, kind = block_names[name]
      prefix = f'{module}/transformer/blocks_{index}/{path}'
    else:
      name, _, suffix = key.rpartition('.')
      if key in top:  # tokens: no '.weight' suffix
        name, suffix = key, ''
      if name not in top:
        raise errors.Invalid(f'unknown parameter {key!r} in a {fmt} state dict')
      prefix, kind = top[name]
      heads = encoder_heads
      if kind == 'fixed':
        continue
    if kind in ('q', 'qkv', 'out') and heads is None:
      raise errors.Invalid(f'{key!r} needs the number of heads of its module')
    for leaf, array in _convert(kind, suffix, value, heads).items():
      _set(params, f'{prefix}/{leaf}', array)
  _drop_fixed_posemb(params)
  if scan:
    params = stack_blocks(params)
  return params


def _drop_fixed_posemb(params: Params):
  """Drops a stored position embedding that is just the fixed sin-cos table.

  Pre-trained MAE checkpoints store their fixed table (mimjax recomputes it);
  fine-tuned ones store a learned embedding, which is kept.
  """
  posemb = params.get('encoder', {}).get('pos_embed')
  if posemb is None:
    return
  side = int(round(np.sqrt(posemb.shape[1] - 1)))
  if side * side == posemb.shape[1] - 1:
    fixed = vit.posemb_sincos_2d((side, side), posemb.shape[-1])[None]
    if np.allclose(posemb, fixed, atol=1e-4):
      del params['encoder']['pos_embed']


# ------------------------------------------------------------- export

# Layout name -> (top-level names, block names, encoder stack, decoder stack).
LAYOUTS = {
    'mae': (_MAE_TOP, _MAE_BLOCK, 'blocks', 'decoder_blocks'),
    'hf': (_HF_TOP, _HF5_BLOCK, 'vit.layers', 'decoder.decoder_layers'),
    'hf4': (_HF_TOP, _HF4_BLOCK, 'vit.encoder.layer', 'decoder.decoder_layers'),
}
EXPORTED = ('encoder', 'decoder', 'fc_norm', 'head')


def export_state_dict(params: Params, layout: str = 'mae',
                      image_size: int = 224):
  """mimjax parameters -> a torch state dict (numpy), the inverse of
  `import_state_dict`.

  `layout` is 'mae' (official MAE / timm names: an encoder, a decoder, a
  fine-tuned `fc_norm` and `head`), 'hf' or 'hf4' (transformers 5.x / 4.x
  `ViTMAEForPreTraining`: an encoder and a decoder). Blocks may be scanned.
  The fixed sin-cos tables the torch models keep are written for an image of
  `image_size` (a learned position embedding keeps its own grid). Returns the
  state dict and the top-level parts of `params` no layout holds (e.g. an
  objective's projector), which are left out.
  """
  if layout not in LAYOUTS:
    raise errors.Invalid(f'unknown layout {layout!r}; known: '
                         f'{", ".join(LAYOUTS)}')
  top, block_names, *stacks = LAYOUTS[layout]
  params = unstack_blocks(jax.tree.map(np.asarray, nn.meta.unbox(params)))
  if layout != 'mae' and {'fc_norm', 'head'} & set(params):
    raise errors.Invalid('HF ViTMAEForPreTraining holds no classifier '
                         '(fc_norm, head): export a fine-tuned model with '
                         '--layout=mae')
  flat = checkpoint.flatten({k: v for k, v in params.items() if k in EXPORTED})
  used, out = set(), {}

  def get(path):
    used.add(path)
    return flat[path]

  def put(name, path, kind):
    read = lambda leaf: get(f'{path}/{leaf}' if leaf else path)
    for suffix, value in _export(kind, read).items():
      out[f'{name}.{suffix}' if suffix else name] = np.ascontiguousarray(value)

  def fixed(module):  # the sin-cos table the torch models keep
    token = 'cls_token' if module == 'encoder' else 'mask_token'
    width = flat[f'{module}/{token}'].shape[-1]
    patch = flat['encoder/patch_embed/kernel'].shape[0]
    if image_size % patch:
      raise errors.Invalid(f'image size {image_size} is not a multiple of the '
                           f'patch size {patch}')
    side = image_size // patch
    return vit.posemb_sincos_2d((side, side), width)[None]

  for name, (path, kind) in top.items():
    module, present = path.split('/')[0], any(
        p == path or p.startswith(path + '/') for p in flat)
    if kind == 'fixed' and present:
      raise errors.Invalid(f'the {module} has a learned position embedding, '
                           f'which the {layout} layout (fixed sin-cos) cannot '
                           f'hold; export it with --layout=mae')
    if kind in ('fixed', 'posemb') and not present and module in params:
      out[name] = fixed(module)
    elif present:
      put(name, path, kind)
  for module, stack in zip(('encoder', 'decoder'), stacks):
    blocks = params.get(module, {}).get('transformer', {})
    for i in range(len(blocks)):
      for name, (path, kind) in block_names.items():
        put(f'{stack}.{i}.{name}', f'{module}/transformer/blocks_{i}/{path}',
            kind)
  unused = sorted(set(flat) - used)
  if unused:
    raise errors.Invalid(f'parameter {unused[0]} has no name in the {layout} '
                         'layout')
  return out, sorted(set(params) - set(EXPORTED))


# ------------------------------------------------------------- layouts


def stack_blocks(params: Params) -> Params:
  """Unrolled blocks_0..blocks_{n-1} -> one scanned 'blocks' (layer axis 0)."""
  def visit(tree):
    if not isinstance(tree, dict):
      return tree
    names = sorted((k for k in tree if re.fullmatch(r'blocks_\d+', k)),
                   key=lambda k: int(k.split('_')[1]))
    out = {k: visit(v) for k, v in tree.items() if k not in names}
    if names:
      out['blocks'] = jax.tree.map(lambda *xs: np.stack(xs),
                                   *[tree[n] for n in names])
    return out
  return visit(params)


def unstack_blocks(params: Params) -> Params:
  """Scanned 'blocks' (layer axis 0) -> unrolled blocks_0..blocks_{n-1}."""
  def visit(tree):
    if not isinstance(tree, dict):
      return tree
    out = {k: visit(v) for k, v in tree.items() if k != 'blocks'}
    if 'blocks' in tree:
      depth = jax.tree.leaves(tree['blocks'])[0].shape[0]
      for i in range(depth):
        out[f'blocks_{i}'] = jax.tree.map(lambda x: x[i], tree['blocks'])
    return out
  return visit(params)


def resize_posemb(posemb: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """Learned (1, 1 + h*w, D) position embedding -> a new patch grid (bicubic)."""
  cls, patches = posemb[:, :1], posemb[0, 1:]
  old = int(round(np.sqrt(patches.shape[0])))
  if old * old != patches.shape[0]:
    raise errors.Invalid(f'cannot resize a non-square grid of '
                         f'{patches.shape[0]}')
  if (old, old) == tuple(grid):
    return posemb
  patches = patches.reshape(old, old, -1)
  resized = jax.image.resize(patches, (*grid, patches.shape[-1]), 'bicubic')
  return np.concatenate(
      [cls, np.asarray(resized).reshape(1, -1, posemb.shape[-1])], axis=1)


# ------------------------------------------------------- what a file holds

_PATCH_KEYS = ('patch_embed.proj.weight',
               'vit.embeddings.patch_embeddings.projection.weight')
_DECODER_EMBED_KEYS = ('decoder_embed.weight', 'decoder.decoder_embed.weight')


def describe(state_dict: dict[str, np.ndarray]) -> dict[str, Any]:
  """What a state dict's shapes tell: the encoder's width, depth and patch
  size, and (when it has one) the decoder's width and depth. Heads cannot
  be seen in a state dict."""
  state_dict = {k.removeprefix('module.'): v for k, v in state_dict.items()}
  fmt = detect_format(state_dict)
  block_re = _HF_BLOCK_RE if fmt == 'hf' else _MAE_BLOCK_RE
  blocks = {'encoder': set(), 'decoder': set()}
  for key in state_dict:
    match = block_re.match(key)
    if match:
      stack, index, _ = match.groups()
      blocks['decoder' if stack.startswith('decoder') else 'encoder'].add(
          int(index))
  out = {'depth': len(blocks['encoder'])}
  key = next((k for k in _PATCH_KEYS if k in state_dict), None)
  if key is not None:
    shape = tuple(np.shape(state_dict[key]))  # (D, C, p, p)
    out.update(width=shape[0], patch_size=shape[-1], patch_key=key,
               patch_shape=shape)
  key = next((k for k in _DECODER_EMBED_KEYS if k in state_dict), None)
  if key is not None:
    shape = tuple(np.shape(state_dict[key]))  # (decoder width, D)
    out.update(decoder_width=shape[0], decoder_depth=len(blocks['decoder']),
               decoder_key=key, decoder_shape=shape)
  return out


def check_preset(state_dict: dict[str, np.ndarray], model: str,
                 decoder_heads: int | None = None,
                 patch_size: int | None = None) -> dict[str, Any]:
  """Refuses weights whose shapes do not fit ViT-`model` (so that nothing is
  split into a wrong number of heads), naming both shapes; returns
  `describe`'s view of them."""
  found = describe(state_dict)
  preset = vit.preset(model)
  width, depth = found.get('width'), found['depth']
  if width is None:
    raise errors.Invalid('the weights have no patch embedding '
                         f'({" or ".join(_PATCH_KEYS)}): not a ViT encoder')
  if (width, depth) != (preset['width'], preset['depth']):
    same = [n for n, (w, d, _) in vit.PRESETS.items() if (w, d) == (width,
                                                                    depth)]
    hint = f'; use --model={same[0]}' if same else ''
    raise errors.Invalid(
        f'the weights are a ViT of width {width} and depth {depth} '
        f'({found["patch_key"]} has shape {found["patch_shape"]}), but '
        f'--model={model} is width {preset["width"]}, depth '
        f'{preset["depth"]}, {preset["num_heads"]} heads{hint}')
  if width % preset['num_heads']:
    raise errors.Invalid(f'width {width} is not divisible by the '
                         f'{preset["num_heads"]} heads of ViT-{model}')
  if patch_size and found['patch_size'] != patch_size:
    raise errors.Invalid(f'the weights have patch size {found["patch_size"]} '
                         f'({found["patch_key"]} has shape '
                         f'{found["patch_shape"]}), not {patch_size}')
  dec = found.get('decoder_width')
  if dec is not None and decoder_heads and dec % decoder_heads:
    raise errors.Invalid(f'the decoder has width {dec} ({found["decoder_key"]} '
                         f'has shape {found["decoder_shape"]}), which '
                         f'--decoder_heads={decoder_heads} does not divide')
  return found


# ------------------------------------------- a run's settings; Python API

# What mimjax-convert assumes where no run's config.json says otherwise
# (an import; an export of a directory mimjax-convert wrote): the official
# MAE ViT-B/16 at 224, with its 16-head decoder.
DEFAULTS = dict(model='B', patch_size=0, image_size=224, decoder_heads=16,
                norm_eps=1e-6, mask_ratio=0.75, norm_pix=True)


def run_config(checkpoints):
  """(config, path) of the run whose `<stage>/checkpoints` these are: its
  latest config file (config.json, then config-2.json, ... one per
  invocation) as an ml_collections ConfigDict; (None, None) outside a run."""
  where = checkpoint.resolve(checkpoints)
  if where.name != 'checkpoints':
    return None, None
  numbered = config_lib.config_files(where.parent.parent)
  if not numbered:
    return None, None
  path = numbered[max(numbered)]
  try:
    return mlc.ConfigDict(json.loads(path.read_text())), str(path)
  except ValueError as e:
    raise errors.Invalid(f'{path} is not a readable run config: '
                         f'{str(e).splitlines()[0]}') from None


def run_settings(config, stage: str) -> dict[str, Any]:
  """What `export` needs to know from a run's config: the model, patch and
  image size (of `stage`: pretrain.data's for pre-training, data's for the
  others), the decoder's heads, the norm epsilon, mask ratio and norm-pix."""
  try:
    pre = config.pretrain
    return dict(
        model=config.model.size, patch_size=config.model.patch_size,
        norm_eps=config.model.norm_eps, decoder_heads=pre.decoder.num_heads,
        image_size=(pre.data if stage == 'pretrain' else
                    config.data).image_size, mask_ratio=pre.mask_ratio,
        norm_pix=bool(pre.objective_kwargs.get('norm_pix', True)))
  except (AttributeError, KeyError) as e:
    raise errors.Invalid(f'the run config lacks {e}') from None


def _checkpoint_dir(source: str, reader: str):
  """The mimjax checkpoint directory `source` names (find_init's rules)."""
  where = checkpoint.resolve(checkpoint.find_init(source, 'checkpoint'))
  if where.is_file():
    raise errors.Invalid(f'{source} is a file; {reader} reads a mimjax '
                         'checkpoint directory (import a .pth with '
                         'mimjax-convert first)')
  return where


def _load(where) -> Params:
  """The parameters of a run's checkpoints or of an orbax params directory."""
  if any(p.name.isdigit() for p in where.iterdir()):
    return checkpoint.load_state_params(str(where))
  return checkpoint.load_params(str(where))


def hf_vitmae_config(params: Params, settings: dict[str, Any]) -> dict:
  """A transformers `ViTMAEConfig` (as JSON) for the model `params` hold,
  built from their shapes and `settings` (heads, image size, norm epsilon,
  mask ratio, norm-pix): `ViTMAEForPreTraining.from_pretrained` of a
  directory with it and the 'hf'/'hf4' export loads as is."""
  flat = checkpoint.flatten(unstack_blocks(
      jax.tree.map(np.shape, nn.meta.unbox(params))))
  if 'decoder/embed/kernel' not in flat:
    raise errors.Invalid('the checkpoint has no decoder, and '
                         'ViTMAEForPreTraining needs one: export a '
                         "pre-training run's checkpoints")
  patch, _, channels, width = flat['encoder/patch_embed/kernel']
  dec_width, predicted = (flat['decoder/embed/kernel'][1],
                          flat['decoder/pred/kernel'][1])
  if predicted != patch * patch * channels:
    raise errors.Invalid(f'the decoder predicts {predicted} values per patch, '
                         f'not the {patch}x{patch}x{channels} pixels '
                         'ViTMAEForPreTraining predicts')
  depth = lambda m: len({k.split('/')[2] for k in flat
                         if k.startswith(f'{m}/transformer/')})
  block = 'transformer/blocks_0/mlp/fc1/kernel'
  return dict(
      architectures=['ViTMAEForPreTraining'], model_type='vit_mae',
      hidden_size=width, num_hidden_layers=depth('encoder'),
      num_attention_heads=vit.preset(settings['model'])['num_heads'],
      intermediate_size=flat[f'encoder/{block}'][1], hidden_act='gelu',
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
      layer_norm_eps=settings['norm_eps'], qkv_bias=True,
      image_size=settings['image_size'], patch_size=patch,
      num_channels=channels, decoder_hidden_size=dec_width,
      decoder_num_hidden_layers=depth('decoder'),
      decoder_num_attention_heads=settings['decoder_heads'],
      decoder_intermediate_size=flat[f'decoder/{block}'][1],
      mask_ratio=settings['mask_ratio'], norm_pix_loss=settings['norm_pix'])


def _replaceable(path, overwrite: bool, ours: bool, what: str):
  """Refuses to write over `path` unless `overwrite`, and even then unless
  it is part of a previous export (`ours`; `what` says what one is)."""
  if not path.exists():
    return
  if not overwrite:
    raise errors.Invalid(f'{path} exists; choose another name, or '
                         '--overwrite to replace a previous export')
  if not ours:
    raise errors.Invalid(f'{path} is not {what}; --overwrite replaces only '
                         'those: choose another name')


def _write(path, data: bytes):
  tmp = path.parent / (path.name + '.tmp')
  tmp.write_bytes(data)
  tmp.replace(path)


def export(source: str, output: str, hf_config: bool = False,
           layout: str | None = None, *, model: str | None = None,
           image_size: int | None = None, patch_size: int | None = None,
           decoder_heads: int | None = None, overwrite: bool = False) -> str:
  """Writes the weights of a run (its directory, a stage directory, its
  `<stage>/checkpoints`, or a directory mimjax-convert wrote) as a PyTorch
  state dict; returns the line mimjax-convert --export prints.

  The model size, patch and image size (of the fixed sin-cos tables) and
  the decoder's heads are the run's (its latest config.json); an argument
  given overrides them. `output` is the .safetensors file to write, or with
  `hf_config` a directory for `transformers.ViTMAEForPreTraining
  .from_pretrained`: model.safetensors (`layout` 'hf', the default, or
  'hf4') and config.json (`hf_vitmae_config`).
  """
  layout = layout or ('hf' if hf_config else 'mae')
  if layout not in LAYOUTS:
    raise errors.Invalid(f'unknown layout {layout!r}; known: '
                         f'{", ".join(LAYOUTS)}')
  out = checkpoint.resolve(output)
  if hf_config:
    if layout == 'mae' or str(out).endswith('.safetensors'):
      raise errors.Invalid('--hf_config writes a transformers '
                           'ViTMAEForPreTraining directory: OUTPUT a '
                           'directory, --layout hf or hf4')
    if out.exists() and not out.is_dir():
      raise errors.Invalid(f'{output} exists and is not a directory')
    weights, config_file = out / 'model.safetensors', out / 'config.json'
    shown = os.path.join(output, 'model.safetensors')
  elif not str(out).endswith('.safetensors'):
    raise errors.Invalid(f'{output}: the file --export writes must end in '
                         '.safetensors (or, with --hf_config, name a '
                         'directory)')
  else:
    weights, config_file, shown = out, None, output
  ours = _is_export(weights)
  _replaceable(weights, overwrite, ours, 'a file mimjax-convert --export wrote')
  if config_file is not None:
    _replaceable(config_file, overwrite, ours, 'next to a model.safetensors '
                 'mimjax-convert --export wrote')
  where = _checkpoint_dir(source, '--export')
  config, config_path = run_config(where)
  settings = dict(DEFAULTS)
  if config is not None:
    settings.update(run_settings(config, where.parent.name))
  given = dict(model=model, image_size=image_size, patch_size=patch_size,
               decoder_heads=decoder_heads)
  settings.update({k: v for k, v in given.items() if v})
  params = _load(where)
  state_dict, left_out = export_state_dict(params, layout,
                                           settings['image_size'])
  found = check_preset(state_dict, settings['model'],
                       settings['decoder_heads'] if hf_config else None,
                       settings['patch_size'])
  hf = hf_vitmae_config(params, settings) if hf_config else None
  if hf_config:
    out.mkdir(parents=True, exist_ok=True)
  _write(weights, safetensors.numpy.save(state_dict, metadata={
      'format': 'pt', 'mimjax_export': layout}))
  if hf is not None:
    _write(config_file, (json.dumps(hf, indent=2) + '\n').encode())
  total = sum(x.size for x in state_dict.values())
  parts = [p for p in EXPORTED if p in params]
  return (f'wrote {shown}: {", ".join(parts)} in the {layout} layout '
          f'({len(state_dict)} tensors, {total:,} values; '
          f'ViT-{settings["model"]}, patch {found["patch_size"]}, image '
          f'{settings["image_size"]}' +
          (f', as {config_path} says' if config_path else '') + ')' +
          (f' and {os.path.join(output, "config.json")} '
           '(ViTMAEForPreTraining.from_pretrained)' if hf is not None else '') +
          (f'; left out: {", ".join(left_out)}' if left_out else ''))


class LoadedEncoder:
  """A trained encoder: `module` (a flax `models.Encoder`), its `params`
  (`module.apply({'params': params}, images)`), the run's `config` (None
  outside a run), the `image_size` it was trained at, and `embed`."""

  def __init__(self, module, params, config, image_size: int):
    self.module, self.params, self.config = module, params, config
    self.image_size = image_size
    mean, std = np.float32(views.IMAGENET_MEAN), np.float32(views.IMAGENET_STD)

    def embed(params, images, pool):
      if images.dtype == jnp.uint8:  # [0, 255] -> as the input pipeline
        images = (images.astype(jnp.float32) / 255 - mean) / std
      tokens = module.apply({'params': params}, images)['tokens']
      return tokens[:, 0] if pool == 'cls' else tokens[:, 1:].mean(axis=1)

    self._embed = jax.jit(embed, static_argnames='pool')

  def embed(self, images, pool: str = 'mean') -> jax.Array:
    """(B, width) features of (B, H, W, 3) images: ImageNet mean/std
    normalised float32 as mimjax.data gives them, or uint8 [0, 255] ones
    (normalised here); H and W multiples of the patch size. `pool`: 'mean'
    of the patch tokens, or the 'cls' token (both after the final norm,
    when the encoder has one). Jitted: one compile per shape and pool."""
    if pool not in ('mean', 'cls'):
      raise errors.Invalid(f"pool must be 'mean' or 'cls', got {pool!r}")
    if np.ndim(images) != 4 or np.shape(images)[-1] != 3:
      raise errors.Invalid(f'images must be (batch, height, width, 3), got '
                           f'shape {np.shape(images)}')
    return self._embed(self.params, images, pool=pool)


def load_encoder(path: str, model: str | None = None) -> LoadedEncoder:
  """The encoder of a run (its directory: the pre-training; a stage
  directory; or its `<stage>/checkpoints`), built from the run's latest
  config.json; `model` (a ViT size) overrides its size, and is needed for
  a directory mimjax-convert wrote, which has no config."""
  where = _checkpoint_dir(path, 'load_encoder')
  config, _ = run_config(where)
  if config is None and model is None:
    raise errors.Invalid(f'{path} is not in a run (no config.json two levels '
                         'up): give the ViT size, load_encoder(path, '
                         f'model=...), one of {", ".join(vit.PRESETS)}')
  params = _load(where)
  if 'encoder' not in params:
    raise errors.Invalid(f'{path} has no encoder parameters (found '
                         f'{", ".join(sorted(params))})')
  params = params['encoder']
  model_cfg = (config.model if config is not None else
               config_lib.base_config().model).copy_and_resolve_references()
  patch = int(np.shape(params['patch_embed']['kernel'])[0])
  with model_cfg.unlocked():
    model_cfg.size = model or model_cfg.size
    model_cfg.patch_size = patch
    model_cfg.scan = 'blocks' in params['transformer']
  learned = 'pos_embed' in params
  if config is not None:
    image_size = run_settings(config, where.parent.name)['image_size']
  elif learned:
    image_size = patch * int(round(np.sqrt(params['pos_embed'].shape[1] - 1)))
  else:
    image_size = DEFAULTS['image_size']
  module = build.encoder(model_cfg, posemb='learn' if learned else 'sincos',
                         final_norm='norm' in params)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct(
      (1, image_size, image_size, 3), jnp.float32))['params']
  checkpoint.check_compatible(shapes, params, f'the encoder of {path} '
                              f'(ViT-{model_cfg.size})')
  return LoadedEncoder(module, params, config, image_size)


# ----------------------------------------------------------------- CLI


def main(argv=None):
  """mimjax-convert: a .pth / .safetensors checkpoint -> an orbax checkpoint;
  with --export, a mimjax checkpoint -> a .safetensors state dict (and with
  --hf_config, a transformers ViTMAEForPreTraining directory).

  From the command line (argv None) an error is one line and exit status 1;
  called with argv, it raises.
  """
  if argv is None:
    try:
      return _main(None)
    except (ValueError, OSError) as e:
      text = str(e).strip()
      line = text.splitlines()[0] if text else repr(e)
      print(f'mimjax-convert: error: {line}', file=sys.stderr)
      return 1
  return _main(argv)


def _main(argv):
  parser = argparse.ArgumentParser(description=main.__doc__.split('\n\n')[0])
  parser.add_argument('source', help='mae_pretrain_vit_base.pth, a *_full '
                      '.pth, a fine-tuned .pth, or an HF/timm state dict; '
                      'with --export: a run directory, its '
                      '<stage>/checkpoints, or a directory this command wrote')
  parser.add_argument('output', help='directory for the orbax checkpoint; '
                      'with --export: the .safetensors file to write, or with '
                      '--hf_config a directory')
  parser.add_argument('--model', default=None, help='ViT size: ' +
                      ', '.join(vit.PRESETS) + " (default B; with --export "
                      "of a run: the run's)")
  parser.add_argument('--decoder_heads', type=int, default=None,
                      help="default 16; with --export of a run: the run's")
  parser.add_argument('--scan', action='store_true',
                      help='write stacked (scanned) block parameters')
  parser.add_argument('--patch_size', type=int, default=0,
                      help='refuse weights of another patch size (0: any; '
                      "with --export of a run: the run's)")
  parser.add_argument('--overwrite', action='store_true',
                      help='replace a previous mimjax checkpoint in OUTPUT, or '
                      'with --export a previous export (nothing else there is '
                      'ever deleted)')
  parser.add_argument('--export', action='store_true',
                      help='write a mimjax checkpoint out as a PyTorch state '
                      'dict instead')
  parser.add_argument('--layout', choices=sorted(LAYOUTS), default=None,
                      help='with --export: mae (official MAE / timm names, the '
                      'default), hf (transformers 5.x ViTMAEForPreTraining, '
                      'the default with --hf_config) or hf4 (transformers '
                      '4.x)')
  parser.add_argument('--image_size', type=int, default=None,
                      help='with --export: image size of the fixed sin-cos '
                      "tables (default: the run's, else 224)")
  parser.add_argument('--hf_config', action='store_true',
                      help='with --export: OUTPUT is a directory; write '
                      'model.safetensors and the config.json that '
                      'transformers ViTMAEForPreTraining.from_pretrained reads')
  args = parser.parse_args(argv)
  if args.export:
    return _export_main(args)
  if args.layout or args.image_size or args.hf_config:
    raise errors.Invalid('--layout, --image_size and --hf_config go with '
                         '--export')
  args.model = args.model or DEFAULTS['model']
  args.decoder_heads = args.decoder_heads or DEFAULTS['decoder_heads']
  return _import_main(args)


def _import_main(args):
  out = checkpoint.resolve(args.output)
  if out.exists() and not args.overwrite and (
      not out.is_dir() or any(True for _ in out.iterdir())):
    raise errors.Invalid(f'{args.output} exists and is not empty; choose '
                         f'another directory, or --overwrite to replace a '
                         'previous mimjax checkpoint there')
  if out.is_dir() and checkpoint.foreign_entries(out):
    raise errors.Invalid(f'{args.output} holds '
                         f'{", ".join(checkpoint.foreign_entries(out)[:3])}, '
                         'which mimjax did not write; --overwrite replaces '
                         'only a previous mimjax checkpoint: choose another '
                         'directory')
  state_dict = torch_io.load_state_dict(args.source)
  found = check_preset(state_dict, args.model, args.decoder_heads,
                       args.patch_size)
  heads = vit.preset(args.model)['num_heads']
  params = import_state_dict(state_dict, heads, args.decoder_heads, args.scan)
  checkpoint.save_params(args.output, params, overwrite=args.overwrite)
  total = sum(x.size for x in jax.tree.leaves(params))
  decoder = (f', decoder width {found["decoder_width"]} depth '
             f'{found["decoder_depth"]}' if 'decoder_width' in found else '')
  print(f'wrote {args.output}: {", ".join(sorted(params))} '
        f'({total:,} parameters; ViT-{args.model}, patch '
        f'{found["patch_size"]}{decoder})')
  return 0


def _export_main(args):
  print(export(args.source, args.output, args.hf_config, args.layout,
               model=args.model, image_size=args.image_size,
               patch_size=args.patch_size, decoder_heads=args.decoder_heads,
               overwrite=args.overwrite))
  return 0


def _is_export(path) -> bool:
  """Whether `path` is a .safetensors file that --export wrote."""
  try:
    with path.open('rb') as f:
      size = int.from_bytes(f.read(8), 'little')
      header = json.loads(f.read(size)) if size < 1 << 27 else {}
    return 'mimjax_export' in header.get('__metadata__', {})
  except (OSError, ValueError, AttributeError):
    return False


if __name__ == '__main__':
  sys.exit(main())
