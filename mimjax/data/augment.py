"""Image augmentations: TF ops on one host-side image, plus mixup/cutmix in JAX.

Every random TF op here is stateless and takes a `seed` tensor of shape [2],
so an augmented image is a pure function of (image, seed). Images are (H, W, C)
with values in [0, 255]; float32 unless said otherwise.

Why this module is long: RandAugment's fifteen ops are Pillow-exact ports
(timm applies them through Pillow), next to the crops, erasing and mixup
that share their stateless-seed convention.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import tensorflow as tf

from mimjax.views import IMAGENET_MEAN, IMAGENET_STD

MEAN_RGB, STD_RGB = IMAGENET_MEAN, IMAGENET_STD
# timm's `img_mean` hparam (create_transform): RandAugment's geometric fill.
FILL_RGB = tuple(min(255, round(255 * m)) for m in MEAN_RGB)  # (124, 116, 104)


def split_seed(seed, num: int):
  """`num` independent [2] seeds from one, as a (num, 2) tensor."""
  return tf.random.experimental.stateless_split(seed, num)


def _uniform(seed, shape=(), minval=0.0, maxval=1.0):
  return tf.random.stateless_uniform(shape, seed, minval, maxval, tf.float32)


def to_rgb(image):
  """Tiles a 1-channel image to 3 channels; leaves 3 channels as they are."""
  image = tf.convert_to_tensor(image)
  if image.shape[-1] == 1:
    return tf.tile(image, [1, 1, 3])
  return image


def resize(image, size, method='bicubic'):
  """Antialiased resize to `size` (int or (h, w)); float32 in [0, 255]."""
  size = (size, size) if isinstance(size, int) else size
  image = tf.image.resize(tf.cast(image, tf.float32), size, method,
                          antialias=True)
  return tf.clip_by_value(image, 0.0, 255.0)


def _crop_window(seed, height, width, scale, ratio, attempts=10):
  """torchvision's RandomResizedCrop window: (top, left, h, w) int32 scalars."""
  h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  s_area, s_ratio, s_top, s_left = tf.unstack(split_seed(seed, 4))
  area = h_f * w_f * _uniform(s_area, [attempts], scale[0], scale[1])
  log_r = _uniform(s_ratio, [attempts], math.log(ratio[0]), math.log(ratio[1]))
  aspect = tf.exp(log_r)
  ws = tf.round(tf.sqrt(area * aspect))
  hs = tf.round(tf.sqrt(area / aspect))
  ok = (ws > 0) & (ws <= w_f) & (hs > 0) & (hs <= h_f)
  first = tf.argmax(tf.cast(ok, tf.int32))  # First attempt that fits.

  # No attempt fits: the largest centred window with the ratio clamped.
  in_ratio = w_f / h_f
  fb_w = tf.where(in_ratio > ratio[1], tf.round(h_f * ratio[1]), w_f)
  fb_h = tf.where(in_ratio < ratio[0], tf.round(w_f / ratio[0]), h_f)
  any_ok = tf.reduce_any(ok)
  w = tf.cast(tf.where(any_ok, ws[first], fb_w), tf.int32)
  h = tf.cast(tf.where(any_ok, hs[first], fb_h), tf.int32)
  top_u = _uniform(s_top) * tf.cast(height - h + 1, tf.float32)
  left_u = _uniform(s_left) * tf.cast(width - w + 1, tf.float32)
  top = tf.where(any_ok, tf.cast(top_u, tf.int32), (height - h) // 2)
  left = tf.where(any_ok, tf.cast(left_u, tf.int32), (width - w) // 2)
  top = tf.minimum(top, height - h)  # Guards the uniform's upper edge.
  left = tf.minimum(left, width - w)
  return top, left, h, w


def random_resized_crop(image, seed, size, scale=(0.2, 1.0),
                        ratio=(3 / 4, 4 / 3), method='bicubic'):
  """torchvision RandomResizedCrop: a random window resized to size x size."""
  shape = tf.shape(image)
  top, left, h, w = _crop_window(seed, shape[0], shape[1], scale, ratio)
  crop = image[top:top + h, left:left + w]
  return resize(crop, size, method)


def flip(image, seed):
  """Flips left-right with probability 1/2."""
  return tf.image.stateless_random_flip_left_right(image, seed)


def center_crop_eval(image, size, crop_fraction=224 / 256, method='bicubic'):
  """Resizes the shorter side to size / crop_fraction, then crops the centre."""
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  short = tf.cast(math.floor(size / crop_fraction), tf.float32)
  scale = short / tf.minimum(h, w)
  # The shorter side lands exactly on `short`, the other side rounds.
  new_h = tf.cast(tf.where(h <= w, short, tf.round(h * scale)), tf.int32)
  new_w = tf.cast(tf.where(w < h, short, tf.round(w * scale)), tf.int32)
  image = resize(image, (new_h, new_w), method)
  top = (new_h - size) // 2
  left = (new_w - size) // 2
  return tf.reshape(image[top:top + size, left:left + size], [size, size, -1])


def normalize(image):
  """[0, 255] -> ImageNet mean/std normalised float32."""
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(MEAN_RGB)) / tf.constant(STD_RGB)


# RandAugment, after timm's `rand-m9-mstd0.5-inc1` with the hparams of MAE's
# fine-tuning (create_transform): every op is the PIL op timm calls, on uint8
# (H, W, 3), and takes an already-scaled argument. Geometric ops are bicubic
# and fill with FILL_RGB.


def _blend(degenerate, image, factor):
  """PIL Image.blend, as ImageEnhance uses it: degenerate + factor * (image -
  degenerate), clipped to [0, 255] and truncated."""
  degenerate = tf.cast(degenerate, tf.float32)
  out = degenerate + factor * (tf.cast(image, tf.float32) - degenerate)
  return tf.cast(tf.floor(tf.clip_by_value(out, 0, 255)), tf.uint8)


def _grey(image):
  """PIL's 'L' conversion (its fixed-point ITU-R 601-2 weights), kept as 3
  equal channels (float32)."""
  x = tf.cast(image, tf.int32)
  grey = (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471
          + 0x8000) // 65536
  return tf.tile(tf.cast(grey, tf.float32)[..., None], [1, 1, 3])


def autocontrast(image, _=None):
  """Stretches each channel to the full 0..255 range."""
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  lo = tf.where(hi > lo, lo, 0.0)
  out = tf.clip_by_value(tf.floor((x - lo) * scale), 0, 255)
  return tf.cast(out, tf.uint8)


def _equalize_channel(channel):
  hist = tf.math.bincount(tf.cast(channel, tf.int32), minlength=256,
                          maxlength=256)
  last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
  step = (tf.reduce_sum(hist) - last) // 255
  exclusive = tf.cumsum(hist, exclusive=True)
  lut = tf.clip_by_value((exclusive + step // 2) // tf.maximum(step, 1), 0, 255)
  out = tf.gather(lut, tf.cast(channel, tf.int32))
  return tf.cast(tf.where(step > 0, out, tf.cast(channel, tf.int32)), tf.uint8)


def equalize(image, _=None):
  """PIL ImageOps.equalize, per channel."""
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], -1)


def invert(image, _=None):
  """PIL ImageOps.invert: 255 - x."""
  return 255 - tf.cast(image, tf.uint8)


def solarize_add(image, addition, threshold=128):
  """timm solarize_add: adds `addition` to values below `threshold`, capped
  at 255; the others are kept."""
  x = tf.cast(image, tf.int32)
  added = tf.minimum(x + tf.cast(addition, tf.int32), 255)
  return tf.cast(tf.where(x < threshold, added, x), tf.uint8)


def solarize(image, threshold):
  """Inverts pixels at or above `threshold`."""
  x = tf.cast(image, tf.float32)
  return tf.cast(tf.where(x >= threshold, 255.0 - x, x), tf.uint8)


def posterize(image, bits):
  """Keeps the top `bits` bits of each value."""
  shift = tf.cast(8 - bits, tf.int32)
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(x, shift), shift),
                 tf.uint8)


