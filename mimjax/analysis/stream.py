"""The one loop over an eval split, as global batches on a mesh, that the
evaluators and the analyses share."""

from __future__ import annotations

from typing import Iterator

import jax
from jax.experimental import multihost_utils
import numpy as np

from mimjax import data as data_lib
from mimjax import sharding


def eval_stream(data_cfg, batch_size: int, mesh, split: str | None = None,
                limit: int | None = None,
                batches=None) -> Iterator[tuple[int, dict, np.ndarray]]:
  """The eval split (or `split`) once, as global batches on `mesh`: yields
  (first row, batch, valid), `valid` the host copy of the global batch's
  real-example flags. `limit`: only that many examples, drawn with a fixed
  seed from the whole split (data.eval_batches). `batches`: this process's
  rows of batches already read (an evaluator's own set), in place of
  reading `data_cfg`."""
  if batches is None:
    batches = data_lib.eval_batches(data_cfg, batch_size, split, limit)
  for i, batch in enumerate(batches):
    g = sharding.global_batch(batch, mesh)
    valid = np.asarray(multihost_utils.process_allgather(g['valid'],
                                                         tiled=True))
    yield i * batch_size, g, valid


def gathered(x) -> np.ndarray:
  """A global array (or tree of them) as host numpy, from every process."""
  return jax.tree.map(np.asarray,
                      multihost_utils.process_allgather(x, tiled=True))
