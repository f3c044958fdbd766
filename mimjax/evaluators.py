"""Evaluators the training loop runs: kNN, classification, reconstructions.

Each has `every` (steps between runs; it also runs at a stage's last step)
and `run(step, state, writer) -> dict` of scalars. The loop runs them on
every process, alike. Each compiles its program once, reads its data once
(at its first run, so building a recipe reads nothing), runs on the state's
own shardings, and gathers to the host only what it reports or draws
(process 0 writes the files).
"""

from __future__ import annotations

import functools
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
  split, queries from the eval split (`knn_examples` of each, drawn with a
  fixed seed)."""

  def __init__(self, config, encoder, mesh, rules, every: int):
    self.config, self.mesh, self.rules, self.every = config, mesh, rules, every
    self.encode = jax.jit(lambda p, x: encoder.apply(
        {'params': p['encoder']}, x)['tokens'][:, 1:].mean(axis=1))

  @functools.cached_property
  def images(self) -> tuple[list[dict], list[dict]]:
    """(bank, queries): this process's rows of `knn_examples` of each
    split, drawn with a fixed seed, read once and kept on the host."""
    c = self.config
    return tuple(list(data_lib.eval_batches(c.data, c.eval_batch_size, split,
                                            c.pretrain.knn_examples))
                 for split in (c.data.train_split, c.data.eval_split))

  def _features(self, params, batches):
    feats, labels = [], []
    with sharding.active(self.mesh, self.rules):
      for _, g, valid in eval_stream(None, self.config.eval_batch_size,
                                     self.mesh, batches=batches):
        f, label = gathered((self.encode(params, g['image']), g['label']))
        feats.append(f[valid])
        labels.append(label[valid])
    return np.concatenate(feats), np.concatenate(labels)

  def run(self, step, state, writer) -> dict:
    del step, writer
    bank, query = self.images
    return {'knn_top1': knn.knn_accuracy(
        *self._features(state.params, bank),
        *self._features(state.params, query), k=self.config.pretrain.knn_k,
        num_classes=data_lib.num_classes(self.config.data))}


def _accuracy_counts(logits, labels, valid):
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  hit1 = (top5[:, 0] == labels) & valid
  hit5 = jnp.any(top5 == labels[:, None], axis=1) & valid
  return {'correct1': hit1.sum(), 'correct5': hit5.sum(), 'count': valid.sum()}


class Classification:
  """Top-1 / top-5 (%) over the whole eval split, every example once.
  `logits_fn(params, extra, images) -> logits` (extra: state.extra, e.g.
  the probe's BatchNorm statistics)."""

  def __init__(self, config, logits_fn: Callable, mesh, rules, every: int):
    self.config, self.mesh, self.rules, self.every = config, mesh, rules, every
    self.counts = jax.jit(
        lambda p, e, x, y, v: _accuracy_counts(logits_fn(p, e, x), y, v),
        out_shardings=sharding.replicated(mesh))

  @functools.cached_property
  def dataset(self):
    """The eval split's tf.data pipeline, built once, read at each run."""
    return data_lib.eval_dataset(self.config.data, self.config.eval_batch_size)

  def evaluate(self, params, extra=None) -> dict:
    totals = {'correct1': 0, 'correct5': 0, 'count': 0}
    with sharding.active(self.mesh, self.rules):
      for _, g, _ in eval_stream(None, self.config.eval_batch_size, self.mesh,
                                 batches=self.dataset.as_numpy_iterator()):
        counts = jax.device_get(self.counts(params, extra, g['image'],
                                            g['label'], g['valid']))
        totals = {k: totals[k] + int(counts[k]) for k in totals}
    n = max(totals['count'], 1)
    return {'top1': 100.0 * totals['correct1'] / n,
            'top5': 100.0 * totals['correct5'] / n,
            'eval_examples': totals['count']}

  def run(self, step, state, writer) -> dict:
    del step, writer
    return self.evaluate(state.params, state.extra)


class Reconstructions:
  """original | masked | prediction grids of 8 training images, as a PNG in
  the workdir and an image in TensorBoard (pixel-head decoders only)."""

  SHOWN = 8

  def __init__(self, config, model: mim.MIM, mesh, rules, workdir: str,
               every: int):
    self.mesh, self.rules, self.workdir, self.every = mesh, rules, workdir, every
    c, p = config.pretrain, config.model.patch_size
    self.data, self.patch = c.data, p
    self.norm_pix = c.objective_kwargs.get('norm_pix', True)
    self.enabled = model.decoder.out_dim == p * p * 3
    viewer = mim.MIM(model.encoder, model.decoder, masking.random(),
                     objectives.mae(norm_pix=self.norm_pix))
    mask_fn = masking.random(c.mask_ratio)

    def reconstruct(params, images, key):
      (mask,) = mask_fn(key, images.shape[0],
                        (images.shape[1] // p)**2)
      _, aux = viewer.apply({'params': params}, images, masks=(mask,))
      return aux['pred'], mask.mask

    self.reconstruct = jax.jit(reconstruct,
                               out_shardings=sharding.replicated(mesh))

  @functools.cached_property
  def batch(self) -> dict:
    """This process's rows of one training batch: at least SHOWN images, a
    whole number per batch-sharded device; read once."""
    dp = sharding.data_parallel_size(self.mesh)
    rows = -(-self.SHOWN // dp) * dp
    return {'image': next(data_lib.train_batches(
        self.data, 'pretrain', rows, seed=0))['image']}

  def run(self, step, state, writer) -> dict:
    if not self.enabled:
      return {}
    with sharding.active(self.mesh, self.rules):
      g = sharding.global_batch(self.batch, self.mesh)
      pred, mask = self.reconstruct(state.params, g['image'],
                                    jax.random.key(step))
    images = gathered(g['image'])[:self.SHOWN]
    pred, mask = (np.asarray(jax.device_get(x))[:self.SHOWN]
                  for x in (pred, mask))
    if jax.process_index() > 0:
      return {}
    grid = visualize.reconstruction_grid(images, pred, mask, self.patch,
                                         self.norm_pix)
    path = str(checkpoint.resolve(self.workdir) / f'reconstructions_{step}.png')
    visualize.save_png(path, grid, f'step {step}: original | masked | '
                       'prediction | prediction + visible')
    writer.write_images(step, {'reconstructions': grid[None]})
    logging.info('wrote %s', path)
    return {}
