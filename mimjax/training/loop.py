"""The training loop shared by every mode: resume, log, evaluate, checkpoint."""

from __future__ import annotations

import collections
import datetime
import json
import logging
import sys
import time
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from clu import metric_writers, parameter_overview, periodic_actions

from mimjax import checkpoint, errors, sharding
from mimjax.training import preemption


NonFiniteError = errors.NonFinite


def _scalars(metrics) -> dict[str, float]:
  return {k: float(v) for k, v in metrics.items()
          if np.ndim(v) == 0 and k != 'finite'}


def train_loop(*, name: str, workdir: str, state, shardings, train_step,
               batches: Callable[[int], Iterator[dict]], total_steps: int,
               mesh, lr_at: Callable[[int], float] | None = None,
               evaluators: Sequence = (), log_every: int = 50,
               checkpoint_every: int = 1000, keep_checkpoints: int = 3,
               score_key: str | None = None, meta: dict | None = None,
               stop_at_step: int = 0, about: str = '',
               profile_steps: Sequence[int] | None = None):
  """Runs (or resumes) `total_steps` steps; returns (state, summary dict).

  `batches(start_step)` yields this process's rows of each global batch from
  `start_step` on. Each of `evaluators` (mimjax/evaluators.py) runs every
  `evaluator.every` steps and at the last step; its scalars are logged and
  kept in the summary. `lr_at(step)` is the learning rate logged at a step.
  Checkpoints keep the last `keep_checkpoints` (and the best by
  `score_key`). The console (process 0) gets one line for the stage
  (`about`: what it trains on), its progress, and its evaluations; the
  parameter table goes to `<workdir>/parameters.txt`. A non-finite step leaves the state unchanged and stops
  the run at the next check with the step and the last finite metrics.
  `stop_at_step` > 0 ends this invocation there, checkpointed, to be resumed
  (e.g. within a scheduler's time limit); a pre-emption notice
  (training/preemption.py) ends it at the step all processes agree on,
  saved, with `Preempted`. `profile_steps` (first, last):
  a jax.profiler trace of those steps in `<workdir>/profile`.
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
      sharding.shaped(state, shardings))
  start = start or 0
  if start:
    state = restored
    logging.info('%s: resumed from step %d in %s', name, start, workdir)
  else:  # statistics of arrays that may span processes: all compute them
    overview = parameter_overview.get_parameter_overview(
        state.params, include_stats='global')
    if jax.process_index() == 0:
      (out / 'parameters.txt').write_text(overview + '\n')
  progress = periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=writer, every_steps=log_every)
  summary = {'stage': name, 'steps': total_steps}
  last_finite: dict[str, float] = {}
  first_bad = jnp.int32(-1)
  started = time.time()
  data = on_devices(batches(start) if start < total_steps else iter(()),
                    mesh)

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
  console = Console(name, total_steps, start)
  if start < end:
    console.say(f'{name}: steps {start + 1}-{end} of {total_steps}'
                f'{" (resumed)" if start else ""}{about}, mesh '
                f'{dict(mesh.shape)}')
  profiler = Profiler(name, profile_steps, out / 'profile', console.say)
  try:
    for step in range(start + 1, end + 1):
      profiler.before(step)
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        batch = next(data)
        state, metrics = train_step(state, batch)
      profiler.after(step, end, state)
      first_bad = jnp.where((first_bad < 0) & ~metrics['finite'], step,
                            first_bad)
      progress(step)
      is_last = step == total_steps
      if step % log_every == 0 or step == end or step % checkpoint_every == 0:
        metrics = jax.device_get(metrics)
        check(step, metrics)
        scalars = _scalars(metrics)
        if lr_at is not None:
          scalars['lr'] = lr_at(step)
        writer.write_scalars(step, scalars)
        if step % log_every == 0 or step == end:
          console.progress(step, end, scalars['loss'],
                           batch['image'].shape[0])
      due = [e for e in evaluators
             if is_last or (e.every and step % e.every == 0)]
      results = {}
      for evaluator in due:
        results.update(evaluator.run(step, state, writer))
      if results:
        writer.write_scalars(step, results)
        console.say(f'{name} step {step}: ' + ', '.join(
            f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}'
            for k, v in results.items()))
        summary.update(results)
        if score_key in results:
          ckpts.save_best(step, state, results[score_key])
      stop = preemption.reached(step)
      if step % checkpoint_every == 0 or step == end or stop:
        ckpts.save(step, state, {'step': step, 'data_position': step,
                                 **(meta or {})}, force=step == end or stop)
      if stop and step < end:
        ckpts.close()
        writer.flush()
        raise preemption.stopped_at(name, step, total_steps,
                                    str(ckpts.directory))
  finally:
    profiler.close()
  console.done()
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


def on_devices(batches: Iterator[dict], mesh, ahead: int = 2):
  """Global batches on `mesh` from this process's rows, `ahead` of them in
  flight (their transfers overlap the steps before them)."""
  queue = collections.deque()
  for local in batches:
    queue.append(sharding.global_batch(local, mesh))
    if len(queue) > ahead:
      yield queue.popleft()
  yield from queue


class Profiler:
  """A jax.profiler trace of training steps first..last (1-based, both
  included) into `path`, for TensorBoard's Profile tab; one console line
  when it is written. A resumed stage traces what is left of the range; a
  stage that ends inside it (stop_at_step) stops the trace there."""

  def __init__(self, name: str, steps: Sequence[int] | None, path,
               say: Callable[[str], None]):
    self.name, self.path, self.say = name, path, say
    self.first, self.last = tuple(steps) if steps else (0, -1)
    self.started = None  # the step the open trace began at

  def before(self, step: int):
    if self.started is None and self.first <= step <= self.last:
      jax.profiler.start_trace(str(self.path))
      self.started = step

  def after(self, step: int, end: int, state):
    if self.started is not None and (step >= self.last or step >= end):
      jax.block_until_ready(state)  # the traced steps have run on device
      jax.profiler.stop_trace()
      self.say(f'{self.name}: profile of steps {self.started}-{step} in '
               f'{self.path} (tensorboard --logdir {self.path}, Profile tab)')
      self.started = None

  def close(self):
    """Ends a trace left open by an error (nothing to say about it)."""
    if self.started is not None:
      self.started = None
      jax.profiler.stop_trace()


class Console:
  """What a person sees of a stage (process 0): a progress line with step,
  loss, img/s and ETA, rewritten in place on a terminal and printed at
  every log step otherwise, and one line per evaluation."""

  def __init__(self, name: str, total: int, start: int):
    self.name, self.total = name, total
    self.quiet = jax.process_index() > 0
    self.tty = sys.stdout.isatty()
    self.mark = (start, time.time())
    self.timed = False  # the first interval includes the compilation
    self.open = False

  def say(self, line: str):
    if not self.quiet:
      self.done()
      print(line, flush=True)
    self.mark = (self.mark[0], time.time())  # evaluations are not steps

  def progress(self, step: int, end: int, loss: float, global_batch: int):
    (last_step, last_time), now = self.mark, time.time()
    timed, self.timed = self.timed, True
    self.mark = (step, now)
    if self.quiet or step == last_step:
      return
    line = f'{self.name} step {step}/{self.total}  loss {loss:.4f}'
    if timed:
      per_step = (now - last_time) / (step - last_step)
      eta = datetime.timedelta(seconds=round(per_step * (end - step)))
      line += f'  {global_batch / per_step:.1f} img/s  ETA {eta}'
    if self.tty:
      print('\r' + line.ljust(78), end='', flush=True)
      self.open = True
    else:
      print(line, flush=True)

  def done(self):
    if self.open:
      print(flush=True)
      self.open = False
