"""Pre-emption: SIGTERM or SIGINT ends a run at a step every process agrees
on, with that step saved.

A TPU VM maintenance event, a spot or preemptible reclaim and SLURM's
`--signal=TERM@...` all send SIGTERM some time before the machine goes.
`install()` (the command line calls it) catches SIGTERM and SIGINT. The
training loop asks `reached(step)` after every step; where it says yes, the
loop saves that step, waits for the save, and raises `Preempted`, which
the command line turns into one line and exit code `EXIT_CODE`. Running the
same command again resumes from the saved step.

With several processes, JAX's pre-emption service (started by
jax.distributed.initialize) listens for SIGTERM on each process, tells the
others, and `multihost_utils.reached_preemption_sync_point` returns True on
every process at the same step (the largest step any of them had reached,
plus one). SIGINT is passed on to it as SIGTERM. A second signal ends the
process at once, as it would without mimjax.
"""

from __future__ import annotations

import os
import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils

from mimjax import errors

EXIT_CODE = 75  # EX_TEMPFAIL in sysexits.h: temporary; run again to resume

_received: list[str] = []  # names of the signals this process caught
_installed = False


Preempted = errors.Preempted


def stopped_at(stage: str, step: int, total: int, where: str) -> Preempted:
  return Preempted(f'{stage}: stopped at step {step} of {total} on a '
                   f'pre-emption notice{_why()}; step {step} is saved in '
                   f'{where}; run the same command again to resume')


def stopped_after(stage: str) -> Preempted:
  return Preempted(f'stopped after {stage} on a pre-emption notice{_why()}; '
                   'run the same command again to carry on')


def _why() -> str:
  return f' ({", ".join(_received)})' if _received else ''


def _multi() -> bool:
  return jax.process_count() > 1


def install():
  """Catches SIGTERM and SIGINT for the rest of the program (main thread
  only; elsewhere a no-op)."""
  global _installed
  if _installed or threading.current_thread() is not threading.main_thread():
    return
  _installed = True
  caught = (signal.SIGINT,) if _multi() else (signal.SIGINT, signal.SIGTERM)
  for signum in caught:  # with several processes JAX's service has SIGTERM
    signal.signal(signum, _note)


def _note(signum, frame):
  """The first signal is noted (and with several processes passed on to
  JAX's service as SIGTERM); a second one acts as if mimjax had not
  caught it."""
  del frame
  if _received:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if not _multi():
      signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.raise_signal(signum)
    return
  name = signal.Signals(signum).name
  _received.append(name)
  logging.warning('%s received: stopping after this step, with it saved '
                  '(again to stop at once)', name)
  if _multi():
    os.kill(os.getpid(), signal.SIGTERM)


def requested() -> bool:
  """Whether this process caught a signal (for work between stages)."""
  return bool(_received) and not _multi()


def reached(step: int) -> bool:
  """Whether to save and stop after `step`. Every process must call it at
  every step of a stage, from the same first step on."""
  if not _multi():
    return bool(_received)
  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:  # jax_enable_preemption_service is off
    return False
