"""The benchmarks' timing loops (run.py, gpu_check.py): timed steps after
warm-up ones, and the kernel's share of the process while they ran."""

from __future__ import annotations

import resource
import statistics
import time


def _timed(step) -> tuple[float, float, int]:
  """Seconds of one blocking `step()`, and its system seconds and minor page
  faults (getrusage; docs/performance.md)."""
  before = resource.getrusage(resource.RUSAGE_SELF)
  start = time.perf_counter()
  step()
  seconds = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_SELF)
  return seconds, after.ru_stime - before.ru_stime, (after.ru_minflt -
                                                      before.ru_minflt)


def _summary(calls: list[tuple[float, float, int]]
             ) -> tuple[float, list[float], dict]:
  times = [seconds for seconds, _, _ in calls]
  host = dict(sys_s_per_step=sum(s for _, s, _ in calls) / len(calls),
              page_faults_per_step=round(sum(f for _, _, f in calls) /
                                         len(calls)))
  return statistics.median(times), times, host


def median_step(step, warmup: int, steps: int
                ) -> tuple[float, list[float], dict]:
  """Median seconds of `steps` calls of `step()` (which blocks) after
  `warmup` untimed ones; all timed seconds; and the process's system time
  and minor page faults per timed step."""
  for _ in range(warmup):
    step()
  return _summary([_timed(step) for _ in range(steps)])


def taking_turns(steps: dict, warmup: int, timed: int, per_turn: int = 2
                 ) -> tuple[dict, list[dict]]:
  """Several steps (name -> blocking callable) timed in turns, so that a
  machine whose speed drifts over minutes slows them alike: `warmup` untimed
  calls of each, then rounds in which each, in order, makes one untimed call
  (the switch: on CPU the first XLA step after PyTorch ones is seconds
  slower, as `make bench`'s `switch` line shows; none when a step has no
  one to take turns with) and `per_turn` timed ones, until each has made `timed`.

  Returns name -> median_step's triple plus the seconds of its untimed
  switch calls, and per round name -> the median of its timed seconds.
  """
  for step in steps.values():
    for _ in range(warmup):
      step()
  calls = {name: [] for name in steps}
  switches = {name: [] for name in steps}
  rounds = []
  for first in range(0, timed, per_turn):
    count = min(per_turn, timed - first)
    this_round = {}
    for name, step in steps.items():
      if len(steps) > 1:
        switches[name].append(_timed(step)[0])
      mine = [_timed(step) for _ in range(count)]
      calls[name] += mine
      this_round[name] = statistics.median(s for s, _, _ in mine)
    rounds.append(this_round)
  return {name: (*_summary(c), switches[name])
          for name, c in calls.items()}, rounds
