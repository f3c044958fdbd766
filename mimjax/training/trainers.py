"""The stages: pre-training, fine-tuning, linear probing, evaluation.

Each stage is a `Recipe` (model, optimiser, loss, schedule, evaluators)
run by `run_stage` on one mesh: the state is created sharded, the train
step jitted with donation, and `loop.train_loop` resumes, logs, evaluates
and checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mimjax import build, checkpoint, errors, evaluators, sharding, weights
from mimjax import data as data_lib
from mimjax.models import vit
from mimjax.training import loop, optim
from mimjax.training import state as state_lib


@dataclasses.dataclass
class Recipe:
  """What a stage trains: the pieces `state.create`, the train step and the
  loop need. `lr_at(step)`: the learning rate in effect at 1-based training
  step `step` (one optimizer update per step, whatever `accumulate`)."""
  model: nn.Module
  init_variables: Callable[[jax.Array], dict]
  tx: optax.GradientTransformation
  loss_fn: Callable
  total_steps: int
  lr_at: Callable[[int], float]
  image_size: int
  override: dict | None = None  # parameters replacing the initial ones
  evaluators: list = dataclasses.field(default_factory=list)
  score_key: str | None = None  # keep the best checkpoint by this metric
  accumulate: int = 1  # micro-batches per step (state.make_train_step)


def stage_steps(c, num_train: int, name: str) -> tuple[int, int]:
  """(total, warmup) steps from epochs, unless steps are given."""
  if not c.steps and num_train <= 1:
    raise errors.Invalid(f'{name}: an endless dataset needs {name}.steps > 0')
  per_epoch = max(num_train // c.batch_size, 1)
  total = c.steps or c.epochs * per_epoch
  warmup = c.warmup_steps or c.warmup_epochs * per_epoch
  return total, min(warmup, total)


def schedule_for(c, total: int, warmup: int):
  """(optax schedule over updates, lr_at over 1-based training steps)."""
  schedule = optim.warmup_cosine(optim.scaled_lr(c.base_lr, c.batch_size),
                                 max(total, 1), warmup, c.min_lr)
  return schedule, lambda step: float(schedule(step - 1))


def _abstract_params(init_variables):
  return nn.meta.unbox(jax.eval_shape(init_variables,
                                      jax.random.key(0)))['params']


def _sample(batch_size: int, image_size: int):
  return jnp.zeros((batch_size, image_size, image_size, 3), jnp.float32)


# ------------------------------------------------------------ recipes


def pretrain_recipe(config, mesh, num_train: int, workdir: str = '') -> Recipe:
  """The pre-training model, optimiser and loss for `config`."""
  c = config.pretrain
  model = build.mim_model(config)
  total, warmup = stage_steps(c, num_train, 'pretrain')
  schedule, lr_at = schedule_for(c, total, warmup)
  sample = _sample(sharding.data_parallel_size(mesh), c.data.image_size)
  init_variables = lambda key: model.init({'params': key, 'mask': key}, sample)
  tx = optim.finalize(
      optim.adamw(schedule, _abstract_params(init_variables), c.weight_decay,
                  b2=c.b2), c.clip_norm)

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

  evals = []
  if c.knn_every:
    evals.append(evaluators.Knn(config, model.encoder, mesh,
                                sharding.rules_from(config.sharding_rules),
                                c.knn_every))
  if c.recon_every:
    evals.append(evaluators.Reconstructions(
        config, model, mesh, sharding.rules_from(config.sharding_rules),
        workdir, c.recon_every))
  return Recipe(model, init_variables, tx, loss_fn, total, lr_at,
                c.data.image_size, evaluators=evals, accumulate=c.accumulate)


def finetune_recipe(config, mesh, num_train: int, num_classes: int,
                    init: str | None = None) -> Recipe:
  """The fine-tuning classifier, optimiser (layer-wise decay) and loss;
  from the encoder at `init` (None: random initialisation)."""
  c = config.finetune
  model = build.classifier(config, num_classes, c.drop_path)
  size = config.data.image_size
  total, warmup = stage_steps(c, num_train, 'finetune')
  schedule, lr_at = schedule_for(c, total, warmup)
  sample = _sample(sharding.data_parallel_size(mesh), size)
  init_variables = lambda key: model.init({'params': key}, sample)
  abstract = _abstract_params(init_variables)
  depth = vit.preset(config.model.size)['depth']
  tx = optim.finalize(optim.adamw(
      schedule, abstract, c.weight_decay, b2=c.b2,
      skip=('pos_embed', 'cls_token'),
      lr_scales=optim.layer_decay_scales(abstract, depth, c.layer_decay)),
                      c.clip_norm)

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

  eval_model = build.classifier(config, num_classes)
  logits_fn = lambda p, extra, x: eval_model.apply({'params': p}, x)[0]
  rules = sharding.rules_from(config.sharding_rules)
  return Recipe(
      model, init_variables, tx, loss_fn, total, lr_at, size,
      override=(weights.pretrained_encoder(abstract, init, config, size)
                if init else None),
      evaluators=[evaluators.Classification(config, logits_fn, mesh, rules,
                                            c.eval_every)],
      score_key='top1', accumulate=c.accumulate)


def linprobe_recipe(config, mesh, num_train: int, num_classes: int,
                    init: str) -> Recipe:
  """A linear probe (BatchNorm without affine + linear) on the frozen
  encoder at `init`: LARS as the reference, or AdamW (far fewer steps)."""
  c = config.linprobe
  model = build.probe(config, num_classes)
  size = config.data.image_size
  total, warmup = stage_steps(c, num_train, 'linprobe')
  schedule, lr_at = schedule_for(c, total, warmup)
  sample = _sample(sharding.data_parallel_size(mesh), size)
  init_variables = lambda key: model.init({'params': key}, sample)
  abstract = _abstract_params(init_variables)
  if c.optimizer == 'lars':
    train_tx = optim.lars(schedule, abstract['probe'], c.weight_decay)
  else:  # 'adamw' (config.validate)
    train_tx = optax.adamw(schedule, weight_decay=c.weight_decay)
  labels = {'encoder': 'frozen', 'probe': 'train'}
  tx = optax.multi_transform(
      {'train': train_tx, 'frozen': optax.set_to_zero()},
      lambda params: {k: labels[k] for k in params})

  def loss_fn(params, extra, batch, rng):
    del rng
    logits, updates = model.apply({'params': params, **extra}, batch['image'],
                                  train=True, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['label']).mean()
    return loss, ({}, {**extra, **updates})

  logits_fn = lambda p, extra, x: model.apply({'params': p, **extra}, x)
  rules = sharding.rules_from(config.sharding_rules)
  return Recipe(
      model, init_variables, tx, loss_fn, total, lr_at, size,
      override=weights.pretrained_encoder(abstract, init, config, size),
      evaluators=[evaluators.Classification(config, logits_fn, mesh, rules,
                                            c.eval_every)],
      score_key='top1')


# ------------------------------------------------------------ drivers


def run_stage(name: str, config, workdir: str, recipe: Recipe, batches,
              mesh, rules, data, meta: dict | None = None):
  """Creates the state on the mesh and runs (or resumes) the stage on
  `data` (a data config, named on the console)."""
  state, shardings = state_lib.create(recipe.init_variables, recipe.tx,
                                      config.seed, mesh, rules,
                                      params_override=recipe.override)
  train_step = state_lib.make_train_step(recipe.loss_fn, recipe.tx, shardings,
                                         mesh, rules, recipe.accumulate)
  return loop.train_loop(
      name=name, workdir=workdir, state=state, shardings=shardings,
      train_step=train_step, batches=batches, total_steps=recipe.total_steps,
      mesh=mesh, lr_at=recipe.lr_at, evaluators=recipe.evaluators,
      score_key=recipe.score_key, meta=meta, log_every=config.log_every,
      stop_at_step=config.stop_at_step,
      checkpoint_every=config.checkpoint_every,
      keep_checkpoints=config.keep_checkpoints,
      profile_steps=config.get('profile_steps'),
      about=f' on {data.name} ({data.train_split})')


def pretrain(config, workdir: str, init: str | None = None):
  """MIM pre-training with the configured view, mask and loss functions."""
  del init
  c = config.pretrain
  mesh, rules = build.setup(config)
  recipe = pretrain_recipe(
      config, mesh, data_lib.num_examples(c.data, c.data.train_split),
      workdir)
  batches = functools.partial(data_lib.train_batches, c.data, 'pretrain',
                              c.batch_size, config.seed)
  return run_stage('pretrain', config, workdir, recipe, batches, mesh, rules,
                   c.data)


def _classify(stage: str, recipe_fn, config, workdir: str, init):
  """A fine-tuning or probing stage on config.data, from the encoder at
  `init` (None: random initialisation)."""
  mesh, rules = build.setup(config)
  recipe = recipe_fn(
      config, mesh,
      data_lib.num_examples(config.data, config.data.train_split),
      data_lib.num_classes(config.data), init)
  batches = functools.partial(data_lib.train_batches, config.data, stage,
                              config[stage].batch_size, config.seed)
  return run_stage(stage, config, workdir, recipe, batches, mesh, rules,
                   config.data, meta={'init': init or 'random'})


def finetune(config, workdir: str, init: str | None = None):
  """End-to-end fine-tuning (init=None: from random initialisation)."""
  return _classify('finetune', finetune_recipe, config, workdir, init)


def linprobe(config, workdir: str, init: str):
  """Linear probe of a frozen pre-trained encoder."""
  return _classify('linprobe', linprobe_recipe, config, workdir, init)


def evaluate(config, checkpoint_dir: str):
  """Top-1 / top-5 of a fine-tuned classifier checkpoint on the eval split."""
  mesh, rules = build.setup(config)
  model = build.classifier(config, data_lib.num_classes(config.data))
  params = checkpoint.load_state_params(checkpoint_dir)
  abstract = nn.meta.unbox(jax.eval_shape(
      lambda k: model.init({'params': k}, _sample(1, config.data.image_size)),
      jax.random.key(0)))
  checkpoint.check_compatible(abstract['params'], params,
                           f'checkpoint {checkpoint_dir}')
  logits_fn = lambda p, extra, x: model.apply({'params': p}, x)[0]
  return evaluators.Classification(config, logits_fn, mesh, rules,
                                   every=0).evaluate(params)
