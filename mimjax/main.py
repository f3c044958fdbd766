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
  config_lib.check_workdir(workdir)
  from mimjax import checkpoint  # pylint: disable=g-import-not-at-top
  out = checkpoint.resolve(workdir)
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
  # The training stages, each checked against the fingerprint of the
  # checkpoints already in its directory before anything trains.
  plan = []  # (stage, kind, config, init, trainer)
  if mode in ('pretrain', 'pipeline'):
    plan.append(('pretrain', 'pretrain', config, None,
                 lambda c, d, _: trainers.pretrain(c, d)))
  if mode in ('finetune', 'pipeline'):
    init = (config_lib.init_path(config.finetune.init, 'finetune.init')
            if config.finetune.init else
            pretrained if mode == 'pipeline' else None)
    plan.append(('finetune', 'finetune', config, init, trainers.finetune))
    if config.finetune.scratch_baseline:
      plan.append(('finetune_scratch', 'finetune', config, None,
                   trainers.finetune))
    decay = config.finetune.scratch_layer_decay
    if decay:
      flat = config.copy_and_resolve_references()
      with flat.unlocked():
        flat.finetune.layer_decay = decay
      plan.append((f'finetune_scratch_ld{decay:g}', 'finetune', flat, None,
                   trainers.finetune))
  if 'linprobe' in config_lib.stages_run(config):
    init = (config_lib.init_path(config.linprobe.init, 'linprobe.init')
            if config.linprobe.init else pretrained)
    if mode == 'linprobe' and not config.linprobe.init:
      config_lib.init_path(init, "linprobe.init (this run's pre-training)")
    plan.append(('linprobe', 'linprobe', config, init, trainers.linprobe))
  made_here = str(checkpoint.resolve(pretrained))
  for stage, kind, cfg, init, _ in plan:
    guard_stage(cfg, stage_dir(workdir, stage), kind, init, write=False,
                partial=(mode == 'pipeline' and init is not None and
                         str(checkpoint.resolve(init)) == made_here))
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    # One file per invocation: config.json, then config-2.json, ...
    name, n = 'config.json', 1
    while (out / name).exists():
      n += 1
      name = f'config-{n}.json'
    (out / name).write_text(config.to_json_best_effort(indent=1))
  stopped = False
  for stage, kind, cfg, init, trainer in plan:
    guard_stage(cfg, stage_dir(workdir, stage), kind, init)
    summary = trainer(cfg, stage_dir(workdir, stage), init)[1]
    if kind != 'pretrain':
      summary = _tagged(summary, init or (
          'random init' if cfg is config else
          f'random init, decay {cfg.finetune.layer_decay:g}'))
    summaries.append(summary)
    if config.stop_at_step and config.stop_at_step < summary['steps']:
      # An unfinished stage is nobody's init: carry on in the next call.
      logging.info('%s stopped at step %d of %d (stop_at_step); the next '
                   'invocation carries on', stage, config.stop_at_step,
                   summary['steps'])
      stopped = True
      break
  if analyze and not stopped:
    summaries += report.run(config, stage_dir(workdir, 'analyze'), encoders)
  if mode == 'eval':
    path = checkpoint_path or os.path.join(stage_dir(workdir, 'finetune'),
                                           'checkpoints')
    summaries.append({'stage': 'eval', **trainers.evaluate(config, path)})
  if jax.process_index() == 0:
    print(summary_table(summaries, config))
    (out / 'summary.json').write_text(json.dumps(summaries, indent=1))
  return summaries


