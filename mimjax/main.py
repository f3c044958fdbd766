r"""mimjax entry point: pre-train, fine-tune, linear-probe or all of it.

  python -m mimjax.main --config=configs/demo.py --workdir=/tmp/demo
  python -m mimjax.main --config=configs/mae_imagenet.py:B \
      --config.mode=pretrain --config.pretrain.batch_size=256 \
      --workdir=gs://bucket/run

Recipes: configs/demo.py, configs/mae_imagenet.py (B, L, H),
configs/mim_variants.py, configs/one_image.py, configs/small_datasets.py.
"""

from __future__ import annotations

import errno
import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mimjax import distributed
from mimjax import errors
from mimjax import host_memory

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Recipe file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where everything is written.')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, "mode=eval: the fine-tuning run's checkpoints dir.")


def main(argv):
  del argv
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError('--config and --workdir are required')
  # Library logs (INFO) go to DIR/log.txt (training/pipeline.log_to); the
  # console shows progress, evaluations and results. --verbosity=0 (or
  # more) shows the library logs here as well.
  logging.set_verbosity(logging.INFO)
  pylogging.getLogger('absl').setLevel(pylogging.INFO)
  if not flags.FLAGS['verbosity'].present:
    console = logging.get_absl_handler()
    console.setLevel(pylogging.WARNING)
    console.addFilter(_ours_or_errors)
  try:
    distributed.initialize()
    from mimjax.training import pipeline, preemption  # pylint: disable=g-import-not-at-top
    preemption.install()
    pipeline.run(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value)
  except errors.Error as e:
    print(f'mimjax: error: {_first_line(e)}', file=sys.stderr)
    sys.exit(1)
  except errors.Preempted as e:
    from mimjax.training import preemption  # pylint: disable=g-import-not-at-top
    print(f'mimjax: {e}', file=sys.stderr, flush=True)
    sys.exit(preemption.EXIT_CODE)
  except OSError as e:
    if e.errno not in _ENVIRONMENT_ERRNOS:
      raise
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


# A full disk, a read-only or not writable workdir: the environment, in one
# line. Any other OSError keeps its traceback.
_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                       errno.EPERM)


def _ours_or_errors(record: pylogging.LogRecord) -> bool:
  """On the console: mimjax's warnings, and every library's errors."""
  return (record.levelno >= pylogging.ERROR or
          f'{os.sep}mimjax{os.sep}' in record.pathname)


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
  host_memory.reexec_with_tunables()
  app.run(main, flags_parser=parse_flags)
