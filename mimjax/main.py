"""mimjax entry point: pre-train, fine-tune, linear-probe or all of it.

  python -m mimjax.main --config=configs/demo.py --workdir=/tmp/demo
  python -m mimjax.main --config=configs/mae_pretrain.py:B \
      --config.pretrain.batch_size=256 --workdir=gs://bucket/run
"""

from __future__ import annotations

import json
import logging as pylogging
import os
import socket
import sys
import threading

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Recipe file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where everything is written.')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, "mode=eval: the fine-tuning run's checkpoints dir.")


def initialize_distributed():
  """Joins a multi-process job when the environment asks for one.

  MIMJAX_COORDINATOR=host:port with MIMJAX_NUM_PROCESSES and
  MIMJAX_PROCESS_ID: explicit; MIMJAX_DISTRIBUTED=1: auto-detected (TPU
  pods, SLURM). MIMJAX_INIT_TIMEOUT (seconds, default 300) bounds the wait
  for the other processes; MIMJAX_HEARTBEAT_TIMEOUT (seconds, default 100)
  is how long a silent (dead) process goes unnoticed before the job fails.
  """
  coordinator = os.environ.get('MIMJAX_COORDINATOR')
  if not coordinator and os.environ.get('MIMJAX_DISTRIBUTED') != '1':
    return
  import jax  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if coordinator:
    missing = [v for v in ('MIMJAX_NUM_PROCESSES', 'MIMJAX_PROCESS_ID')
               if v not in os.environ]
    if missing:
      raise ValueError(f'MIMJAX_COORDINATOR is set but {", ".join(missing)} '
                       'is not')
    kwargs = dict(coordinator_address=coordinator,
                  num_processes=_env_int('MIMJAX_NUM_PROCESSES', None),
                  process_id=_env_int('MIMJAX_PROCESS_ID', None))
    if not 0 <= kwargs['process_id'] < kwargs['num_processes']:
      raise ValueError(f'MIMJAX_PROCESS_ID={kwargs["process_id"]} is not in '
                       f'0 ... MIMJAX_NUM_PROCESSES-1 = '
                       f'{kwargs["num_processes"] - 1}')
  timeout = _env_int('MIMJAX_INIT_TIMEOUT', 300)
  # JAX aborts the process with a C++ stack trace when the job does not
  # assemble in time; this watchdog says why first, then exits.
  watchdog = threading.Timer(timeout, _not_assembled, (timeout, kwargs))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(
        initialization_timeout=timeout + 30,
        heartbeat_timeout_seconds=_env_int('MIMJAX_HEARTBEAT_TIMEOUT', 100),
        **kwargs)
  finally:
    watchdog.cancel()


def _env_int(name: str, default: int | None) -> int:
  value = os.environ.get(name, default)
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{name}={value!r} is not a whole number') from None


def _not_assembled(timeout: int, kwargs: dict):
  """Called from the watchdog: one line on stderr, exit 1."""
  address = kwargs.get('coordinator_address')
  who = (f'process {kwargs["process_id"]} of {kwargs["num_processes"]}'
         if kwargs else 'this process')
  if address is None:
    why = 'the auto-detected coordinator or another process did not answer'
  elif kwargs['process_id'] != 0 and not _reachable(address):
    why = f'nothing answers at the coordinator address {address}'
  else:
    why = (f'not all {kwargs["num_processes"]} processes joined the '
           f'coordinator at {address}; one did not start or cannot reach it')
  print(f'mimjax: error: {who} gave up after MIMJAX_INIT_TIMEOUT={timeout} '
        f's: {why}', file=sys.stderr, flush=True)
  os._exit(1)  # pylint: disable=protected-access


