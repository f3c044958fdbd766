"""The benchmarks' one timing loop (run.py, gpu_check.py): timed steps after
warm-up ones, and the kernel's share of the process while they ran."""

from __future__ import annotations

import resource
import statistics
import time


def median_step(step, warmup: int, steps: int
                ) -> tuple[float, list[float], dict]:
  """Median seconds of `steps` calls of `step()` (which blocks) after
  `warmup` untimed ones; all timed seconds; and the process's system time
  and minor page faults per timed step (getrusage; docs/performance.md)."""
  for _ in range(warmup):
    step()
  times = []
  before = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  after = resource.getrusage(resource.RUSAGE_SELF)
  host = dict(sys_s_per_step=(after.ru_stime - before.ru_stime) / steps,
              page_faults_per_step=round(
                  (after.ru_minflt - before.ru_minflt) / steps))
  return statistics.median(times), times, host
