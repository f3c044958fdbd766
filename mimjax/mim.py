"""The MIM machine: encoder + decoder + view, mask and loss functions.

MAE, its siamese form, R-MAE, C-MAE, a SimCLR-like baseline and a
researcher's own objective differ only in the `view_fn`, `mask_fn` and
`loss_fn` handed to `MIM`. The module draws the views (`view_fn`: crops,
colour; None: the batch as it is), masks them (`mask_fn`: one mask per
view, or several masks of one view), encodes each masked view (visible
patches only) and calls::

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

from mimjax import errors
from mimjax import masking
from mimjax import views as views_lib
from mimjax.models import decoder as decoder_lib
from mimjax.models import vit


@dataclasses.dataclass
class MIMContext:
  """What a loss function sees: the batch, its views and their encodings."""
  module: 'MIM'
  images: jax.Array        # (B, H, W, C), the batch before any view transform
  patches: jax.Array       # P(x): (B, L, p*p*C)
  masks: tuple[masking.Mask, ...]
  latents: tuple[jax.Array, ...]  # per view: encoder tokens (B, 1 + K, D)
  grid: tuple[int, int]
  train: bool
  views: tuple[views_lib.View, ...] = ()  # per view: the image it masks
  _decoders: dict = dataclasses.field(default_factory=dict)

  def targets(self, norm_pix: bool = True, view: int = 0) -> jax.Array:
    """t(P(x_v)): view `view`'s patches, optionally normalised per patch
    (norm-pix). Without a view transform every view's image is x."""
    patches = (self.patches if not self.views else
               vit.patchify(self.views[view].images,
                            self.module.encoder.patch_size))
    return pixel_targets(patches, norm_pix)

  @property
  def aligned(self) -> bool:
    """Patch i is the same region of the image in every view."""
    return all(v.aligned for v in self.views)

  def require_aligned(self, name: str):
    """Raises for position-wise objectives on views that are crops."""
    if not self.aligned:
      raise errors.Invalid(
          f'{name} compares the views patch by patch, but the views are '
          'crops whose patch positions do not correspond; use an '
          "image-level objective (cmae level='image', simsiam) or views "
          "without crops or flips")

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
  RNG streams: 'mask' (views and masks), 'dropout' (drop path, when
  training). Views pair with masks one to one, or one view is shared by all
  masks (the identity: MAE, complementary or independent masks).
  """
  encoder: vit.Encoder
  decoder: decoder_lib.Decoder
  mask_fn: masking.MaskFn
  loss_fn: LossFn
  view_fn: views_lib.ViewFn | None = None

  @nn.compact
  def __call__(self, images, *, train: bool = False,
               masks: tuple[masking.Mask, ...] | None = None):
    grid = self.encoder.grid(images)
    rng = self.make_rng('mask') if masks is None or self.view_fn else None
    if masks is None:
      masks = self.mask_fn(rng, images.shape[0], grid[0] * grid[1])
    if isinstance(masks, masking.Mask):
      masks = (masks,)
    masks = tuple(masks)
    if self.view_fn is None:
      views = (views_lib.identity_view(images),) * len(masks)
    else:
      views = pair_views(self.view_fn(jax.random.fold_in(rng, 1), images),
                         len(masks))
    latents = tuple(self.encoder(v.images, m.ids_keep, train=train)['tokens']
                    for v, m in zip(views, masks))
    ctx = MIMContext(self, images, vit.patchify(images, self.encoder.patch_size),
                     masks, latents, grid, train,
                     views if self.view_fn else ())
    loss, aux = self.loss_fn(ctx)
    return loss, {**aux, 'masks': masks, 'latents': latents}


def pair_views(views: tuple, num_masks: int) -> tuple:
  """One view per mask: views and masks one to one, or one shared view."""
  if len(views) == num_masks:
    return tuple(views)
  if len(views) == 1:
    return tuple(views) * num_masks
  raise errors.Invalid(f'the view function gave {len(views)} views and the '
                       f'mask function {num_masks} masks; give one mask per '
                       f'view (masking.independent, masking.none) or one view')


def build(encoder: vit.Encoder, mask_fn: masking.MaskFn, loss_fn: LossFn,
          decoder: decoder_lib.Decoder | None = None, channels: int = 3,
          view_fn: views_lib.ViewFn | None = None, **decoder_kwargs) -> MIM:
  """A MIM with a pixel-head decoder (p*p*C outputs) unless one is given."""
  if decoder is None:
    decoder = decoder_lib.Decoder(
        out_dim=encoder.patch_size**2 * channels, **decoder_kwargs)
  return MIM(encoder, decoder, mask_fn, loss_fn, view_fn)
