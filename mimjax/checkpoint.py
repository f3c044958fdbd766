"""Orbax checkpoints of parameter trees."""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def save_params(path: str, params) -> None:
  """Writes a parameter tree as an orbax checkpoint directory at `path`."""
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, jax.tree.map(np.asarray, params), force=True)


def load_params(path: str, like=None):
  """Reads a parameter tree saved by `save_params` (optionally shaped `like`)."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'no orbax checkpoint directory at {path}')
  with ocp.StandardCheckpointer() as checkpointer:
    if like is None:
      return checkpointer.restore(path)
    from mimjax import convert  # pylint: disable=g-import-not-at-top
    stored = checkpointer.metadata(path).item_metadata.tree
    convert.check_compatible(like, stored, f'checkpoint {path}')
    return checkpointer.restore(path, like)
