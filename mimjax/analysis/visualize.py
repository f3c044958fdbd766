"""Pictures a person would rather look at: reconstruction grids as PNGs."""

from __future__ import annotations

import io

from etils import epath
import numpy as np

from mimjax.models import vit
from mimjax.views import IMAGENET_MEAN, IMAGENET_STD

MEAN = np.array(IMAGENET_MEAN, np.float32)
STD = np.array(IMAGENET_STD, np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """ImageNet-normalised images -> uint8 RGB."""
  return np.clip((images * STD + MEAN) * 255, 0, 255).round().astype(np.uint8)


def reconstruction_grid(images, pred, mask, patch_size: int,
                        norm_pix: bool) -> np.ndarray:
  """Rows of original | masked | prediction | prediction + visible (uint8).

  A norm-pix prediction is shown in pixel space by undoing the per-patch
  normalisation with the statistics of the true patch, as the MAE demo does.
  """
  b, h, w, c = images.shape
  grid = (h // patch_size, w // patch_size)
  patches = np.asarray(vit.patchify(images, patch_size))
  if norm_pix:
    mean = patches.mean(-1, keepdims=True)
    var = patches.var(-1, keepdims=True, ddof=1)
    pred = pred * np.sqrt(var + 1e-6) + mean
  hidden = mask[..., None]
  unpatch = lambda x: np.asarray(vit.unpatchify(x, patch_size, grid, c))
  panels = [images, unpatch(patches * (1 - hidden)), unpatch(pred),
            unpatch(patches * (1 - hidden) + pred * hidden)]
  rows = [np.concatenate([to_uint8(p[i]) for p in panels], axis=1)
          for i in range(b)]
  return np.concatenate(rows, axis=0)


def pyplot():
  """matplotlib.pyplot on the file-only backend (imported on first use)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def write_figure(fig, path: str, **savefig_kwargs):
  """Saves a figure as a PNG at a local or gs:// path, then closes it."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', **savefig_kwargs)
  pyplot().close(fig)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())


def save_png(path: str, image: np.ndarray, title: str = ''):
  """Writes an image (H, W, 3 uint8) with a title as a PNG via matplotlib."""
  plt = pyplot()
  height, width = image.shape[:2]
  scale = max(1.0, 256 / width)
  fig = plt.figure(figsize=(width * scale / 100 + 0.2,
                            height * scale / 100 + 0.5), dpi=100)
  plt.imshow(image, interpolation='nearest')
  plt.axis('off')
  if title:
    plt.title(title, fontsize=8)
  write_figure(fig, path, bbox_inches='tight')
