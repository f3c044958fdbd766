"""Optimisers of the MAE recipes: AdamW (+ layer-wise decay), LARS, schedules."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

NO_DECAY_LEAVES = ('bias', 'scale')


def scaled_lr(base_lr: float, global_batch: int) -> float:
  """The reference rule: lr = base_lr * global_batch / 256."""
  return base_lr * global_batch / 256


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int,
                  min_lr: float = 0.0) -> optax.Schedule:
  """Per-step linear warmup from 0, then half-cosine down to `min_lr`."""
  if warmup_steps >= total_steps:
    return optax.linear_schedule(0.0, peak_lr, max(total_steps, 1))
  return optax.warmup_cosine_decay_schedule(
      0.0, peak_lr, warmup_steps, total_steps, min_lr)


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def decay_mask(params, skip: tuple[str, ...] = ()):
  """True where weight decay applies: not biases, norms, 1-D, or `skip` names.

  As the reference: pre-training decays cls/mask tokens (they are not 1-D);
  fine-tuning skips ('pos_embed', 'cls_token').
  """
  def rule(path, x):
    name = _path_names(path)[-1]
    return bool(name not in NO_DECAY_LEAVES and name not in skip and
                np.ndim(x) > 1)
  return jax.tree_util.tree_map_with_path(rule, params)


def layer_id(names: tuple[str, ...], depth: int) -> int:
  """Reference layer ids: embeddings 0, block i -> i + 1, the rest depth + 1."""
  joined = '/'.join(names)
  if re.search(r'(cls_token|pos_embed|patch_embed)', joined):
    return 0
  match = re.search(r'blocks_(\d+)', joined)
  if match:
    return int(match.group(1)) + 1
  return depth + 1


def layer_decay_scales(params, depth: int, decay: float):
  """Per-parameter lr scale decay^(depth + 1 - layer_id), for fine-tuning.

  Scanned blocks ('blocks', layer axis 0) get an array of per-layer scales.
  """
  def scale(path, x):
    names = _path_names(path)
    if 'blocks' in names and 'encoder' in names:
      ids = np.arange(1, depth + 1)
      s = decay ** (depth + 1 - ids)
      return jnp.asarray(s.reshape((-1,) + (1,) * (np.ndim(x) - 1)),
                         jnp.float32)
    return jnp.asarray(decay ** (depth + 1 - layer_id(names, depth)),
                       jnp.float32)
  return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_tree(scales) -> optax.GradientTransformation:
  """Multiplies each update by a fixed per-parameter scale."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates,
                        scales), state
  return optax.GradientTransformation(init, update)


def adamw(schedule, params, weight_decay: float = 0.05, b1: float = 0.9,
          b2: float = 0.95, skip: tuple[str, ...] = (),
          lr_scales=None) -> optax.GradientTransformation:
  """AdamW with the reference decay mask and optional per-parameter lr scales."""
  parts = [optax.scale_by_adam(b1, b2, eps=1e-8),
           optax.add_decayed_weights(weight_decay, decay_mask(params, skip))]
  if lr_scales is not None:
    parts.append(scale_by_tree(lr_scales))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts)


def lars(schedule, params, weight_decay: float = 0.0,
         momentum: float = 0.9) -> optax.GradientTransformation:
  """LARS of the linear probe: no decay or trust ratio on 1-D parameters."""
  del params
  # A callable mask also works inside optax.multi_transform's masked trees.
  mask = lambda tree: jax.tree.map(lambda x: np.ndim(x) > 1, tree)
  return optax.lars(schedule, weight_decay=weight_decay,
                    weight_decay_mask=mask, trust_ratio_mask=mask,
                    momentum=momentum)


def finalize(tx: optax.GradientTransformation,
             clip_norm: float | None = None) -> optax.GradientTransformation:
  """Adds gradient clipping around `tx` (accumulation over micro-batches is
  the train step's: state.make_train_step)."""
  if clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
  return tx
