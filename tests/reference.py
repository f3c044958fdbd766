"""Shared by the golden-file generator and the parity tests.

Reference models (HF transformers ViTMAE, timm ViT) and mimjax are fed the
same weights: a deterministic numpy draw per parameter name, so that the
committed golden files only hold names, shapes, inputs and outputs.
"""

import json

import numpy as np

HF_CONFIGS = {
    'tiny': dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=256, image_size=32, patch_size=4,
                 decoder_hidden_size=32, decoder_num_hidden_layers=2,
                 decoder_num_attention_heads=4, decoder_intermediate_size=128),
    'base16': dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, image_size=224, patch_size=16,
                   decoder_hidden_size=512, decoder_num_hidden_layers=8,
                   decoder_num_attention_heads=16,
                   decoder_intermediate_size=2048),
}
TIMM_CONFIGS = {
    'tiny': dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4,
                 num_classes=10),
    'base16': dict(img_size=224, patch_size=16, embed_dim=768, depth=12,
                   num_heads=12, num_classes=1000),
}
# Fixed sin-cos tables: left as the reference computes them, so the parity
# test also checks mimjax's own sin-cos against them.
FIXED = ('position_embeddings', 'decoder_pos_embed')


def weights(names_shapes, seed=0):
  """Deterministic weights with O(1) activations, one numpy draw per tensor."""
  out = {}
  for i, (name, shape) in enumerate(names_shapes):
    if any(f in name for f in FIXED):
      continue
    rng = np.random.default_rng([seed, i])
    x = rng.standard_normal(shape).astype(np.float32)
    if len(shape) >= 2 and 'token' not in name:
      x /= np.sqrt(np.prod(shape[1:]))
    elif name.endswith('weight'):  # norm scales
      x = 1.0 + 0.1 * x
    else:
      x = 0.1 * x if name.endswith('bias') else 0.5 * x
    if 'pos_embed' in name:
      x *= 0.2
    out[name] = x
  return out


def pack_names(names_shapes):
  return np.array(json.dumps([[n, list(s)] for n, s in names_shapes]))


def unpack_names(array):
  return [(n, tuple(s)) for n, s in json.loads(str(array))]


def images(batch, size, seed=1):
  return np.random.default_rng(seed).standard_normal(
      (batch, size, size, 3)).astype(np.float32)


def perturb(params, seed=0, scale=0.1):
  """mimjax parameters with every leaf moved off its init (at init, biases,
  norm offsets and tokens are zeros, norm scales ones)."""
  import jax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x, np.float32) + scale *
                      rng.standard_normal(np.shape(x)).astype(np.float32),
                      params)


def hf_layout():
  """The export layout of the installed transformers ('hf': 5.x names)."""
  import transformers  # pylint: disable=g-import-not-at-top
  return 'hf' if int(transformers.__version__.split('.')[0]) >= 5 else 'hf4'


def _hf_model(name):
  import transformers  # pylint: disable=g-import-not-at-top
  config = transformers.ViTMAEConfig(**HF_CONFIGS[name], layer_norm_eps=1e-6,
                                     mask_ratio=0.75)
  return transformers.ViTMAEForPreTraining(config).eval()


def hf_mae_from(name, state_dict):
  """HF ViTMAEForPreTraining loading `state_dict` (numpy) strictly: every
  name it has, no other."""
  import torch  # pylint: disable=g-import-not-at-top
  model = _hf_model(name)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in
                         state_dict.items()}, strict=True)
  return model


def hf_mae(name):
  """HF ViTMAEForPreTraining (eval mode) with reference weights."""
  import torch  # pylint: disable=g-import-not-at-top
  model = _hf_model(name)
  # transformers 5 may skip its own sin-cos init (leaving zeros): redo it.
  embeddings = model.vit.embeddings
  embeddings.patch_embeddings.projection._is_hf_initialized = False
  with torch.no_grad():
    embeddings.initialize_weights()
    model.decoder.initialize_weights(embeddings.patch_embeddings.num_patches)
  assert embeddings.position_embeddings.abs().max() > 0.5
  assert model.decoder.decoder_pos_embed.abs().max() > 0.5
  sd = model.state_dict()
  names = [(k, tuple(v.shape)) for k, v in sd.items()]
  model.load_state_dict({k: torch.from_numpy(v) for k, v in
                         weights(names).items()}, strict=False)
  return model, names


def hf_outputs(model, images_nhwc, noise):
  """Loss (norm-pix on and off), predictions and encoder tokens from HF."""
  import torch  # pylint: disable=g-import-not-at-top
  pixels = torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())
  noise = torch.from_numpy(noise)
  out = {}
  with torch.no_grad():
    for norm_pix in (False, True):
      model.config.norm_pix_loss = norm_pix
      res = model(pixel_values=pixels, noise=noise)
      out[f'loss_normpix{int(norm_pix)}'] = res.loss.numpy()
    out['pred'] = res.logits.numpy()
    out['mask'] = res.mask.numpy()
    out['encoder'] = model.vit(pixel_values=pixels, noise=noise
                               ).last_hidden_state.numpy()
  return out


def timm_vit(name, state_dict=None):
  """timm VisionTransformer, global average pool + fc_norm, with reference
  weights, or loading `state_dict` (numpy) strictly."""
  import torch  # pylint: disable=g-import-not-at-top
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
  model = vision_transformer.VisionTransformer(
      **TIMM_CONFIGS[name], global_pool='avg').eval()
  names = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
  model.load_state_dict({k: torch.from_numpy(v) for k, v in (
      state_dict or weights(names)).items()}, strict=True)
  return model, names


def timm_logits(model, images_nhwc):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    return model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())
                 ).numpy()
