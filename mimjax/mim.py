"""The MIM machine: encoder + decoder + mask function + loss function.

MAE, its siamese form, R-MAE, C-MAE and a researcher's own objective differ
only in the `mask_fn` and `loss_fn` handed to `MIM`. The module draws the
views, encodes each one (visible patches only) and calls::

    loss_fn(ctx: MIMContext) -> (scalar loss, dict of auxiliaries)

The loss function runs inside the module, so it may decode (`ctx.decode`),
call the decoder with other parameters (`ctx.decoder_apply`) and create its
own Flax submodules (projectors, predictors), whose parameters are trained
with the rest.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mimjax import masking
from mimjax.models import decoder as decoder_lib
from mimjax.models import vit


@dataclasses.dataclass
class MIMContext:
  """What a loss function sees: the batch, its views and their encodings."""
  module: 'MIM'
  images: jax.Array        # (B, H, W, C)
  patches: jax.Array       # P(x): (B, L, p*p*C)
  masks: tuple[masking.Mask, ...]
  latents: tuple[jax.Array, ...]  # per view: encoder tokens (B, 1 + K, D)
  grid: tuple[int, int]
  train: bool
  _decoders: dict = dataclasses.field(default_factory=dict)

  def targets(self, norm_pix: bool = True) -> jax.Array:
    """t(P(x)): the patches, optionally normalised per patch (norm-pix)."""
    return pixel_targets(self.patches, norm_pix)

  def decode(self, latent, mask: masking.Mask, decoder: str = 'decoder'):
    """d_φ(latent): (B, L, out_dim). `decoder` names a parameter set: 'decoder'
    is φ; any other name is a second decoder of the same shape (e.g. φ')."""
    return self._decoder(decoder)(latent, mask.ids_restore, self.grid,
                                  train=self.train)

  def decoder_params(self, decoder: str = 'decoder'):
    """The current parameters of a decoder (it must have been called once)."""
    return self.module.variables['params'][decoder]

  def decoder_apply(self, params, latent, mask: masking.Mask):
    """The decoder as a pure function of explicit parameters."""
    return self.module.decoder.clone(parent=None).apply(
        {'params': params}, latent, mask.ids_restore, self.grid, train=False)

  def rng(self, name: str = 'mask') -> jax.Array:
    return self.module.make_rng(name)

  def _decoder(self, name):
    if name == 'decoder':
      return self.module.decoder
    if name not in self._decoders:
      self._decoders[name] = self.module.decoder.clone(parent=self.module,
                                                       name=name)
    return self._decoders[name]


LossFn = Callable[[MIMContext], tuple[jax.Array, dict[str, Any]]]


def pixel_targets(patches: jax.Array, norm_pix: bool) -> jax.Array:
  if not norm_pix:
    return patches
  mean = patches.mean(axis=-1, keepdims=True)
  var = patches.var(axis=-1, keepdims=True, ddof=1)  # unbiased, as the reference
  return (patches - mean) / jnp.sqrt(var + 1e-6)


class MIM(nn.Module):
  """Masked image model: returns (loss, aux) for a batch of images.

  aux holds what the loss function returned plus 'masks' and 'latents'.
  RNG streams: 'mask' (views), 'dropout' (drop path, when training).
  """
  encoder: vit.Encoder
  decoder: decoder_lib.Decoder
  mask_fn: masking.MaskFn
  loss_fn: LossFn

  @nn.compact
  def __call__(self, images, *, train: bool = False,
               masks: tuple[masking.Mask, ...] | None = None):
    grid = self.encoder.grid(images)
    if masks is None:
      masks = self.mask_fn(self.make_rng('mask'), images.shape[0],
                           grid[0] * grid[1])
    if isinstance(masks, masking.Mask):
      masks = (masks,)
    latents = tuple(self.encoder(images, m.ids_keep, train=train)['tokens']
                    for m in masks)
    ctx = MIMContext(self, images, vit.patchify(images, self.encoder.patch_size),
                     tuple(masks), latents, grid, train)
    loss, aux = self.loss_fn(ctx)
    return loss, {**aux, 'masks': tuple(masks), 'latents': latents}


def build(encoder: vit.Encoder, mask_fn: masking.MaskFn, loss_fn: LossFn,
          decoder: decoder_lib.Decoder | None = None, channels: int = 3,
          **decoder_kwargs) -> MIM:
  """A MIM with a pixel-head decoder (p*p*C outputs) unless one is given."""
  if decoder is None:
    decoder = decoder_lib.Decoder(
        out_dim=encoder.patch_size**2 * channels, **decoder_kwargs)
  return MIM(encoder, decoder, mask_fn, loss_fn)
