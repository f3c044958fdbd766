"""Each train step and each evaluator compiles once per stage: on a pod an
evaluation that recompiled would pay a full compile every time it runs."""

import collections
import functools

import jax
import pytest

from mimjax import evaluators
from mimjax.training import pipeline
from mimjax.training import state as state_lib
from tiny_config import tiny_config

COMPILE = '/jax/core/compile/backend_compile_duration'


@pytest.fixture
def compiles():
  """A list that grows by one at every XLA compilation."""
  seen = []
  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == COMPILE:
      seen.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  yield seen
  jax.monitoring.unregister_event_duration_listener(listener)


def _counted(fn, calls: list, compiles: list):
  """`fn`, appending to `calls` the compilations each call made."""
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    before = len(compiles)
    out = fn(*args, **kwargs)
    jax.block_until_ready(out)
    calls.append(len(compiles) - before)
    return out
  return wrapper


def test_each_step_and_evaluator_compiles_once_per_stage(tmp_path, compiles,
                                                        monkeypatch):
  calls = collections.defaultdict(list)  # (stage, what) -> compiles per call
  stage = ['']
  for cls in (evaluators.Knn, evaluators.Reconstructions,
              evaluators.Classification):
    monkeypatch.setattr(cls, 'run', lambda self, *a, _run=cls.run, _n=cls.__name__:
                        _counted(_run, calls[stage[0], _n], compiles)(self, *a))
  make_step = state_lib.make_train_step
  def make_counted_step(*args, **kwargs):
    return _counted(make_step(*args, **kwargs), calls[stage[0], 'step'],
                    compiles)
  monkeypatch.setattr(state_lib, 'make_train_step', make_counted_step)
  run_stage = pipeline.trainers.run_stage
  def named_stage(name, *args, **kwargs):
    stage[0] = name
    return run_stage(name, *args, **kwargs)
  monkeypatch.setattr(pipeline.trainers, 'run_stage', named_stage)

  c = tiny_config(tmp_path / 'tfds', mode='pipeline', **{
      'pretrain.steps': 6, 'pretrain.knn_every': 2, 'pretrain.recon_every': 2,
      'pretrain.knn_examples': 100, 'finetune.steps': 6,
      'finetune.eval_every': 2, 'linprobe.steps': 6, 'linprobe.eval_every': 2,
      'analyze.enabled': False})
  pipeline.run(c, str(tmp_path / 'run'))

  assert set(calls) == {
      ('pretrain', 'step'), ('pretrain', 'Knn'), ('pretrain', 'Reconstructions'),
      ('finetune', 'step'), ('finetune', 'Classification'),
      ('linprobe', 'step'), ('linprobe', 'Classification')}, dict(calls)
  for (name, what), counts in calls.items():
    runs = 6 if what == 'step' else 3
    assert len(counts) == runs, (name, what, counts)
    assert counts[0] > 0 and counts[1:] == [0] * (runs - 1), (name, what,
                                                              counts)
