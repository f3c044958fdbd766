"""Shared by the golden-file generator and the parity tests.

Reference models (HF transformers ViTMAE, timm ViT) and mimjax are fed the
same weights: a deterministic numpy draw per parameter name, so that the
committed golden files only hold names, shapes, inputs and outputs.
"""

import json
import math
import re

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


# ------------------------------------------- the official recipes, in torch
# Reimplemented from the description of the official MAE main_pretrain.py /
# main_finetune.py (tests/test_step_parity.py trains them next to mimjax).


def official_lr(epoch, lr, min_lr, warmup_epochs, epochs):
  """The lr set before each iteration from its fractional epoch
  (data_iter_step / len(loader) + epoch): linear warmup from 0, then a
  half-cycle cosine down to `min_lr`."""
  if epoch < warmup_epochs:
    return lr * epoch / warmup_epochs
  return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(
      math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def official_lrs(steps_per_epoch, epochs, warmup_epochs, lr, min_lr):
  """official_lr of every iteration, in order."""
  return [official_lr(e + i / steps_per_epoch, lr, min_lr, warmup_epochs,
                      epochs)
          for e in range(epochs) for i in range(steps_per_epoch)]


def pretrain_param_groups(model, weight_decay):
  """Pre-training: no decay for 1-D parameters and biases, decay for the
  rest (tokens included); frozen parameters (sin-cos tables) left out."""
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    if p.requires_grad:
      (no_decay if p.ndim == 1 or name.endswith('.bias') else decay).append(p)
  return [dict(params=no_decay, weight_decay=0.0),
          dict(params=decay, weight_decay=weight_decay)]


def timm_name(name):
  """The official (timm) name of an HF ViT parameter, which the layer-wise
  rules read."""
  name = name.removeprefix('vit.')
  for hf, timm in (('embeddings.cls_token', 'cls_token'),
                   ('embeddings.position_embeddings', 'pos_embed'),
                   ('embeddings.patch_embeddings.projection',
                    'patch_embed.proj')):
    if name.startswith(hf):
      return timm + name[len(hf):]
  return re.sub(r'^(layers|encoder\.layer)\.', 'blocks.', name)


def finetune_param_groups(model, weight_decay, layer_decay, depth):
  """Fine-tuning, layer-wise: layer 0 for cls_token, pos_embed, patch_embed,
  block i -> i + 1, the rest depth + 1; lr scale
  layer_decay^(depth + 1 - layer); no decay for 1-D, pos_embed, cls_token."""
  groups = {}
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    n = timm_name(name)
    no_decay = p.ndim == 1 or n in ('pos_embed', 'cls_token', 'dist_token')
    if n in ('cls_token', 'pos_embed') or n.startswith('patch_embed'):
      layer = 0
    elif n.startswith('blocks.'):
      layer = int(n.split('.')[1]) + 1
    else:
      layer = depth + 1
    groups.setdefault((layer, no_decay), dict(
        params=[], weight_decay=0.0 if no_decay else weight_decay,
        lr_scale=layer_decay ** (depth + 1 - layer)))['params'].append(p)
  return list(groups.values())


def official_train(model, groups, loss_fn, batches, lrs, betas):
  """The reference loop: each iteration sets every group's lr (its lr_scale
  times `lrs[it]`), then forward, backward, torch AdamW step. Returns the
  losses and the final state dict (numpy)."""
  import torch  # pylint: disable=g-import-not-at-top
  opt = torch.optim.AdamW(groups, lr=0.0, betas=betas, eps=1e-8)
  model.train()
  losses = []
  for lr, batch in zip(lrs, batches, strict=True):
    for group in opt.param_groups:
      group['lr'] = lr * group.get('lr_scale', 1.0)
    loss = loss_fn(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad()
    losses.append(loss.item())
  return np.array(losses), {k: v.detach().numpy().copy()
                            for k, v in model.state_dict().items()}


def nchw(images_nhwc):
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())


def official_pretrain(state_dict, batches, noises, lrs, weight_decay):
  """HF ViTMAEForPreTraining (norm-pix loss) from `state_dict`, trained as
  main_pretrain.py: AdamW betas (0.9, 0.95), `noises[it]` its masking
  noise."""
  import torch  # pylint: disable=g-import-not-at-top
  model = hf_mae_from('tiny', state_dict)
  model.config.norm_pix_loss = True
  loss_fn = lambda m, b: m(pixel_values=nchw(b[0]),
                           noise=torch.from_numpy(b[1])).loss
  return official_train(model, pretrain_param_groups(model, weight_decay),
                        loss_fn, list(zip(batches, noises)), lrs, (0.9, 0.95))


def hf_vit_gap(name, num_classes, state_dict):
  """The MAE fine-tuning classifier on HF's ViTModel: no final norm, mean of
  the patch tokens, fc_norm, head; loading `state_dict` strictly."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  c = HF_CONFIGS[name]
  config = transformers.ViTConfig(
      **{k: c[k] for k in ('hidden_size', 'num_hidden_layers',
                           'num_attention_heads', 'intermediate_size',
                           'image_size', 'patch_size')}, layer_norm_eps=1e-6)

  class GapViT(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.vit = transformers.ViTModel(config, add_pooling_layer=False)
      self.vit.layernorm = torch.nn.Identity()
      self.fc_norm = torch.nn.LayerNorm(c['hidden_size'], eps=1e-6)
      self.head = torch.nn.Linear(c['hidden_size'], num_classes)

    def forward(self, pixels):
      tokens = self.vit(pixel_values=pixels).last_hidden_state
      return self.head(self.fc_norm(tokens[:, 1:].mean(dim=1)))

  model = GapViT()
  model.load_state_dict({k: torch.from_numpy(v) for k, v in
                         state_dict.items()}, strict=True)
  return model


def hf_vit_gap_state_dict(params, layout, image_size):
  """A mimjax 'gap' classifier's parameters -> hf_vit_gap's state dict, by
  mimjax's converter: the encoder in the HF `layout` (the learned position
  embedding where the layout keeps its fixed table), fc_norm and head in
  the official one. numpy only."""
  from mimjax import convert  # pylint: disable=g-import-not-at-top
  encoder = {k: v for k, v in params['encoder'].items() if k != 'pos_embed'}
  out, _ = convert.export_state_dict({'encoder': encoder}, layout, image_size)
  out['vit.embeddings.position_embeddings'] = np.asarray(
      params['encoder']['pos_embed'])
  top, _ = convert.export_state_dict(
      {k: params[k] for k in ('fc_norm', 'head')}, 'mae', image_size)
  return {**out, **top}


def official_finetune(state_dict, batches, lrs, num_classes, weight_decay,
                      layer_decay, label_smoothing):
  """hf_vit_gap from `state_dict`, trained as main_finetune.py without
  mixup, cutmix and drop path: layer-wise AdamW betas (0.9, 0.999), the
  label-smoothing cross-entropy."""
  import torch  # pylint: disable=g-import-not-at-top
  model = hf_vit_gap('tiny', num_classes, state_dict)

  def loss_fn(m, batch):
    logp = torch.log_softmax(m(nchw(batch['image'])), dim=-1)
    nll = -logp.gather(-1, torch.from_numpy(batch['label'])[:, None])[:, 0]
    smooth = -logp.mean(dim=-1)
    return ((1 - label_smoothing) * nll + label_smoothing * smooth).mean()
  groups = finetune_param_groups(model, weight_decay, layer_decay,
                                 HF_CONFIGS['tiny']['num_hidden_layers'])
  return official_train(model, groups, loss_fn, batches, lrs, (0.9, 0.999))