def _reachable(address: str) -> bool:
  host, _, port = address.rpartition(':')
  try:
    socket.create_connection((host.strip('[]'), int(port)), timeout=2).close()
    return True
  except (OSError, ValueError):
    return False


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def run(config, workdir: str, checkpoint_path: str | None = None) -> list[dict]:
  """Runs the configured mode; returns one summary dict per stage."""
  import jax  # pylint: disable=g-import-not-at-top
  from mimjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from mimjax import sharding  # pylint: disable=g-import-not-at-top
  from mimjax.training import trainers  # pylint: disable=g-import-not-at-top
  config_lib.validate(config, *sharding.topology())
  from mimjax import checkpoint  # pylint: disable=g-import-not-at-top
  out = checkpoint.resolve(workdir)
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    (out / 'config.json').write_text(config.to_json_best_effort(indent=1))
  pretrained = os.path.join(stage_dir(workdir, 'pretrain'), 'checkpoints')
  summaries = []
  mode = config.mode
  analyze = mode == 'analyze' or (mode == 'pipeline' and
                                  config.analyze.enabled)
  if analyze:  # a wrong path is an error now, not after training
    from mimjax.analysis import report  # pylint: disable=g-import-not-at-top
    encoders = report.parse_encoders(config.analyze.encoders, pretrained)
    if mode == 'analyze' or config.analyze.encoders:
      report.check_paths(encoders)
  if mode in ('pretrain', 'pipeline'):
    summaries.append(trainers.pretrain(config, stage_dir(workdir,
                                                         'pretrain'))[1])
  if mode in ('finetune', 'pipeline'):
    init = config.finetune.init or (pretrained if mode == 'pipeline' else '')
    summaries.append(_tagged(trainers.finetune(
        config, stage_dir(workdir, 'finetune'), init or None)[1],
                             init or 'random init'))
    if config.finetune.scratch_baseline:
      summaries.append(_tagged(trainers.finetune(
          config, stage_dir(workdir, 'finetune_scratch'), None)[1],
                               'random init'))
    decay = config.finetune.scratch_layer_decay
    if decay:
      flat = config.copy_and_resolve_references()
      with flat.unlocked():
        flat.finetune.layer_decay = decay
      summaries.append(_tagged(trainers.finetune(
          flat, stage_dir(workdir, f'finetune_scratch_ld{decay:g}'), None)[1],
                               f'random init, decay {decay:g}'))
  if mode == 'linprobe' or (mode == 'pipeline' and config.linprobe.enabled):
    init = config.linprobe.init or pretrained
    summaries.append(_tagged(trainers.linprobe(
        config, stage_dir(workdir, 'linprobe'), init)[1], init))
  if analyze:
    summaries += report.run(config, stage_dir(workdir, 'analyze'), encoders)
  if mode == 'eval':
    path = checkpoint_path or os.path.join(stage_dir(workdir, 'finetune'),
                                           'checkpoints')
    summaries.append({'stage': 'eval', **trainers.evaluate(config, path)})
  if jax.process_index() == 0:
    print(summary_table(summaries, config))
    (out / 'summary.json').write_text(json.dumps(summaries, indent=1))
  return summaries


def _tagged(summary: dict, init: str) -> dict:
  return {**summary, 'init': init}


def summary_table(summaries: list[dict], config) -> str:
  """A short table of what each stage measured."""
  keys = ('loss', 'knn_top1', 'top1', 'top5', 'invariance', 'steps',
          'train_seconds')
  cell = lambda v: (f'{v:>13.4f}' if isinstance(v, float) else
                    f'{"-" if v is None else v!s:>13}')
  lines = [f'{"stage":<10} {"init":<24} ' + ' '.join(f'{k:>13}' for k in keys)]
  for s in summaries:
    init = str(s.get('init', '-'))
    if os.sep in init:  # a checkpoint path: its last two parts say enough
      init = os.path.join(*init.rstrip(os.sep).split(os.sep)[-2:])
    lines.append(f'{s["stage"]:<10} {init[-24:]:<24} ' +
                 ' '.join(cell(s.get(k)) for k in keys))
  if config.reference:
    lines.append(f'reference (paper): {config.reference.to_dict()}')
  return '\n'.join(lines)


def main(argv):
  del argv
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError('--config and --workdir are required')
  logging.set_verbosity(logging.INFO)
  pylogging.getLogger('absl').setLevel(pylogging.INFO)
  try:
    initialize_distributed()
    run(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    print(f'mimjax: error: {e}', file=sys.stderr)
    sys.exit(1)
  except Exception as e:  # pylint: disable=broad-except
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_count() == 1 or not isinstance(e, jax.errors.JaxRuntimeError):
      raise
    # A collective failed: most likely another process died. Leave now
    # rather than wait in the runtime's shutdown barrier; checkpoints on disk
    # are complete ones.
    first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f'mimjax: error: process {jax.process_index()} of '
          f'{jax.process_count()} stops: a collective failed ({first_line}); '
          'another process has probably died', file=sys.stderr, flush=True)
    os._exit(1)  # pylint: disable=protected-access


if __name__ == '__main__':
  app.run(main)