def guard_stage(config, directory: str, kind: str, init: str | None,
                partial: bool = False, write: bool = True):
  """Refuses to resume a stage whose checkpoints were written with other
  settings (config.stage_fingerprint, the init and its step), naming the
  keys; --config.overwrite=True moves such a stage aside instead. Writes
  the fingerprint of a stage about to run (`write`). `partial`: the init is
  made by an earlier stage of this call, so only the settings are
  compared."""
  import jax  # pylint: disable=g-import-not-at-top
  from mimjax import checkpoint  # pylint: disable=g-import-not-at-top
  from mimjax import config as config_lib  # pylint: disable=g-import-not-at-top
  stage = checkpoint.resolve(directory)
  ckpts = stage / 'checkpoints'
  path = ckpts / checkpoint.FINGERPRINT
  new = {**config_lib.stage_fingerprint(config, kind),
         **({} if partial else checkpoint.init_identity(init))}
  old = json.loads(path.read_text()) if path.exists() else None
  resumes = checkpoint.latest_step(ckpts) is not None
  if resumes and old is None and write:
    logging.warning('%s has no fingerprint (written by an older mimjax): '
                    'resuming it unchecked', ckpts)
  if resumes and old is not None:
    if partial:
      old = {k: v for k, v in old.items() if not k.startswith('init')}
    changes = config_lib.fingerprint_changes(old, new)
    if changes and not config.overwrite:
      more = f' (+{len(changes) - 4} more)' if len(changes) > 4 else ''
      raise ValueError(
          f'{stage.name}: the checkpoints in {ckpts} were written with other '
          f'settings: {"; ".join(changes[:4])}{more}; start fresh with a new '
          '--workdir, or --config.overwrite=True to move them aside')
    if changes:
      n = 1
      while (stage.parent / f'{stage.name}.old-{n}').exists():
        n += 1
      aside = stage.parent / f'{stage.name}.old-{n}'
      if jax.process_index() == 0:
        stage.rename(aside)
      _sync(f'mimjax_overwrite_{stage.name}')
      logging.warning('%s: settings changed (%s); overwrite=True: moved the '
                      'old stage to %s', stage.name, '; '.join(changes), aside)
  if write and jax.process_index() == 0:
    ckpts.mkdir(parents=True, exist_ok=True)
    tmp = ckpts / (checkpoint.FINGERPRINT + '.tmp')
    tmp.write_text(json.dumps(new, indent=1, sort_keys=True))
    tmp.replace(path)


def _sync(name: str):
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _tagged(summary: dict, init: str) -> dict:
  return {**summary, 'init': init}


def summary_table(summaries: list[dict], config) -> str:
  """A short table of what each stage measured."""
  keys = ('loss', 'knn_top1', 'top1', 'top5', 'invariance', 'steps',
          'train_seconds')
  if any('inner_loss' in s for s in summaries):  # Eq. 7: how close φ' is
    keys = ('loss', 'inner_loss', *keys[1:])
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
    print(f'mimjax: error: {_first_line(e)}', file=sys.stderr)
    sys.exit(1)
  except OSError as e:  # a full disk, a read-only file system, ...
    import errno  # pylint: disable=g-import-not-at-top
    full = ('; the checkpoints on disk are the last complete ones'
            if e.errno == errno.ENOSPC else '')
    print(f'mimjax: error: {_first_line(e)}{full}', file=sys.stderr)
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


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, and the recipe loaded now: a missing or broken
  recipe file or a typo'd config key is one line (with ml_collections'
  "did you mean"), not a traceback."""
  try:
    rest = flags.FLAGS(argv)
    config = _CONFIG.value
    if type(config).__name__ == '_ErrorConfig':  # the recipe did not load
      raise object.__getattribute__(config, '_error')
    return rest
  except Exception as e:  # pylint: disable=broad-except
    print(f'mimjax: error: {flag_error(e)}', file=sys.stderr)
    sys.exit(1)


def flag_error(e: BaseException) -> str:
  """One line for an exception raised while parsing flags."""
  if isinstance(e, (KeyError, AttributeError)):
    message = e
    while isinstance(message, BaseException) and message.args:
      message = message.args[0]
    lines = [l.strip() for l in str(message).strip().splitlines() if l.strip()]
    key = lines[0].strip('\'"') if lines else '?'
    hint = f': {" ".join(lines[1:])}' if len(lines) > 1 else ''
    return f'unknown config key {key!r}{hint}'
  if isinstance(e, flags.Error):  # the last line of a recipe's traceback
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    if len(lines) > 1 and 'Error whilst parsing config file' in lines[0]:
      return f'{lines[0].split(": Error whilst")[0]}: {lines[-1]}'
    return _first_line(e)
  deepest = e
  while deepest.__cause__ is not None:
    deepest = deepest.__cause__
  lines = [l.strip() for l in str(deepest).splitlines() if l.strip()]
  what = lines[-1] if lines else type(deepest).__name__
  if not isinstance(deepest, OSError):
    what = f'{type(deepest).__name__}: {what}'
  return f'cannot load --config: {what}'


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
