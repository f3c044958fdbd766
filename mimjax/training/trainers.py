"""Pre-training, fine-tuning, linear probing and evaluation on one mesh."""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import optax

from mimjax import checkpoint, convert, masking, mim, objectives, sharding
from mimjax import views
from mimjax import data as data_lib
from mimjax import torch_io
from mimjax.analysis import knn, visualize
from mimjax.models import Classifier, Decoder, Encoder, LinearProbe, vit
from mimjax.training import loop, optim
from mimjax.training import state as state_lib


# ------------------------------------------------------------ building


def make_encoder(model_cfg, **overrides) -> Encoder:
  return Encoder(patch_size=model_cfg.patch_size, **vit.preset(model_cfg.size),
                 norm_eps=model_cfg.norm_eps, scan=model_cfg.scan,
                 remat=model_cfg.remat, dtype=jnp.dtype(model_cfg.dtype),
                 **overrides)


def make_mask_fn(name: str, ratio: float, grid,
                 num_views: int = 2) -> masking.MaskFn:
  makers = {
      'random': lambda: masking.random(ratio),
      'complementary': lambda: masking.complementary(ratio),
      'independent': lambda: masking.independent(ratio, num_views),
      'block': lambda: masking.block(grid, ratio),
      'grid': lambda: masking.grid_mask(grid),
      'none': lambda: masking.none(num_views),
  }
  if name not in makers:
    raise ValueError(f'unknown pretrain.mask {name!r}; known: {sorted(makers)}')
  return makers[name]()


