"""Orbax checkpoints of parameter trees."""

from __future__ import annotations

import os

from etils import epath
import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp


def resolve(path) -> epath.Path:
  """A local path made absolute, or a cloud path (gs://...) as it is."""
  path = str(path)
  return epath.Path(path if '://' in path else os.path.abspath(path))


def save_params(path: str, params) -> None:
  """Writes a parameter tree as an orbax checkpoint directory at `path`."""
  path = resolve(path)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, jax.tree.map(np.asarray, params), force=True)


def load_params(path: str, like=None):
  """Reads a parameter tree saved by `save_params` (optionally shaped `like`)."""
  path = resolve(path)
  if not path.is_dir():
    raise FileNotFoundError(f'no orbax checkpoint directory at {path}')
  with ocp.StandardCheckpointer() as checkpointer:
    if like is None:
      return checkpointer.restore(path)
    from mimjax import convert  # pylint: disable=g-import-not-at-top
    like = nn.meta.unbox(like)
    stored = checkpointer.metadata(path).item_metadata.tree
    convert.check_compatible(like, stored, f'checkpoint {path}')
    return checkpointer.restore(path, like)


def abstract_like(state, shardings):
  """ShapeDtypeStructs with shardings: the restore target for `state`."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      state, shardings)


class Checkpoints:
  """Train-state checkpoints of one run: keep the last N, optionally the best.

  Each step directory holds 'state' (the TrainState: params, optimizer,
  step, RNG) and 'meta' (JSON: the data position and anything else). Orbax
  writes to a temporary directory and renames it when complete, so a crash
  mid-save never replaces the last good checkpoint.
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
               keep_best: bool = False):
    directory = resolve(directory)
    self.directory = directory
    self.manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save))
    self.best = None
    if keep_best:
      self.best = ocp.CheckpointManager(
          directory / 'best', options=ocp.CheckpointManagerOptions(
              max_to_keep=1, create=True, best_fn=lambda m: m['score'],
              best_mode='max', enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict, force: bool = False):
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=force)

  def save_best(self, step: int, state, score: float):
    if self.best is not None:
      self.best.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state)), metrics={'score': score})

  def restore(self, step: int, target):
    """Restores (state, meta) at `step` onto the shardings of `target`."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'cannot restore checkpoint step {step} from '
                       f'{self.directory}: {type(e).__name__}: '
                       f'{str(e).splitlines()[0] if str(e) else ""}') from e
    return restored.state, restored.meta

  def wait(self):
    self.manager.wait_until_finished()
    if self.best is not None:
      self.best.wait_until_finished()

  def close(self):
    self.wait()
    self.manager.close()
    if self.best is not None:
      self.best.close()


def load_state_params(directory: str, step: int | None = None):
  """The parameters of a train-state checkpoint (latest step by default).

  They are restored onto this host whatever mesh wrote them (pre-training on
  a pod, fine-tuning elsewhere).
  """
  directory = resolve(directory)
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {directory}')
  path = directory / str(step) / 'state'
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.PyTreeCheckpointer() as checkpointer:
    stored = checkpointer.metadata(path).item_metadata.tree
    target = {'params': jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        dict(stored)['params'])}
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, partial_restore=True,
        restore_args=jax.tree.map(
            lambda _: ocp.ArrayRestoreArgs(sharding=device), target)))
  return jax.tree.map(np.asarray, restored['params'])
