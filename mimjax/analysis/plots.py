"""The analyses' figures: occlusion invariance per block, CKA heatmaps."""

from __future__ import annotations

import numpy as np

from mimjax.analysis import visualize


def plot_invariance(path: str, results: dict, mask_ratio: float,
                    examples: int):
  """Occlusion invariance per block: CKA and centred cosine between
  complementary views, one panel each."""
  plt = visualize.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8))
  panels = (('invariance_cka', 'CKA between complementary views'),
            ('invariance_cosine_centred', 'mean centred cosine'))
  for ax, (key, label) in zip(axes, panels):
    low = 0.0
    for name, r in results.items():
      values = r[key]
      low = min(low, min(values))
      ax.plot(range(1, len(values) + 1), values, marker='o', label=name)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel('block')
    ax.set_ylabel(label)
    ax.set_ylim(low - 0.02 if low < 0 else 0, 1.02)
  axes[1].legend(fontsize=8, loc='center left', bbox_to_anchor=(1.02, 0.5))
  fig.suptitle(f'Occlusion invariance ({examples} images, mask ratio '
               f'{mask_ratio})', fontsize=10)
  fig.tight_layout()
  visualize.write_figure(fig, path, dpi=120)


def plot_cka(path: str, matrix: np.ndarray, name_a: str, name_b: str):
  """Block-by-block CKA heatmap between two encoders."""
  plt = visualize.pyplot()
  fig, ax = plt.subplots(figsize=(4.4, 3.8))
  rows, cols = matrix.shape
  image = ax.imshow(matrix, origin='lower', vmin=0, vmax=1, cmap='magma',
                    extent=(0.5, cols + 0.5, 0.5, rows + 0.5))
  ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
  ax.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
  ax.set_xlabel(f'{name_b}: block')
  ax.set_ylabel(f'{name_a}: block')
  ax.set_title(f'CKA, {name_a} vs {name_b}', fontsize=9)
  fig.colorbar(image, ax=ax)
  fig.tight_layout()
  visualize.write_figure(fig, path, dpi=120)


def plot_cka_overview(path: str, names: list[str],
                      pairs: dict[tuple[str, str], np.ndarray]):
  """All pairs on one page: left, a lower-triangular grid of small
  block-by-block CKA heatmaps (row: an encoder's blocks on y, column: the
  other's on x); right, the encoder x encoder matrix of last-block CKA."""
  plt = visualize.pyplot()
  n = len(names)
  side = max(2.6, (1.25 if n <= 4 else 1.05) * (n - 1))  # the grid, inches
  mat = max(2.6, 0.62 * n)  # the last-block matrix
  gap = 0.5 + 0.075 * max(len(name) for name in names)  # its names
  widths = (side, gap, mat, 0.35, 0.15)  # ..., space, colorbar
  fig = plt.figure(figsize=(sum(widths) + 0.9, side + 1.3))
  outer = fig.add_gridspec(1, 5, width_ratios=widths, wspace=0.0,
                           left=0.6 / (sum(widths) + 0.9), right=0.93,
                           bottom=0.8 / (side + 1.3), top=0.88)
  grid = outer[0].subgridspec(n - 1, n - 1, wspace=0.12, hspace=0.12)
  image = None
  for i in range(1, n):
    for j in range(n - 1):
      if j >= i:
        continue
      ax = fig.add_subplot(grid[i - 1, j])
      matrix = np.asarray(pairs[(names[j], names[i])]).T  # y: i, x: j
      rows, cols = matrix.shape
      image = ax.imshow(matrix, origin='lower', vmin=0, vmax=1, cmap='magma',
                        extent=(0.5, cols + 0.5, 0.5, rows + 0.5),
                        aspect='auto')
      ax.set_xticks([1, cols])
      ax.set_yticks([1, rows])
      ax.tick_params(labelsize=6, length=2, pad=1)
      if i < n - 1:
        ax.set_xticklabels([])
      else:
        ax.set_xlabel(names[j], fontsize=8)
      if j > 0:
        ax.set_yticklabels([])
      else:
        ax.set_ylabel(names[i], fontsize=8)
  fig.suptitle('Left: CKA block by block (up: the row encoder\'s blocks, '
               'across: the column encoder\'s).\nRight: CKA of the last '
               'blocks.', fontsize=9)
  fig.colorbar(image, cax=fig.add_subplot(outer[4]))
  last = np.eye(n)
  for (a, b), matrix in pairs.items():
    i, j = names.index(a), names.index(b)
    last[i, j] = last[j, i] = np.asarray(matrix)[-1, -1]
  ax = fig.add_subplot(outer[2])
  ax.imshow(last, aspect='equal', vmin=0, vmax=1, cmap='magma')
  for i in range(n):
    for j in range(n):
      ax.text(j, i, f'{last[i, j]:.2f}', ha='center', va='center',
              fontsize=7 if n > 5 else 8,
              color='black' if last[i, j] > 0.6 else 'white')
  ax.set_xticks(range(n))
  ax.set_yticks(range(n))
  ax.set_xticklabels(names, rotation=45, ha='right', fontsize=8)
  ax.set_yticklabels(names, fontsize=8)
  visualize.write_figure(fig, path, dpi=120)