def make_mim(config) -> mim.MIM:
  c = config.pretrain
  encoder = make_encoder(config.model)
  grid = (c.data.image_size // config.model.patch_size,) * 2
  dec = c.decoder
  decoder = Decoder(out_dim=dec.out_dim or config.model.patch_size**2 * 3,
                    width=dec.width, depth=dec.depth, num_heads=dec.num_heads,
                    norm_eps=config.model.norm_eps, scan=config.model.scan,
                    remat=config.model.remat,
                    dtype=jnp.dtype(config.model.dtype))
  loss_fn = objectives.get(c.objective, **c.objective_kwargs.to_dict())
  view_kwargs = c.view_kwargs.to_dict()
  mask_fn = make_mask_fn(c.mask, c.mask_ratio, grid,
                         view_kwargs.get('num_views', 2))
  return mim.MIM(encoder, decoder, mask_fn, loss_fn,
                 views.get(c.views, **view_kwargs))


def stage_steps(c, num_train: int, name: str) -> tuple[int, int]:
  """(total, warmup) steps from epochs, unless steps are given."""
  if not c.steps and num_train <= 1:
    raise ValueError(f'{name}: an endless dataset needs {name}.steps > 0')
  per_epoch = max(num_train // c.batch_size, 1)
  total = c.steps or c.epochs * per_epoch
  warmup = c.warmup_steps or c.warmup_epochs * per_epoch
  return total, min(warmup, total)


def setup(config):
  """The mesh and logical-axis rules a config asks for."""
  mesh = sharding.config_mesh(config)
  rules = sharding.rules_from(config.sharding_rules)
  return mesh, rules


def _sample(batch_size: int, image_size: int):
  return jnp.zeros((batch_size, image_size, image_size, 3), jnp.float32)


def _loop_kwargs(config):
  return dict(log_every=config.log_every, stop_at_step=config.stop_at_step,
              checkpoint_every=config.checkpoint_every,
              keep_checkpoints=config.keep_checkpoints)


# ------------------------------------------------------------ pretrain


@dataclasses.dataclass
class Recipe:
  """What a stage trains: the pieces `state.create` and the train step need."""
  model: nn.Module
  init_variables: Callable[[jax.Array], dict]
  tx: optax.GradientTransformation
  loss_fn: Callable
  total_steps: int
  schedule: optax.Schedule
  image_size: int


def pretrain_recipe(config, mesh, num_train: int) -> Recipe:
  """The pre-training model, optimiser and loss for `config`."""
  c = config.pretrain
  model = make_mim(config)
  dp = sharding.data_parallel_size(mesh)
  total, warmup = stage_steps(c, num_train, 'pretrain')
  updates = max(total // c.accumulate, 1)
  lr = optim.scaled_lr(c.base_lr, c.batch_size * c.accumulate)
  schedule = optim.warmup_cosine(lr, updates, warmup // c.accumulate, c.min_lr)

  def init_variables(key):
    return model.init({'params': key, 'mask': key},
                      _sample(dp, c.data.image_size))

  abstract = nn.meta.unbox(jax.eval_shape(init_variables, jax.random.key(0)))
  tx = optim.finalize(
      optim.adamw(schedule, abstract['params'], c.weight_decay, b2=c.b2),
      c.clip_norm, c.accumulate)

  def loss_fn(params, extra, batch, rng):
    # `extra`: state a loss function keeps besides the parameters, e.g. the
    # siamese objective's persistent φ' ('inner').
    k_mask, k_drop = jax.random.split(rng)
    kwargs = dict(train=True, rngs={'mask': k_mask, 'dropout': k_drop})
    if extra:
      (loss, aux), extra = model.apply({'params': params, **extra},
                                       batch['image'], mutable=list(extra),
                                       **kwargs)
    else:
      loss, aux = model.apply({'params': params}, batch['image'], **kwargs)
    metrics = {k: v for k, v in aux.items()
               if isinstance(v, jax.Array) and v.ndim == 0}
    return loss, (metrics, extra)

  return Recipe(model, init_variables, tx, loss_fn, total, schedule,
                c.data.image_size)


def pretrain(config, workdir: str):
  """MIM pre-training with the configured mask and loss functions."""
  c = config.pretrain
  mesh, rules = setup(config)
  recipe = pretrain_recipe(
      config, mesh, data_lib.num_examples(c.data, c.data.train_split))
  state, shardings = state_lib.create(recipe.init_variables, recipe.tx,
                                      config.seed, mesh, rules)
  train_step = state_lib.make_train_step(recipe.loss_fn, recipe.tx, shardings,
                                         mesh, rules)
  batches = functools.partial(data_lib.train_batches, c.data, 'pretrain',
                              c.batch_size, config.seed)
  eval_fn = on_eval = None
  if c.knn_every or c.recon_every:
    monitor = PretrainMonitor(config, recipe.model, mesh, rules, workdir)
    eval_fn, on_eval = monitor.evaluate, monitor.reconstructions
  return loop.train_loop(
      name='pretrain', workdir=workdir, state=state, shardings=shardings,
      train_step=train_step, batches=batches, total_steps=recipe.total_steps,
      mesh=mesh, lr_schedule=recipe.schedule, eval_fn=eval_fn,
      eval_every=c.knn_every or c.recon_every, on_eval=on_eval,
      **_loop_kwargs(config))


class PretrainMonitor:
  """kNN accuracy of the encoder on a labelled split, and reconstruction grids."""

  def __init__(self, config, model: mim.MIM, mesh, rules, workdir: str):
    self.config, self.model, self.mesh, self.rules = config, model, mesh, rules
    self.workdir = workdir
    self.encode = jax.jit(lambda p, x: model.encoder.apply(
        {'params': p['encoder']}, x)['tokens'][:, 1:].mean(axis=1))

  def _features(self, params, split: str, limit: int):
    cfg = self.config.data.copy_and_resolve_references()
    cfg.eval_split = split
    feats, labels = [], []
    with sharding.active(self.mesh, self.rules):
      for batch in data_lib.eval_batches(cfg, self.config.eval_batch_size):
        g = sharding.global_batch(batch, self.mesh)
        gathered = multihost_utils.process_allgather(
            (self.encode(params, g['image']), g['label'], g['valid']),
            tiled=True)
        f, label, valid = (np.asarray(x) for x in gathered)
        feats.append(f[valid])
        labels.append(label[valid])
        if sum(map(len, labels)) >= limit:
          break
    return np.concatenate(feats)[:limit], np.concatenate(labels)[:limit]

  def evaluate(self, state):
    c = self.config.pretrain
    if not c.knn_every:
      return {}
    bank, bank_labels = self._features(state.params,
                                       self.config.data.train_split,
                                       c.knn_examples)
    query, query_labels = self._features(state.params,
                                         self.config.data.eval_split,
                                         c.knn_examples)
    acc = knn.knn_accuracy(bank, bank_labels, query, query_labels,
                           k=c.knn_k,
                           num_classes=data_lib.num_classes(self.config.data))
    return {'knn_top1': acc}

  def reconstructions(self, step, state, writer):
    """Writes original | masked | prediction grids (pixel-head decoders only)."""
    c, p = self.config.pretrain, self.config.model.patch_size
    if (not c.recon_every or jax.process_index() > 0 or
        self.model.decoder.out_dim != p * p * 3):
      return
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


# ------------------------------------------------------------ fine-tune


def load_pretrained(path: str, model_cfg) -> dict:
  """Encoder parameters from a mimjax run, an orbax params dir or a .pth file."""
  if not path:
    raise ValueError('no pre-trained checkpoint given (finetune.init)')
  where = checkpoint.resolve(path)
  if where.is_file():
    sd = torch_io.load_state_dict(path)
    params = convert.import_state_dict(sd, vit.preset(model_cfg.size)[
        'num_heads'], 16)
  elif where.is_dir() and any(p.name.isdigit() for p in where.iterdir()):
    params = checkpoint.load_state_params(path)
  elif where.is_dir():
    params = checkpoint.load_params(path)
  else:
    raise FileNotFoundError(f'pre-trained checkpoint {path} does not exist')
  if 'encoder' not in params:
    raise ValueError(f'{path} has no encoder parameters (found '
                     f'{sorted(params)})')
  return jax.tree.map(np.asarray, params['encoder'])


def merge_encoder(abstract_encoder, pretrained: dict, grid, source: str):
  """Pre-trained encoder params laid out as `abstract_encoder` expects.

  Adapts the block layout (scanned / unrolled) and resizes a learned
  position embedding; the encoder's own sin-cos init stays where the
  checkpoint has none (a fixed-sin-cos MAE encoder). Other differences are
  an error naming the first mismatching parameter.
  """
  abstract_encoder = nn.meta.unbox(abstract_encoder)
  scanned = 'blocks' in abstract_encoder.get('transformer', {})
  pretrained = (convert.stack_blocks(pretrained) if scanned else
                convert.unstack_blocks(pretrained))
  pretrained = dict(pretrained)
  if 'pos_embed' not in abstract_encoder:
    pretrained.pop('pos_embed', None)
  elif 'pos_embed' in pretrained:
    pretrained['pos_embed'] = convert.resize_posemb(pretrained['pos_embed'],
                                                    grid)
  else:
    pretrained['pos_embed'] = vit.posemb_sincos_2d(
        grid, abstract_encoder['pos_embed'].shape[-1])[None]
  if 'norm' not in abstract_encoder:
    pretrained.pop('norm', None)  # 'gap' classifiers use fc_norm instead
  convert.check_compatible(abstract_encoder, pretrained,
                           f'pre-trained encoder {source}')
  return pretrained


def _accuracy_counts(logits, labels, valid):
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  hit1 = (top5[:, 0] == labels) & valid
  hit5 = jnp.any(top5 == labels[:, None], axis=1) & valid
  return {'correct1': hit1.sum(), 'correct5': hit5.sum(), 'count': valid.sum()}


def classification_eval(logits_fn, params, config, mesh, rules):
  """Top-1 / top-5 (%) over the whole eval split, every example once."""
  counts_fn = jax.jit(lambda p, x, y, v: _accuracy_counts(logits_fn(p, x), y, v))
  totals = {'correct1': 0, 'correct5': 0, 'count': 0}
  with sharding.active(mesh, rules):
    for batch in data_lib.eval_batches(config.data, config.eval_batch_size):
      g = sharding.global_batch(batch, mesh)
      counts = jax.device_get(counts_fn(params, g['image'], g['label'],
                                        g['valid']))
      totals = {k: totals[k] + int(counts[k]) for k in totals}
  n = max(totals['count'], 1)
  return {'top1': 100.0 * totals['correct1'] / n,
          'top5': 100.0 * totals['correct5'] / n,
          'eval_examples': totals['count']}


def make_classifier(config, num_classes: int, drop_path: float = 0.0):
  encoder = make_encoder(config.model, posemb='learn', drop_path=drop_path)
  return Classifier(encoder, num_classes, pool=config.finetune.pool)


def finetune_recipe(config, mesh, num_train: int, num_classes: int) -> Recipe:
  """The fine-tuning classifier, optimiser (layer-wise decay) and loss."""
  c = config.finetune
  model = make_classifier(config, num_classes, c.drop_path)
  dp = sharding.data_parallel_size(mesh)
  size = config.data.image_size
  total, warmup = stage_steps(c, num_train, 'finetune')
  updates = max(total // c.accumulate, 1)
  schedule = optim.warmup_cosine(
      optim.scaled_lr(c.base_lr, c.batch_size * c.accumulate), updates,
      warmup // c.accumulate, c.min_lr)

  def init_variables(key):
    return model.init({'params': key}, _sample(dp, size))

  abstract = nn.meta.unbox(jax.eval_shape(init_variables, jax.random.key(0)))
  depth = vit.preset(config.model.size)['depth']
  tx = optim.finalize(optim.adamw(
      schedule, abstract['params'], c.weight_decay, b2=c.b2,
      skip=('pos_embed', 'cls_token'),
      lr_scales=optim.layer_decay_scales(abstract['params'], depth,
                                         c.layer_decay)),
                      c.clip_norm, c.accumulate)

  def loss_fn(params, extra, batch, rng):
    k_mix, k_drop = jax.random.split(rng)
    labels = jax.nn.one_hot(batch['label'], num_classes)
    images, targets = data_lib.mixup_cutmix(
        k_mix, batch['image'], labels, mixup_alpha=c.mixup,
        cutmix_alpha=c.cutmix, label_smoothing=c.label_smoothing)
    logits, _ = model.apply({'params': params}, images, train=True,
                            rngs={'dropout': k_drop})
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    return loss, ({}, extra)

  return Recipe(model, init_variables, tx, loss_fn, total, schedule, size)


def finetune(config, workdir: str, init: str | None = None):
  """End-to-end fine-tuning (init=None: from random initialisation)."""
  mesh, rules = setup(config)
  recipe = finetune_recipe(
      config, mesh,
      data_lib.num_examples(config.data, config.data.train_split),
      data_lib.num_classes(config.data))
  override = None
  if init:
    abstract = nn.meta.unbox(jax.eval_shape(recipe.init_variables,
                                            jax.random.key(0)))
    grid = (recipe.image_size // config.model.patch_size,) * 2
    override = {'encoder': merge_encoder(abstract['params']['encoder'],
                                         load_pretrained(init, config.model),
                                         grid, init)}
  state, shardings = state_lib.create(recipe.init_variables, recipe.tx,
                                      config.seed, mesh, rules,
                                      params_override=override)
  train_step = state_lib.make_train_step(recipe.loss_fn, recipe.tx, shardings,
                                         mesh, rules)
  eval_model = make_classifier(config, recipe.model.num_classes)
  logits_fn = lambda p, x: eval_model.apply({'params': p}, x)[0]
  batches = functools.partial(data_lib.train_batches, config.data, 'finetune',
                              config.finetune.batch_size, config.seed)
  return loop.train_loop(
      name='finetune', workdir=workdir, state=state, shardings=shardings,
      train_step=train_step, batches=batches, total_steps=recipe.total_steps,
      mesh=mesh, lr_schedule=recipe.schedule,
      eval_fn=lambda s: classification_eval(logits_fn, s.params, config, mesh,
                                            rules),
      eval_every=config.finetune.eval_every, score_key='top1',
      meta={'init': init or 'random'}, **_loop_kwargs(config))


# ------------------------------------------------------------ linprobe


class ProbeModel(nn.Module):
  """Frozen encoder (cls token after the final norm) -> BatchNorm -> linear."""
  encoder: Encoder
  num_classes: int

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    features = self.encoder(images)['tokens'][:, 0]
    return LinearProbe(self.num_classes, name='probe')(
        jax.lax.stop_gradient(features), train=train)


def linprobe(config, workdir: str, init: str):
  """Linear probe of a frozen pre-trained encoder (LARS, BN without affine)."""
  c = config.linprobe
  mesh, rules = setup(config)
  model = ProbeModel(make_encoder(config.model), data_lib.num_classes(
      config.data))
  dp = sharding.data_parallel_size(mesh)
  size = config.data.image_size
  total, warmup = stage_steps(c, data_lib.num_examples(
      config.data, config.data.train_split), 'linprobe')
  schedule = optim.warmup_cosine(optim.scaled_lr(c.base_lr, c.batch_size),
                                 total, warmup, c.min_lr)

  def init_variables(key):
    return model.init({'params': key}, _sample(dp, size))

  abstract = nn.meta.unbox(jax.eval_shape(init_variables, jax.random.key(0)))
  grid = (size // config.model.patch_size,) * 2
  encoder = merge_encoder(abstract['params']['encoder'],
                          load_pretrained(init, config.model), grid, init)
  labels = {'encoder': 'frozen', 'probe': 'train'}
  if c.optimizer == 'lars':
    train_tx = optim.lars(schedule, abstract['params']['probe'],
                          c.weight_decay)
  else:  # 'adamw' (config.validate): far fewer steps than LARS
    train_tx = optax.adamw(schedule, weight_decay=c.weight_decay)
  tx = optax.multi_transform(
      {'train': train_tx, 'frozen': optax.set_to_zero()},
      lambda params: {k: labels[k] for k in params})
  state, shardings = state_lib.create(init_variables, tx, config.seed, mesh,
                                      rules,
                                      params_override={'encoder': encoder})

  def loss_fn(params, extra, batch, rng):
    del rng
    logits, updates = model.apply({'params': params, **extra}, batch['image'],
                                  train=True, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['label']).mean()
    return loss, ({}, {**extra, **updates})

  train_step = state_lib.make_train_step(loss_fn, tx, shardings, mesh, rules)
  batches = functools.partial(data_lib.train_batches, config.data, 'linprobe',
                              c.batch_size, config.seed)

  def eval_fn(s):
    logits_fn = lambda p, x: model.apply({'params': p, **s.extra}, x)
    return classification_eval(logits_fn, s.params, config, mesh, rules)

  return loop.train_loop(
      name='linprobe', workdir=workdir, state=state, shardings=shardings,
      train_step=train_step, batches=batches, total_steps=total, mesh=mesh,
      lr_schedule=schedule, eval_fn=eval_fn, eval_every=c.eval_every,
      score_key='top1', meta={'init': init}, **_loop_kwargs(config))


def evaluate(config, checkpoint_dir: str):
  """Top-1 / top-5 of a fine-tuned classifier checkpoint on the eval split."""
  mesh, rules = setup(config)
  model = make_classifier(config, data_lib.num_classes(config.data))
  params = checkpoint.load_state_params(checkpoint_dir)
  abstract = nn.meta.unbox(jax.eval_shape(
      lambda k: model.init({'params': k}, _sample(1, config.data.image_size)),
      jax.random.key(0)))
  convert.check_compatible(abstract['params'], params,
                           f'checkpoint {checkpoint_dir}')
  logits_fn = lambda p, x: model.apply({'params': p}, x)[0]
  return classification_eval(logits_fn, params, config, mesh, rules)
