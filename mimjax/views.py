"""View transforms: the image each view of a sample is made from.

Every view function has one signature::

    view_fn(rng: PRNGKey, images: (B, H, W, C)) -> tuple[View, ...]

and runs on device, per sample, under jit. A view function composes with a
mask function in `mim.MIM`: the views are drawn first, then each is masked.
`None` (the default of `MIM`) is the identity: every mask sees the batch as
it is, which is MAE. `crops` gives each view its own random-resized crop,
flip and colour jitter (SimCLR / MoCo v3 style), so that two crops plus
`masking.none` is a SimCLR-like transform and two crops plus
`masking.independent` is crop + mask.

Images arrive ImageNet mean/std normalised (what `mimjax.data` yields);
colour jitter works on [0, 1] pixels in between.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from mimjax import errors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@flax.struct.dataclass
class View:
  """One view of the batch: `images` (B, H, W, C); `boxes` (B, 4) the
  source region it shows as [top, left, bottom, right] fractions of the
  source image; `flipped` (B,) whether it is mirrored. `aligned`: patch i of
  this view is patch i of the source image (no crop, no flip)."""
  images: jax.Array
  boxes: jax.Array
  flipped: jax.Array
  aligned: bool = flax.struct.field(pytree_node=False, default=True)


ViewFn = Callable[[jax.Array, jax.Array], tuple[View, ...]]


def identity_view(images: jax.Array) -> View:
  """The batch itself, as one aligned view."""
  b = images.shape[0]
  boxes = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0, 1.0]), (b, 4))
  return View(images, boxes, jnp.zeros((b,), bool), aligned=True)


# ------------------------------------------------------------------ crops


def crop_box(rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10):
  """torchvision's RandomResizedCrop window on a unit square, as
  [top, left, bottom, right] fractions: area fraction ~ U(scale), log aspect
  ~ U(log ratio), the first of `attempts` draws that fits, else the whole
  image with the ratio clamped (a centred box)."""
  k_area, k_ratio, k_top, k_left = jax.random.split(rng, 4)
  area = jax.random.uniform(k_area, (attempts,), minval=scale[0],
                            maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(k_ratio, (attempts,),
                                      minval=math.log(ratio[0]),
                                      maxval=math.log(ratio[1])))
  w = jnp.sqrt(area * aspect)
  h = jnp.sqrt(area / aspect)
  fits = (w <= 1.0) & (h <= 1.0)
  first = jnp.argmax(fits)
  ok = fits[first]
  h = jnp.where(ok, h[first], 1.0)
  w = jnp.where(ok, w[first], 1.0)
  top = jax.random.uniform(k_top) * (1.0 - h)
  left = jax.random.uniform(k_left) * (1.0 - w)
  return jnp.stack([top, left, top + h, left + w])


def resized_crop(image, box, method: str = 'bilinear'):
  """The `box` region of `image` (H, W, C) resized back to (H, W)."""
  height, width = image.shape[:2]
  top, left, bottom, right = box[0], box[1], box[2], box[3]
  scale = jnp.stack([1.0 / (bottom - top), 1.0 / (right - left)])
  translation = -jnp.stack([top * height, left * width]) * scale
  return jax.image.scale_and_translate(
      image, image.shape, (0, 1), scale, translation, method, antialias=True)


def _grey(rgb):
  return rgb @ jnp.array([0.299, 0.587, 0.114], rgb.dtype)


def _blend(image, other, factor):
  return jnp.clip(other + factor * (image - other), 0.0, 1.0)


def _rgb_to_hsv(rgb):
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  value = rgb.max(-1)
  chroma = value - rgb.min(-1)
  safe = jnp.where(chroma > 0, chroma, 1.0)
  hue = jnp.where(value == r, ((g - b) / safe) % 6.0,
                  jnp.where(value == g, (b - r) / safe + 2.0,
                            (r - g) / safe + 4.0))
  hue = jnp.where(chroma > 0, hue / 6.0, 0.0)
  saturation = jnp.where(value > 0, chroma / jnp.where(value > 0, value, 1.0),
                         0.0)
  return jnp.stack([hue, saturation, value], -1)


def _hsv_to_rgb(hsv):
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  k = (jnp.array([5.0, 3.0, 1.0]) + h[..., None] * 6.0) % 6.0
  return v[..., None] - (v * s)[..., None] * jnp.clip(
      jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def colour_jitter(rng, image, brightness=0.4, contrast=0.4, saturation=0.2,
                  hue=0.1):
  """torchvision's ColorJitter on [0, 1] pixels, in a fixed order
  (brightness, contrast, saturation, hue) rather than a random one."""
  kb, kc, ks, kh = jax.random.split(rng, 4)
  factor = lambda k, s: jax.random.uniform(k, minval=1 - s, maxval=1 + s)
  image = jnp.clip(image * factor(kb, brightness), 0.0, 1.0)
  image = _blend(image, jnp.mean(_grey(image)), factor(kc, contrast))
  image = _blend(image, _grey(image)[..., None], factor(ks, saturation))
  hsv = _rgb_to_hsv(image)
  shift = jax.random.uniform(kh, minval=-hue, maxval=hue)
  hsv = hsv.at[..., 0].set((hsv[..., 0] + shift) % 1.0)
  return _hsv_to_rgb(hsv)


def crops(num_views: int = 2, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
          flip: bool = True, jitter_prob: float = 0.8,
          brightness: float = 0.4, contrast: float = 0.4,
          saturation: float = 0.2, hue: float = 0.1,
          grayscale_prob: float = 0.2) -> ViewFn:
  """`num_views` independent random-resized crops (same size as the input),
  horizontal flips and colour jitter of each image: the SimCLR / MoCo v3
  transform (torchvision ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8,
  RandomGrayscale p=0.2). `scale=(1, 1)` and `flip=False` give colour-only
  views whose patches stay aligned with the source."""
  aligned = tuple(scale) == (1.0, 1.0) and not flip
  mean = jnp.array(IMAGENET_MEAN)
  std = jnp.array(IMAGENET_STD)

  def one(rng, image):
    k_box, k_flip, k_jit, k_pj, k_grey = jax.random.split(rng, 5)
    box = (jnp.array([0.0, 0.0, 1.0, 1.0]) if aligned else
           crop_box(k_box, scale, ratio))
    pixels = jnp.clip(image * std + mean, 0.0, 1.0)
    if not aligned:
      pixels = resized_crop(pixels, box)
    flipped = jax.random.bernoulli(k_flip, 0.5) & flip
    pixels = jnp.where(flipped, pixels[:, ::-1], pixels)
    jittered = colour_jitter(k_jit, pixels, brightness, contrast, saturation,
                             hue)
    pixels = jnp.where(jax.random.bernoulli(k_pj, jitter_prob), jittered,
                       pixels)
    grey = jnp.broadcast_to(_grey(pixels)[..., None], pixels.shape)
    pixels = jnp.where(jax.random.bernoulli(k_grey, grayscale_prob), grey,
                       pixels)
    return (pixels - mean) / std, box, flipped

  def view_fn(rng, images):
    out = []
    for key in jax.random.split(rng, num_views):
      keys = jax.random.split(key, images.shape[0])
      imgs, boxes, flipped = jax.vmap(one)(keys, images)
      out.append(View(imgs.astype(images.dtype), boxes, flipped, aligned))
    return tuple(out)
  view_fn.num_views, view_fn.aligned = num_views, aligned
  return view_fn


def layout(view_fn: ViewFn | None) -> tuple[int, bool]:
  """(how many views `view_fn` gives, whether they are aligned); a view
  function without these attributes counts as one aligned view."""
  return (getattr(view_fn, 'num_views', 1), getattr(view_fn, 'aligned', True))


REGISTRY = {'crops': crops}


def get(name: str, **kwargs) -> ViewFn | None:
  """A view function by name ('identity' is None: the batch as it is)."""
  if name == 'identity':
    if kwargs:
      raise errors.Invalid(f'identity views take no knobs, got '
                           f'{sorted(kwargs)}')
    return None
  if name not in REGISTRY:
    raise errors.Invalid(f'unknown view transform {name!r}; known: '
                         f"{['identity', *sorted(REGISTRY)]}")
  return REGISTRY[name](**kwargs)
