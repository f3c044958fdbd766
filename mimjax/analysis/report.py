"""The paper's analyses of trained encoders, written as JSON and PNGs.

For each encoder (a checkpoint, or 'random' for a random initialisation) and
the first `analyze.examples` images of the eval split:

- occlusion invariance per block: linear CKA and mean cosine between the
  image features of two complementary masked views (each sees what the other
  hides; ratio `analyze.mask_ratio`). Higher means more occlusion-invariant.
- CKA between every two encoders, block by block, on the whole images.

An image feature is the mean of a block's patch tokens (the cls token is
left out: MAE never trains it for a task).
"""

from __future__ import annotations

import itertools
import json
import logging

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from mimjax import checkpoint, masking, sharding
from mimjax import data as data_lib
from mimjax.analysis import cka, invariance, visualize
from mimjax.training import trainers

RANDOM = 'random'


def parse_encoders(spec: str, default: str) -> dict[str, str]:
  """'name=path,name2=random' -> {name: path}; '' -> this run's encoder
  (`default`) and a random initialisation."""
  if not spec:
    return {'pre-trained': default, 'random init': RANDOM}
  encoders = {}
  for item in spec.split(','):
    name, sep, path = item.partition('=')
    if not sep or not name.strip() or not path.strip():
      raise ValueError(f'analyze.encoders: {item!r} is not name=path '
                       "(path: a checkpoint or 'random')")
    encoders[name.strip()] = path.strip()
  return encoders


def check_paths(encoders: dict[str, str]):
  for name, path in encoders.items():
    if path != RANDOM and not checkpoint.resolve(path).exists():
      raise FileNotFoundError(f'analyze.encoders: {name}={path} does not '
                              'exist')


def encoder_params(config, encoder, path: str, grid):
  """An encoder's parameters: from a checkpoint, or random ones."""
  sample = np.zeros((1, config.data.image_size, config.data.image_size, 3),
                    np.float32)
  init = lambda: encoder.init(jax.random.key(config.seed), sample)['params']
  if path == RANDOM:
    return jax.device_get(nn.meta.unbox(jax.jit(init)()))
  pretrained = trainers.load_pretrained(path, config.model)
  return trainers.merge_encoder(jax.eval_shape(init), pretrained, grid, path)


def layer_features(config, encoder, params, mesh,
                   rules) -> dict[str, np.ndarray]:
  """Per-block image features (depth, n, D) of the whole images and of two
  complementary masked views, over the first analyze.examples images."""
  c = config.analyze
  num_patches = (config.data.image_size // config.model.patch_size)**2
  key = jax.random.key(c.seed)

  def image_features(params, x, ids_keep=None):
    layers = encoder.apply({'params': params}, x, ids_keep)['layers']
    return layers[:, :, 1:].mean(axis=2)  # (depth, B, D)

  @jax.jit
  def views(params, x, first_row):
    # Each image's mask depends on its row in the eval stream only, not on
    # the batch size or the device count.
    rows = first_row + jnp.arange(x.shape[0])
    noise = jax.vmap(lambda r: jax.random.uniform(
        jax.random.fold_in(key, r), (num_patches,)))(rows)
    view_a = masking.from_noise(noise, c.mask_ratio)
    view_b = masking.complement(view_a)
    return (image_features(params, x),
            image_features(params, x, view_a.ids_keep),
            image_features(params, x, view_b.ids_keep))

  names = ('whole', 'view_a', 'view_b')
  parts = {n: [] for n in names}
  seen = 0
  with sharding.active(mesh, rules):
    for i, batch in enumerate(data_lib.eval_batches(config.data,
                                                    config.eval_batch_size)):
      g = sharding.global_batch({'image': batch['image'],
                                 'valid': batch['valid']}, mesh)
      out = views(params, g['image'], i * config.eval_batch_size)
      out, valid = multihost_utils.process_allgather(
          (out, g['valid']), tiled=True)
      for name, feats in zip(names, out):
        parts[name].append(np.asarray(feats)[:, np.asarray(valid)])
      seen += int(np.sum(valid))
      if seen >= c.examples:
        break
  return {n: np.concatenate(p, axis=1)[:, :c.examples]
          for n, p in parts.items()}


def run(config, workdir: str, encoders: dict[str, str]) -> list[dict]:
  """Runs both analyses; returns one summary row per encoder."""
  mesh, rules = trainers.setup(config)
  encoder = trainers.make_encoder(config.model)
  grid = (config.data.image_size // config.model.patch_size,) * 2
  feats, results = {}, {}
  for name, path in encoders.items():
    params = encoder_params(config, encoder, path, grid)
    feats[name] = layer_features(config, encoder, params, mesh, rules)
    inv = invariance.occlusion_invariance(list(feats[name]['view_a']),
                                          list(feats[name]['view_b']))
    results[name] = {'path': path,
                     'invariance_cka': np.asarray(inv['cka']).tolist(),
                     'invariance_cosine': np.asarray(inv['cosine']).tolist()}
    logging.info('analyze: %s occlusion invariance (CKA) per block %s', name,
                 np.round(results[name]['invariance_cka'], 3).tolist())
  pairs = {f'{a} vs {b}': np.asarray(cka.cka_matrix(
      list(feats[a]['whole']), list(feats[b]['whole']))).tolist()
           for a, b in itertools.combinations(encoders, 2)}
  examples = next(iter(feats.values()))['whole'].shape[1]
  if jax.process_index() == 0:
    out = checkpoint.resolve(workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'analysis.json').write_text(json.dumps(
        {'examples': examples, 'mask_ratio': config.analyze.mask_ratio,
         'encoders': results, 'cka': pairs}, indent=1))
    plot_invariance(str(out / 'occlusion_invariance.png'), results,
                    config.analyze.mask_ratio, examples)
    for pair, matrix in pairs.items():
      a, b = pair.split(' vs ')
      plot_cka(str(out / f'cka_{_slug(a)}_vs_{_slug(b)}.png'),
               np.asarray(matrix), a, b)
    logging.info('analyze: wrote %s', out)
  return [{'stage': 'analyze', 'init': name,
           'invariance': r['invariance_cka'][-1]} for name, r in results.items()]


def _slug(name: str) -> str:
  return ''.join(ch if ch.isalnum() else '_' for ch in name)


def plot_invariance(path: str, results: dict, mask_ratio: float,
                    examples: int):
  """Occlusion invariance (CKA between complementary views) per block."""
  plt = visualize.pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for name, r in results.items():
    values = r['invariance_cka']
    ax.plot(range(1, len(values) + 1), values, marker='o', label=name)
  ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
  ax.set_xlabel('block')
  ax.set_ylabel('CKA between complementary views')
  ax.set_ylim(0, 1.02)
  ax.set_title(f'Occlusion invariance ({examples} images, mask ratio '
               f'{mask_ratio})', fontsize=9)
  ax.legend(fontsize=8)
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
