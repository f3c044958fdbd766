"""The paper's analyses of trained encoders, written as JSON and PNGs.

For each encoder (a checkpoint, or 'random' for a random initialisation) and
`analyze.examples` images of the eval split (drawn with a fixed seed from all
of it, the same in every run; data.eval_batches):

- occlusion invariance per block: linear CKA, mean cosine and mean centred
  cosine (each view's features less that view's mean over the images) between
  the image features of two complementary masked views (each sees what the
  other hides; ratio `analyze.mask_ratio`). Higher means more
  occlusion-invariant. The plain cosine is ~0.93 for any encoder; the centred
  one is the one that separates them.
- CKA between every two encoders, block by block, on the whole images.

An image feature is the mean of a block's patch tokens (the cls token is
left out: MAE never trains it for a task).

Up to one eval batch of images (`analyze.examples <= eval_batch_size`), CKA is
the full-batch linear CKA. Beyond that it is the minibatch estimator with
unbiased HSIC (Nguyen et al. 2021), summed batch by batch: the eval stream is
read twice (once for each view's mean feature, which the centred cosine needs,
once for everything else), each batch goes through every encoder, and no
n x n matrix or all-images feature array is held. That estimator needs more
than 3 images per batch: a last batch with fewer is left out (and
analysis.json says so).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mimjax import build, checkpoint, errors, masking, sharding, weights
from mimjax.analysis import cka, invariance, plots, stream

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
      raise errors.Invalid(f'analyze.encoders: {item!r} is not name=path '
                           "(path: a checkpoint or 'random')")
    encoders[name.strip()] = path.strip()
  return encoders


def check_paths(encoders: dict[str, str]):
  for name, path in encoders.items():
    if path != RANDOM and not checkpoint.resolve(path).exists():
      raise errors.Missing(f'analyze.encoders: {name}={path} does not '
                           'exist')


def encoder_params(config, encoder, path: str, grid):
  """An encoder's parameters: from a checkpoint, or random ones."""
  sample = np.zeros((1, config.data.image_size, config.data.image_size, 3),
                    np.float32)
  init = lambda: encoder.init(jax.random.key(config.seed), sample)['params']
  if path == RANDOM:
    return jax.device_get(nn.meta.unbox(jax.jit(init)()))
  pretrained = weights.load_pretrained(path, config.model)
  return weights.merge_encoder(jax.eval_shape(init), pretrained, grid, path)


VIEWS = ('view_a', 'view_b')
LINEAR, MINIBATCH = 'linear', 'minibatch_unbiased'
MIN_HSIC_BATCH = 4  # unbiased HSIC needs n > 3


