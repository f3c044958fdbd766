"""Pre-trained weights into a model: from a mimjax run, an orbax params
directory or an official / HF / timm file, laid out as the model expects."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from mimjax import build, checkpoint, convert, errors, torch_io
from mimjax.models import vit

# The official MAE decoders have 16 heads; only the encoder is used here.
MAE_DECODER_HEADS = 16


def load_pretrained(path: str, model_cfg) -> dict:
  """Encoder parameters from a mimjax run, an orbax params dir or a .pth file."""
  if not path:
    raise errors.Invalid('no pre-trained checkpoint given (finetune.init)')
  where = checkpoint.resolve(path)
  if where.is_file():
    params = convert.import_state_dict(
        torch_io.load_state_dict(path),
        encoder_heads=vit.preset(model_cfg.size)['num_heads'],
        decoder_heads=MAE_DECODER_HEADS)
  elif where.is_dir() and any(p.name.isdigit() for p in where.iterdir()):
    params = checkpoint.load_state_params(path)
  elif where.is_dir():
    params = checkpoint.load_params(path)
  else:
    raise errors.Missing(f'pre-trained checkpoint {path} does not exist')
  if 'encoder' not in params:
    raise errors.Invalid(f'{path} has no encoder parameters (found '
                         f'{sorted(params)})')
  return jax.tree.map(np.asarray, params['encoder'])


def merge_encoder(abstract_encoder, pretrained: dict, grid, source: str):
  """Pre-trained encoder params laid out as `abstract_encoder` expects.

  Adapts the block layout (scanned / unrolled) and resizes a learned
  position embedding; the encoder's own sin-cos init stays where the
  checkpoint has none (a fixed-sin-cos MAE encoder). Other differences are
  an error naming the first mismatching parameter.
  """
  abstract_encoder = nn.meta.unbox(abstract_encoder)
  scanned = 'blocks' in abstract_encoder.get('transformer', {})
  pretrained = (convert.stack_blocks(pretrained) if scanned else
                convert.unstack_blocks(pretrained))
  pretrained = dict(pretrained)
  if 'pos_embed' not in abstract_encoder:
    pretrained.pop('pos_embed', None)
  elif 'pos_embed' in pretrained:
    pretrained['pos_embed'] = convert.resize_posemb(pretrained['pos_embed'],
                                                    grid)
  else:
    pretrained['pos_embed'] = vit.posemb_sincos_2d(
        grid, abstract_encoder['pos_embed'].shape[-1])[None]
  if 'norm' not in abstract_encoder:
    pretrained.pop('norm', None)  # 'gap' classifiers use fc_norm instead
  checkpoint.check_compatible(abstract_encoder, pretrained,
                           f'pre-trained encoder {source}')
  return pretrained


def pretrained_encoder(abstract_params, path: str, config, image_size: int):
  """`{'encoder': ...}` from `path`, to override a model's initial encoder."""
  return {'encoder': merge_encoder(abstract_params['encoder'],
                                   load_pretrained(path, config.model),
                                   build.grid(config, image_size), path)}
