"""Evaluators the training loop runs: kNN, classification, reconstructions.

Each has `every` (steps between runs; it also runs at a stage's last step)
and `run(step, state, writer) -> dict` of scalars; the loop runs them all
the same way. They read the eval split through `analysis.stream`, as the
analyses (analysis/report.py) do.
"""

from __future__ import annotations

import logging
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mimjax import checkpoint, masking, mim, objectives, sharding
from mimjax import data as data_lib
from mimjax.analysis import knn, visualize
from mimjax.analysis.stream import eval_stream, gathered


class Knn:
  """kNN top-1 (%) of the encoder's mean patch token, bank from the train
  split, queries from the eval split (`knn_examples` of each)."""

  def __init__(self, config, encoder, mesh, rules, every: int):
    self.config, self.mesh, self.rules, self.every = config, mesh, rules, every
    self.encode = jax.jit(lambda p, x: encoder.apply(
        {'params': p['encoder']}, x)['tokens'][:, 1:].mean(axis=1))

  def _features(self, params, split: str):
    c = self.config
    feats, labels = [], []
    with sharding.active(self.mesh, self.rules):
      for _, g, valid in eval_stream(c.data, c.eval_batch_size, self.mesh,
                                     split, c.pretrain.knn_examples):
        f, label = gathered((self.encode(params, g['image']), g['label']))
        feats.append(f[valid])
        labels.append(label[valid])
    limit = c.pretrain.knn_examples
    return np.concatenate(feats)[:limit], np.concatenate(labels)[:limit]

  def run(self, step, state, writer) -> dict:
    del step, writer
    c = self.config
    bank = self._features(state.params, c.data.train_split)
    query = self._features(state.params, c.data.eval_split)
    return {'knn_top1': knn.knn_accuracy(
        *bank, *query, k=c.pretrain.knn_k,
        num_classes=data_lib.num_classes(c.data))}


def _accuracy_counts(logits, labels, valid):
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  hit1 = (top5[:, 0] == labels) & valid
  hit5 = jnp.any(top5 == labels[:, None], axis=1) & valid
  return {'correct1': hit1.sum(), 'correct5': hit5.sum(), 'count': valid.sum()}


def classification(logits_fn, params, config, mesh, rules) -> dict:
  """Top-1 / top-5 (%) over the whole eval split, every example once.
  `logits_fn(params, images) -> logits`."""
  counts_fn = jax.jit(lambda p, x, y, v: _accuracy_counts(logits_fn(p, x), y,
                                                          v))
  totals = {'correct1': 0, 'correct5': 0, 'count': 0}
  with sharding.active(mesh, rules):
    for _, g, _ in eval_stream(config.data, config.eval_batch_size, mesh):
      counts = jax.device_get(counts_fn(params, g['image'], g['label'],
                                        g['valid']))
      totals = {k: totals[k] + int(counts[k]) for k in totals}
  n = max(totals['count'], 1)
  return {'top1': 100.0 * totals['correct1'] / n,
          'top5': 100.0 * totals['correct5'] / n,
          'eval_examples': totals['count']}


class Classification:
  """`classification` of the state; `logits_fn(state)` gives the
  (params, images) -> logits function (it may use state.extra)."""

  def __init__(self, config, logits_fn: Callable, mesh, rules, every: int):
    self.config, self.logits_fn = config, logits_fn
    self.mesh, self.rules, self.every = mesh, rules, every

  def run(self, step, state, writer) -> dict:
    del step, writer
    return classification(self.logits_fn(state), state.params, self.config,
                          self.mesh, self.rules)


class Reconstructions:
  """original | masked | prediction grids of 8 training images, as a PNG in
  the workdir and an image in TensorBoard (pixel-head decoders only)."""

  def __init__(self, config, model: mim.MIM, workdir: str, every: int):
    self.config, self.model, self.workdir, self.every = (config, model,
                                                         workdir, every)

  def run(self, step, state, writer) -> dict:
    c, p = self.config.pretrain, self.config.model.patch_size
    if (jax.process_index() > 0 or
        self.model.decoder.out_dim != p * p * 3):
      return {}
    batch = next(data_lib.train_batches(c.data, 'pretrain', 8, seed=0))
    images = jnp.asarray(batch['image'][:8])
    (mask,) = masking.random(c.mask_ratio)(
        jax.random.key(step), images.shape[0], (images.shape[1] // p)**2)
    norm_pix = c.objective_kwargs.get('norm_pix', True)
    viewer = mim.MIM(self.model.encoder, self.model.decoder, masking.random(),
                     objectives.mae(norm_pix=norm_pix))
    _, aux = viewer.apply({'params': jax.device_get(state.params)}, images,
                          masks=(mask,))
    grid = visualize.reconstruction_grid(
        np.asarray(images), np.asarray(aux['pred']), np.asarray(mask.mask), p,
        norm_pix)
    path = str(checkpoint.resolve(self.workdir) / f'reconstructions_{step}.png')
    visualize.save_png(path, grid, f'step {step}: original | masked | '
                       'prediction | prediction + visible')
    writer.write_images(step, {'reconstructions': grid[None]})
    logging.info('wrote %s', path)
    return {}
