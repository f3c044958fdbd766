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

Why this module is long: import, export and their command line are one
contract over one set of name tables (import -> export -> import is
bit-exact, tests/test_convert.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import safetensors.numpy

from mimjax import checkpoint, torch_io
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
  raise ValueError('state dict has neither official MAE/timm nor HF ViTMAE '
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
        raise ValueError(f'unknown block parameter {key!r}')
      path, kind = block_names[name]
      prefix = f'{module}/transformer/blocks_{index}/{path}'
    else:
      name, _, suffix = key.rpartition('.')
      if key in top:  # tokens: no '.weight' suffix
        name, suffix = key, ''
      if name not in top:
        raise ValueError(f'unknown parameter {key!r} in a {fmt} state dict')
      prefix, kind = top[name]
      heads = encoder_heads
      if kind == 'fixed':
        continue
    if kind in ('q', 'qkv', 'out') and heads is None:
      raise ValueError(f'{key!r} needs the number of heads of its module')
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
    raise ValueError(f'unknown layout {layout!r}; known: {", ".join(LAYOUTS)}')
  top, block_names, *stacks = LAYOUTS[layout]
  params = unstack_blocks(jax.tree.map(np.asarray, nn.meta.unbox(params)))
  if layout != 'mae' and {'fc_norm', 'head'} & set(params):
    raise ValueError('HF ViTMAEForPreTraining holds no classifier (fc_norm, '
                     'head): export a fine-tuned model with --layout=mae')
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
      raise ValueError(f'image size {image_size} is not a multiple of the '
                       f'patch size {patch}')
    side = image_size // patch
    return vit.posemb_sincos_2d((side, side), width)[None]

  for name, (path, kind) in top.items():
    module, present = path.split('/')[0], any(
        p == path or p.startswith(path + '/') for p in flat)
    if kind == 'fixed' and present:
      raise ValueError(f'the {module} has a learned position embedding, which '
                       f'the {layout} layout (fixed sin-cos) cannot hold; '
                       'export it with --layout=mae')
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
    raise ValueError(f'parameter {unused[0]} has no name in the {layout} '
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
    raise ValueError(f'cannot resize a non-square grid of {patches.shape[0]}')
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
    raise ValueError('the weights have no patch embedding '
                     f'({" or ".join(_PATCH_KEYS)}): not a ViT encoder')
  if (width, depth) != (preset['width'], preset['depth']):
    same = [n for n, (w, d, _) in vit.PRESETS.items() if (w, d) == (width,
                                                                    depth)]
    hint = f'; use --model={same[0]}' if same else ''
    raise ValueError(
        f'the weights are a ViT of width {width} and depth {depth} '
        f'({found["patch_key"]} has shape {found["patch_shape"]}), but '
        f'--model={model} is width {preset["width"]}, depth '
        f'{preset["depth"]}, {preset["num_heads"]} heads{hint}')
  if width % preset['num_heads']:
    raise ValueError(f'width {width} is not divisible by the '
                     f'{preset["num_heads"]} heads of ViT-{model}')
  if patch_size and found['patch_size'] != patch_size:
    raise ValueError(f'the weights have patch size {found["patch_size"]} '
                     f'({found["patch_key"]} has shape '
                     f'{found["patch_shape"]}), not {patch_size}')
  dec = found.get('decoder_width')
  if dec is not None and decoder_heads and dec % decoder_heads:
    raise ValueError(f'the decoder has width {dec} ({found["decoder_key"]} '
                     f'has shape {found["decoder_shape"]}), which '
                     f'--decoder_heads={decoder_heads} does not divide')
  return found


# ----------------------------------------------------------------- CLI


def main(argv=None):
  """mimjax-convert: a .pth / .safetensors checkpoint -> an orbax checkpoint;
  with --export, a mimjax checkpoint -> a .safetensors state dict.

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
                      'with --export: the .safetensors file to write')
  parser.add_argument('--model', default='B', help='ViT size: ' +
                      ', '.join(vit.PRESETS))
  parser.add_argument('--decoder_heads', type=int, default=16)
  parser.add_argument('--scan', action='store_true',
                      help='write stacked (scanned) block parameters')
  parser.add_argument('--patch_size', type=int, default=0,
                      help='refuse weights of another patch size (0: any)')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace a previous mimjax checkpoint in OUTPUT, or '
                      'with --export a previous export (nothing else there is '
                      'ever deleted)')
  parser.add_argument('--export', action='store_true',
                      help='write a mimjax checkpoint out as a PyTorch state '
                      'dict instead')
  parser.add_argument('--layout', choices=sorted(LAYOUTS), default=None,
                      help='with --export: mae (official MAE / timm names, the '
                      'default), hf (transformers 5.x ViTMAEForPreTraining) or '
                      'hf4 (transformers 4.x)')
  parser.add_argument('--image_size', type=int, default=None,
                      help='with --export: image size of the fixed sin-cos '
                      'tables (default 224)')
  args = parser.parse_args(argv)
  if args.export:
    return _export_main(args)
  if args.layout or args.image_size:
    raise ValueError('--layout and --image_size go with --export')
  return _import_main(args)


def _import_main(args):
  out = checkpoint.resolve(args.output)
  if out.exists() and not args.overwrite and (
      not out.is_dir() or any(True for _ in out.iterdir())):
    raise ValueError(f'{args.output} exists and is not empty; choose another '
                     'directory, or --overwrite to replace a previous mimjax '
                     'checkpoint there')
  if out.is_dir() and checkpoint.foreign_entries(out):
    raise ValueError(f'{args.output} holds '
                     f'{", ".join(checkpoint.foreign_entries(out)[:3])}, '
                     'which mimjax did not write; --overwrite replaces only a '
                     'previous mimjax checkpoint: choose another directory')
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
  layout, image_size = args.layout or 'mae', args.image_size or 224
  out = checkpoint.resolve(args.output)
  if not str(out).endswith('.safetensors'):
    raise ValueError(f'{args.output}: the file --export writes must end in '
                     '.safetensors')
  if out.exists():
    if not args.overwrite:
      raise ValueError(f'{args.output} exists; choose another name, or '
                       '--overwrite to replace a previous export')
    if not _is_export(out):
      raise ValueError(f'{args.output} is not a file mimjax-convert --export '
                       'wrote; --overwrite replaces only those: choose another '
                       'name')
  where = checkpoint.resolve(checkpoint.find_init(args.source, 'checkpoint'))
  if where.is_file():
    raise ValueError(f'{args.source} is a file; --export reads a mimjax '
                     'checkpoint directory')
  params = (checkpoint.load_state_params(str(where))
            if any(p.name.isdigit() for p in where.iterdir())
            else checkpoint.load_params(str(where)))
  state_dict, left_out = export_state_dict(params, layout, image_size)
  found = check_preset(state_dict, args.model, patch_size=args.patch_size)
  tmp = out.parent / (out.name + '.tmp')
  tmp.write_bytes(safetensors.numpy.save(state_dict, metadata={
      'format': 'pt', 'mimjax_export': layout}))
  tmp.replace(out)
  total = sum(x.size for x in state_dict.values())
  parts = [p for p in EXPORTED if p in params]
  print(f'wrote {args.output}: {", ".join(parts)} in the {layout} layout '
        f'({len(state_dict)} tensors, {total:,} values; ViT-{args.model}, '
        f'patch {found["patch_size"]}, image {image_size})' +
        (f'; left out: {", ".join(left_out)}' if left_out else ''))
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
