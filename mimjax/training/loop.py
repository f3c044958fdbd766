"""The training loop shared by every mode: resume, log, evaluate, checkpoint."""

from __future__ import annotations

import json
import logging
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from clu import metric_writers, parameter_overview, periodic_actions

from mimjax import checkpoint, sharding


class NonFiniteError(FloatingPointError):
  """A step produced a non-finite loss or gradient."""


def _scalars(metrics) -> dict[str, float]:
  return {k: float(v) for k, v in metrics.items()
          if np.ndim(v) == 0 and k != 'finite'}


def train_loop(*, name: str, workdir: str, state, shardings, train_step,
               batches: Callable[[int], Iterator[dict]], total_steps: int,
               mesh, lr_schedule=None, eval_fn=None, eval_every: int = 0,
               log_every: int = 50, checkpoint_every: int = 1000,
               keep_checkpoints: int = 3, score_key: str | None = None,
               on_eval: Callable | None = None, meta: dict | None = None,
               stop_at_step: int = 0):
  """Runs (or resumes) `total_steps` steps; returns (state, summary dict).

  `batches(start_step)` yields this process's rows of each global batch from
  `start_step` on; `eval_fn(state) -> dict` runs every `eval_every` steps
  and at the end. Checkpoints keep the last `keep_checkpoints` (and the best
  by `score_key`). A non-finite step leaves the state unchanged and stops
  the run at the next check with the step and the last finite metrics.
  `stop_at_step` > 0 ends this invocation there, checkpointed, to be resumed
  (e.g. within a scheduler's time limit).
  """
  out = checkpoint.resolve(workdir)
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
  ckpts = checkpoint.Checkpoints(out / 'checkpoints',
                                 keep=keep_checkpoints,
                                 keep_best=score_key is not None)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  # The newest checkpoint whose checksums verify; damaged ones are moved
  # aside (checkpoint.Checkpoints.restore_latest).
  start, restored, _ = ckpts.restore_latest(
      checkpoint.abstract_like(state, shardings))
  start = start or 0
  if start:
    state = restored
    logging.info('%s: resumed from step %d in %s', name, start, workdir)
  else:
    parameter_overview.log_parameter_overview(state.params)
  progress = periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=writer, every_steps=log_every)
  summary = {'stage': name, 'steps': total_steps}
  last_finite: dict[str, float] = {}
  first_bad = jnp.int32(-1)
  started = time.time()
  data = batches(start) if start < total_steps else iter(())

  def check(step, metrics):
    nonlocal last_finite
    bad = int(first_bad)
    if bad >= 0:
      raise NonFiniteError(
          f'{name}: non-finite loss or gradient at step {bad}; last finite '
          f'metrics {last_finite}; last good checkpoint: {ckpts.last_good()}')
    last_finite = {'step': step, **_scalars(metrics)}
    summary.setdefault('loss_first', last_finite.get('loss'))

  end = min(total_steps, stop_at_step) if stop_at_step else total_steps
  for step in range(start + 1, end + 1):
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      batch = sharding.global_batch(next(data), mesh)
      state, metrics = train_step(state, batch)
    first_bad = jnp.where((first_bad < 0) & ~metrics['finite'], step,
                          first_bad)
    progress(step)
    is_last = step == total_steps
    if step % log_every == 0 or step == end or step % checkpoint_every == 0:
      metrics = jax.device_get(metrics)
      check(step, metrics)
      scalars = _scalars(metrics)
      if lr_schedule is not None:
        scalars['lr'] = float(lr_schedule(step - 1))
      writer.write_scalars(step, scalars)
    if eval_fn is not None and (is_last or (eval_every and
                                            step % eval_every == 0)):
      results = eval_fn(state)
      writer.write_scalars(step, results)
      logging.info('%s step %d eval: %s', name, step, results)
      summary.update(results)
      if score_key is not None:
        ckpts.save_best(step, state, results[score_key])
      if on_eval is not None:
        on_eval(step, state, writer)
    if step % checkpoint_every == 0 or step == end:
      ckpts.save(step, state, {'step': step, 'data_position': step,
                               **(meta or {})}, force=step == end)
  ckpts.close()
  writer.flush()
  if start < total_steps:
    summary.update({k: v for k, v in last_finite.items() if k != 'step'})
    summary['train_seconds'] = round(time.time() - started, 1)
    if jax.process_index() == 0:
      (out / 'summary.json').write_text(json.dumps(summary, indent=1))
  elif (out / 'summary.json').exists():
    summary = json.loads((out / 'summary.json').read_text())
  return state, summary
