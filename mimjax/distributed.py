"""Joining a multi-process job (TPU pods, GPU clusters, SLURM, localhost)."""

from __future__ import annotations

import os
import socket
import sys
import threading

from mimjax import errors


def initialize():
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
      raise errors.Invalid(f'MIMJAX_COORDINATOR is set but '
                           f'{", ".join(missing)} is not')
    kwargs = dict(coordinator_address=coordinator,
                  num_processes=_env_int('MIMJAX_NUM_PROCESSES', None),
                  process_id=_env_int('MIMJAX_PROCESS_ID', None))
    if not 0 <= kwargs['process_id'] < kwargs['num_processes']:
      raise errors.Invalid(f'MIMJAX_PROCESS_ID={kwargs["process_id"]} is not '
                           f'in 0 ... MIMJAX_NUM_PROCESSES-1 = '
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
    raise errors.Invalid(f'{name}={value!r} is not a whole number') from None


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