def color(image, factor):
  """PIL ImageEnhance.Color (saturation)."""
  return _blend(_grey(image), image, factor)


def contrast(image, factor):
  """PIL ImageEnhance.Contrast: blends with the mean grey level."""
  mean = tf.floor(tf.reduce_mean(_grey(image)[..., 0]) + 0.5)
  return _blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image, factor):
  """PIL ImageEnhance.Brightness: blends with black."""
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """PIL ImageEnhance.Sharpness: blends with a 3x3 smoothing, border kept."""
  x = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], 'VALID')[0]
  smooth = tf.round(smooth)
  # PIL leaves the one-pixel border unfiltered.
  inner = tf.ones_like(smooth)
  mask = tf.pad(inner, [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  degenerate = mask * degenerate + (1 - mask) * x[0]
  return _blend(degenerate, image, factor)


def _cubic(v1, v2, v3, v4, d):
  """PIL's transform bicubic (cubic convolution, a = -1) between v2 and v3 at
  fraction `d` (float64), in PIL's own order of operations. Integer taps give
  exact integer coefficients, so they may come as int32."""
  p2 = -v1 + v3
  p3 = 2 * (v1 - v2) + v3 - v4
  p4 = -v1 + v2 - v3 + v4
  p1, p2, p3, p4 = (tf.cast(p, tf.float64) for p in (v2, p2, p3, p4))
  return p1 + d * (p2 + d * (p3 + d * p4))


def _transform(image, coeffs, fill=FILL_RGB):
  """PIL's `Image.transform(size, AFFINE, coeffs, BICUBIC, fillcolor=fill)`.

  `coeffs` (a, b, c, d, e, f) map an output pixel centre (x, y) = (col + 0.5,
  row + 0.5) to the input point (a x + b y + c, d x + e y + f), in PIL's
  continuous coordinates (pixel i spans [i, i + 1)). Points outside the input
  take `fill`; the others are bicubic over 4 x 4 taps with edge pixels
  repeated, clipped to [0, 255] and truncated to uint8, all as PIL does.
  """
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  a, b, c, d, e, f = tf.unstack(tf.cast(coeffs, tf.float64))
  ys, xs = tf.meshgrid(tf.range(h, dtype=tf.float64) + 0.5,
                       tf.range(w, dtype=tf.float64) + 0.5, indexing='ij')
  x_in = a * xs + b * ys + c
  y_in = d * xs + e * ys + f
  outside = ((x_in < 0) | (x_in >= tf.cast(w, tf.float64)) |
             (y_in < 0) | (y_in >= tf.cast(h, tf.float64)))
  # Pixel centres sit at i + 0.5: interpolate between floor(p - 0.5) + k.
  x0, y0 = tf.floor(x_in - 0.5), tf.floor(y_in - 0.5)
  dx, dy = (x_in - 0.5 - x0)[..., None], (y_in - 0.5 - y0)[..., None]
  taps = tf.range(-1, 3)
  cols = tf.clip_by_value(tf.cast(x0, tf.int32)[..., None] + taps, 0, w - 1)
  rows = tf.clip_by_value(tf.cast(y0, tf.int32)[..., None] + taps, 0, h - 1)
  pixels = tf.reshape(image, [h * w, -1])
  # (H, W, 4 rows, 4 cols, C): along x within each row, then along y.
  grid = tf.cast(tf.gather(pixels, rows[..., :, None] * w + cols[..., None, :]),
                 tf.int32)
  along_x = _cubic(*tf.unstack(grid, axis=3), dx[..., None])
  out = _cubic(*tf.unstack(along_x, axis=2), dy)
  out = tf.floor(tf.clip_by_value(out, 0.0, 255.0))
  out = tf.where(outside[..., None], tf.constant(fill, tf.float64), out)
  return tf.cast(out, tf.uint8)


def _affine(image, a, b, c, d, e, f):
  return _transform(image, tf.stack([tf.cast(v, tf.float64)
                                     for v in (a, b, c, d, e, f)]))


def rotate(image, degrees):
  """PIL `Image.rotate(degrees)`: counter-clockwise about the centre."""
  cx = tf.cast(tf.shape(image)[1], tf.float64) / 2
  cy = tf.cast(tf.shape(image)[0], tf.float64) / 2
  t = -tf.cast(degrees, tf.float64) * math.pi / 180
  cos, sin = tf.cos(t), tf.sin(t)
  # input = R(t) (output - centre) + centre, summed in PIL's order.
  return _affine(image, cos, sin, cos * -cx + sin * -cy + cx,
                 -sin, cos, -sin * -cx + cos * -cy + cy)


def shear_x(image, level):
  return _affine(image, 1.0, level, 0.0, 0.0, 1.0, 0.0)


def shear_y(image, level):
  return _affine(image, 1.0, 0.0, 0.0, level, 1.0, 0.0)


def translate_x(image, fraction):
  """Shifts by `fraction` of the width (PIL sign convention)."""
  pixels = tf.cast(fraction, tf.float64) * tf.cast(tf.shape(image)[1],
                                                 tf.float64)
  return _affine(image, 1.0, 0.0, pixels, 0.0, 1.0, 0.0)


def translate_y(image, fraction):
  """Shifts by `fraction` of the height (PIL sign convention)."""
  pixels = tf.cast(fraction, tf.float64) * tf.cast(tf.shape(image)[0],
                                                 tf.float64)
  return _affine(image, 1.0, 0.0, 0.0, 0.0, 1.0, pixels)


def _signed(value, sign):
  return tf.where(sign, -value, value)


def _enhance_arg(m, sign):
  return tf.maximum(0.1, 1.0 + _signed(m / 10 * 0.9, sign))


# timm's _RAND_INCREASING_TRANSFORMS ('inc1'), in its order: (timm name, op,
# magnitude in [0, 10] and random sign -> op argument) with timm's level
# functions; translate is relative to the image size (max 0.45).
RAND_AUGMENT_OPS = (
    ('AutoContrast', autocontrast, lambda m, s: m),
    ('Equalize', equalize, lambda m, s: m),
    ('Invert', invert, lambda m, s: m),
    ('Rotate', rotate, lambda m, s: _signed(m / 10 * 30.0, s)),
    ('PosterizeIncreasing', posterize,
     lambda m, s: 4 - tf.cast(m / 10 * 4, tf.int32)),
    ('SolarizeIncreasing', solarize,
     lambda m, s: 256.0 - tf.floor(m / 10 * 256.0)),
    ('SolarizeAdd', solarize_add,
     lambda m, s: tf.minimum(128, tf.cast(m / 10 * 110, tf.int32))),
    ('ColorIncreasing', color, _enhance_arg),
    ('ContrastIncreasing', contrast, _enhance_arg),
    ('BrightnessIncreasing', brightness, _enhance_arg),
    ('SharpnessIncreasing', sharpness, _enhance_arg),
    ('ShearX', shear_x, lambda m, s: _signed(m / 10 * 0.3, s)),
    ('ShearY', shear_y, lambda m, s: _signed(m / 10 * 0.3, s)),
    ('TranslateXRel', translate_x, lambda m, s: _signed(m / 10 * 0.45, s)),
    ('TranslateYRel', translate_y, lambda m, s: _signed(m / 10 * 0.45, s)),
)


def _apply_op(image, index, magnitude, sign):
  branches = []
  for _, op, level_fn in RAND_AUGMENT_OPS:
    branches.append(lambda op=op, fn=level_fn: op(image, fn(magnitude, sign)))
  return tf.switch_case(index, branches)


def rand_augment(image, seed, num_layers=2, magnitude=9, magnitude_std=0.5,
                 prob=0.5):
  """timm RandAugment ('rand-m9-mstd0.5-inc1' by default): `num_layers` ops
  drawn with replacement from RAND_AUGMENT_OPS, each applied with probability
  `prob` at a magnitude ~ N(magnitude, magnitude_std) clipped to [0, 10]."""
  dtype = image.dtype
  x = tf.cast(tf.clip_by_value(tf.round(tf.cast(image, tf.float32)), 0, 255),
              tf.uint8)
  x = to_rgb(x)
  for layer_seed in tf.unstack(split_seed(seed, num_layers)):
    s_op, s_apply, s_mag, s_sign = tf.unstack(split_seed(layer_seed, 4))
    index = tf.random.stateless_uniform([], s_op, 0, len(RAND_AUGMENT_OPS),
                                        tf.int32)
    m = magnitude + magnitude_std * tf.random.stateless_normal([], s_mag)
    m = tf.clip_by_value(m, 0.0, 10.0)
    sign = _uniform(s_sign) < 0.5
    y = _apply_op(x, index, m, sign)
    x = tf.where(_uniform(s_apply) < prob, y, x)
  return tf.cast(x, dtype)


def random_erasing(image, seed, prob=0.25, area=(0.02, 1 / 3),
                   log_ratio=(math.log(0.3), math.log(1 / 0.3)), attempts=10):
  """timm RandomErasing, 'pixel' mode, on a normalised (H, W, C) image: with
  probability `prob` one rectangle is replaced by standard normal noise."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  seeds = tf.unstack(split_seed(seed, 6))
  s_do, s_area, s_ratio, s_top, s_left, s_noise = seeds
  target = h_f * w_f * _uniform(s_area, [attempts], area[0], area[1])
  aspect = tf.exp(_uniform(s_ratio, [attempts], log_ratio[0], log_ratio[1]))
  hs = tf.round(tf.sqrt(target * aspect))
  ws = tf.round(tf.sqrt(target / aspect))
  ok = (ws < w_f) & (hs < h_f)
  first = tf.argmax(tf.cast(ok, tf.int32))
  h = tf.cast(hs[first], tf.int32)
  w = tf.cast(ws[first], tf.int32)
  top = tf.cast(_uniform(s_top) * tf.cast(height - h + 1, tf.float32),
                tf.int32)
  left = tf.cast(_uniform(s_left) * tf.cast(width - w + 1, tf.float32),
                 tf.int32)
  rows = tf.range(height)[:, None, None]
  cols = tf.range(width)[None, :, None]
  inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
  erase = inside & tf.reduce_any(ok) & (_uniform(s_do) < prob)
  noise = tf.random.stateless_normal(shape, s_noise, dtype=image.dtype)
  return tf.where(erase, noise, image)


def mixup_cutmix(rng, images, labels_onehot, mixup_alpha=0.8, cutmix_alpha=1.0,
                 switch_prob=0.5, label_smoothing=0.1):
  """timm Mixup in 'batch' mode: one lambda per batch, each row mixed with the
  row at the mirrored position. images (B, H, W, C) -> (images, soft labels)."""
  num_classes = labels_onehot.shape[-1]
  off = label_smoothing / num_classes
  labels = labels_onehot * (1.0 - label_smoothing) + off
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, labels
  k_switch, k_lam, k_y, k_x = jax.random.split(rng, 4)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  # lam ~ Beta(alpha, alpha) = g0 / (g0 + g1), g ~ Gamma(alpha): one draw of
  # both gammas, from the chosen alpha (each draw is a rejection loop).
  alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
  log_g = jax.random.loggamma(k_lam, jnp.full((2,), alpha))
  lam = jax.nn.sigmoid(log_g[0] - log_g[1])

  height, width = images.shape[1], images.shape[2]
  cut = jnp.sqrt(1.0 - lam)
  cut_h = (cut * height).astype(jnp.int32)
  cut_w = (cut * width).astype(jnp.int32)
  cy = jax.random.randint(k_y, (), 0, height)
  cx = jax.random.randint(k_x, (), 0, width)
  y0 = jnp.clip(cy - cut_h // 2, 0, height)
  y1 = jnp.clip(cy + cut_h // 2, 0, height)
  x0 = jnp.clip(cx - cut_w // 2, 0, width)
  x1 = jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  # timm's correct_lam: lambda is the area actually kept.
  box_lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)

  flipped = images[::-1]
  cutmixed = jnp.where(box[None, :, :, None], flipped, images)
  mixed = lam * images + (1.0 - lam) * flipped
  images = jnp.where(use_cutmix, cutmixed, mixed.astype(images.dtype))
  lam = jnp.where(use_cutmix, box_lam, lam)
  return images, lam * labels + (1.0 - lam) * labels[::-1]