def _views_fn(config, encoder):
  """A jitted (params, images, first_row, whole) -> {'whole' (if whole),
  'view_a', 'view_b'}: per-block image features (depth, B, D), float32."""
  c = config.analyze
  num_patches = (config.data.image_size // config.model.patch_size)**2
  key = jax.random.key(c.seed)

  def image_features(params, x, ids_keep=None):
    layers = encoder.apply({'params': params}, x, ids_keep)['layers']
    return layers[:, :, 1:].mean(axis=2, dtype=jnp.float32)  # (depth, B, D)

  @functools.partial(jax.jit, static_argnames='whole')
  def views(params, x, first_row, whole=True):
    # Each image's mask depends on its row in the eval stream only, not on
    # the batch size or the device count.
    rows = first_row + jnp.arange(x.shape[0])
    noise = jax.vmap(lambda r: jax.random.uniform(
        jax.random.fold_in(key, r), (num_patches,)))(rows)
    view_a = masking.from_noise(noise, c.mask_ratio)
    view_b = masking.complement(view_a)
    out = {'view_a': image_features(params, x, view_a.ids_keep),
           'view_b': image_features(params, x, view_b.ids_keep)}
    if whole:
      out['whole'] = image_features(params, x)
    return out

  return views


def _batches(config, views, params: list, mesh, whole: bool = True):
  """Reads the eval stream once, analyze.examples images drawn with a fixed
  seed (all of the split if fewer); yields per batch, for each of `params`,
  {'whole' (if whole), 'view_a', 'view_b'}: numpy (depth, b, D) of the
  batch's valid (used) rows."""
  limit, seen = config.analyze.examples, 0
  for first_row, g, valid in stream.eval_stream(
      config.data, config.eval_batch_size, mesh, limit=limit):
    take = min(int(valid.sum()), limit - seen)
    if take > 0:
      out = []
      for p in params:
        feats = stream.gathered(views(p, g['image'], first_row, whole=whole))
        out.append({k: v[:, valid][:, :take] for k, v in feats.items()})
      seen += take
      yield out


def layer_features(config, encoder, params, mesh,
                   rules) -> dict[str, np.ndarray]:
  """Per-block image features (depth, n, D) of the whole images and of two
  complementary masked views, over analyze.examples images (_batches)."""
  views = _views_fn(config, encoder)
  with sharding.active(mesh, rules):
    parts = [b[0] for b in _batches(config, views, [params], mesh)]
  return {k: np.concatenate([p[k] for p in parts], axis=1)
          for k in ('whole',) + VIEWS}


@dataclasses.dataclass
class Stats:
  """What the analyses measured, before it is written out."""
  estimator: str  # LINEAR or MINIBATCH
  batch_size: int  # images per CKA batch (LINEAR: all of them)
  examples: int  # images used
  dropped: int  # images left out (a last batch of <= 3 for MINIBATCH)
  invariance: dict[str, dict[str, np.ndarray]]  # name -> per-block values
  cka: dict[tuple[str, str], np.ndarray]  # (a, b) -> (depth_a, depth_b)


def full_batch_stats(config, views, params: dict, mesh) -> Stats:
  """All images at once (at most one eval batch of them): linear CKA."""
  names = list(params)
  parts = {n: [] for n in names}
  for batch in _batches(config, views, list(params.values()), mesh):
    for n, feats in zip(names, batch):
      parts[n].append(feats)
  if not parts[names[0]]:
    raise errors.Invalid('analyze: the eval split has no images')
  feats = {n: {k: np.concatenate([p[k] for p in ps], axis=1)
               for k in ('whole',) + VIEWS} for n, ps in parts.items()}
  inv = {n: jax.device_get(invariance.occlusion_invariance(
      list(f['view_a']), list(f['view_b']))) for n, f in feats.items()}
  pairs = {(a, b): np.asarray(cka.cka_matrix(list(feats[a]['whole']),
                                             list(feats[b]['whole'])))
           for a, b in itertools.combinations(names, 2)}
  examples = feats[names[0]]['whole'].shape[1]
  return Stats(LINEAR, examples, examples, 0, inv, pairs)


_invariance_update = jax.jit(invariance.MinibatchInvariance.update)
_cka_update = jax.jit(cka.MinibatchCKA.update_grams)
_grams = jax.jit(cka.gram_matrices)


def minibatch_stats(config, views, params: dict, mesh) -> Stats:
  """Batch by batch, every encoder on each batch: minibatch CKA with
  unbiased HSIC. Two reads of the eval stream: the views' means, then the
  rest. A batch of <= 3 images (only ever the last) is left out of both."""
  if config.eval_batch_size < MIN_HSIC_BATCH:
    raise errors.Invalid('analyze: the minibatch CKA estimator '
                         f'(analyze.examples {config.analyze.examples} > '
                         f'eval_batch_size {config.eval_batch_size}) needs '
                         f'eval_batch_size >= {MIN_HSIC_BATCH}')
  names, plist = list(params), list(params.values())
  rows = lambda batch: batch[0]['view_a'].shape[1]
  # Pass 1: each view's mean feature per block, over the images used.
  sums = {n: [0.0, 0.0] for n in names}
  used = dropped = 0
  for batch in _batches(config, views, plist, mesh, whole=False):
    if rows(batch) < MIN_HSIC_BATCH:
      dropped += rows(batch)
      continue
    used += rows(batch)
    for n, feats in zip(names, batch):
      for j, view in enumerate(VIEWS):
        sums[n][j] = sums[n][j] + feats[view].sum(axis=1, dtype=np.float64)
  if not used:
    raise errors.Invalid('analyze: no eval batch has more than 3 images, which '
                         'the minibatch CKA estimator needs')
  # Pass 2: invariance and cross-encoder CKA, batch by batch.
  inv = {n: invariance.MinibatchInvariance.create(list(s[0] / used),
                                                  list(s[1] / used))
         for n, s in sums.items()}
  depth = len(sums[names[0]][0])
  pairs = {pair: cka.MinibatchCKA.create(depth, depth)
           for pair in itertools.combinations(names, 2)}
  seen = 0
  for batch in _batches(config, views, plist, mesh, whole=True):
    if rows(batch) < MIN_HSIC_BATCH:
      continue
    seen += rows(batch)
    grams = {}
    for n, feats in zip(names, batch):
      inv[n] = _invariance_update(inv[n], list(feats['view_a']),
                                  list(feats['view_b']))
      grams[n] = _grams(list(feats['whole']))
    for (a, b), acc in pairs.items():
      pairs[(a, b)] = _cka_update(acc, grams[a], grams[b])
  if seen != used:
    raise RuntimeError(f'analyze: the eval stream gave {used} images, then '
                       f'{seen}')
  return Stats(MINIBATCH, config.eval_batch_size, used, dropped,
               {n: jax.device_get(acc.compute()) for n, acc in inv.items()},
               {pair: np.asarray(acc.compute())
                for pair, acc in pairs.items()})


def run(config, workdir: str, encoders: dict[str, str]) -> list[dict]:
  """Runs both analyses; returns one summary row per encoder."""
  mesh, rules = build.setup(config)
  encoder = build.encoder(config.model)
  grid = build.grid(config, config.data.image_size)
  loaded = {}  # path -> params: the same checkpoint (or 'random') once
  for path in encoders.values():
    if path not in loaded:
      loaded[path] = encoder_params(config, encoder, path, grid)
  params = {name: loaded[path] for name, path in encoders.items()}
  views = _views_fn(config, encoder)
  minibatch = config.analyze.examples > config.eval_batch_size
  with sharding.active(mesh, rules):
    stats = (minibatch_stats if minibatch else full_batch_stats)(
        config, views, params, mesh)
  results = {}
  for name, path in encoders.items():
    inv = stats.invariance[name]
    results[name] = {
        'path': path,
        'invariance_cka': np.asarray(inv['cka']).tolist(),
        'invariance_cosine': np.asarray(inv['cosine']).tolist(),
        'invariance_cosine_centred': np.asarray(
            inv['cosine_centred']).tolist()}
    logging.info('analyze: %s occlusion invariance per block: CKA %s, '
                 'centred cosine %s', name,
                 np.round(results[name]['invariance_cka'], 3).tolist(),
                 np.round(results[name]['invariance_cosine_centred'],
                          3).tolist())
  pairs = {f'{a} vs {b}': m.tolist() for (a, b), m in stats.cka.items()}
  analysis = {'examples': stats.examples,
              'mask_ratio': config.analyze.mask_ratio,
              'cka_estimator': stats.estimator,
              'cka_batch_size': stats.batch_size,
              'dropped_examples': stats.dropped}
  if stats.dropped:
    analysis['note'] = (
        f'the last eval batch had {stats.dropped} image(s); the minibatch '
        'estimator (unbiased HSIC) needs more than 3, so they were left out')
    logging.warning('analyze: %s', analysis['note'])
  logging.info('analyze: %d images, CKA estimator %s (batch %d)',
               stats.examples, stats.estimator, stats.batch_size)
  analysis.update(encoders=results, cka=pairs)
  if jax.process_index() == 0:
    out = checkpoint.resolve(workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'analysis.json').write_text(json.dumps(analysis, indent=1))
    plots.plot_invariance(str(out / 'occlusion_invariance.png'), results,
                    config.analyze.mask_ratio, stats.examples)
    for pair, matrix in pairs.items():
      a, b = pair.split(' vs ')
      plots.plot_cka(str(out / f'cka_{_slug(a)}_vs_{_slug(b)}.png'),
               np.asarray(matrix), a, b)
    if pairs:
      plots.plot_cka_overview(str(out / 'cka_overview.png'), list(encoders),
                        stats.cka)
    logging.info('analyze: wrote %s', out)
  return [{'stage': 'analyze', 'init': name,
           'invariance': r['invariance_cka'][-1],
           'invariance_cosine_centred': r['invariance_cosine_centred'][-1]}
          for name, r in results.items()]


def _slug(name: str) -> str:
  return ''.join(ch if ch.isalnum() else '_' for ch in name)
