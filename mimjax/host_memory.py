"""glibc malloc tunables for XLA:CPU's host buffers.

XLA:CPU allocates a step's large buffers (the ViT-B/16 MAE step at batch
16: 2.3 GiB of temporaries) on every call and frees them after it. With
glibc's defaults each such buffer is a fresh mapping, and the kernel faults
in and zeroes every page the step first writes: about 626,000 faults and
over 1 s of system time per step with 4 KiB pages (docs/performance.md).
Two sets of tunables help, each on request and only where the CPU runs the
steps (with a GPU or TPU the host holds no step buffers):

  * huge pages (MIMJAX_HUGE_PAGES=1, as `make bench` sets it),
    `glibc.malloc.hugetlb=1`: malloc asks the kernel for 2 MiB pages, some
    300 times fewer faults (kernels in THP 'madvise' mode);
  * reuse (MIMJAX_REUSE_HOST_MEMORY=1): one malloc arena
    (`glibc.malloc.arena_max=1`), no mmap (`mmap_max=0`) and a trim
    threshold no heap reaches, so large blocks come from the one heap and
    what a step frees stays mapped for the next: a steady step faults no
    pages at all. The process keeps its peak memory, and all threads share
    the arena, which made XLA's compilation slower (docs/performance.md):
    a trade for long CPU runs.

glibc reads its tunables only when a process starts, so the command-line
entry points call `reexec_with_tunables()` first: where a tunable is asked
for and not set, the process starts again, once, with it set (a restart
that detaches a debugger or profiler, hence only on request).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

HUGE_PAGES = ('glibc.malloc.hugetlb=1',)
REUSE = ('glibc.malloc.arena_max=1', 'glibc.malloc.mmap_max=0',
         f'glibc.malloc.trim_threshold={2**62}')
THP_MODE = '/sys/kernel/mm/transparent_hugepage/enabled'


def _glibc_version() -> tuple[int, int] | None:
  try:
    found = re.search(r'(\d+)\.(\d+)', os.confstr('CS_GNU_LIBC_VERSION'))
  except (AttributeError, ValueError, OSError):
    return None
  return (int(found[1]), int(found[2])) if found else None


def _thp_mode() -> str | None:
  """The kernel's transparent huge page mode: 'always', 'madvise' or
  'never' (the bracketed word in THP_MODE); None where there is none."""
  try:
    with open(THP_MODE) as f:
      found = re.search(r'\[(\w+)\]', f.read())
  except OSError:
    return None
  return found[1] if found else None


def _cpu_runs_steps(environ) -> bool:
  """Whether jax will run on the CPU: JAX_PLATFORMS names it first, or,
  unset, no accelerator plugin (jax_plugins.*, libtpu) is installed."""
  platforms = environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not any(importlib.util.find_spec(name) is not None
                 for name in ('jax_plugins', 'libtpu'))


def missing(environ, glibc: tuple[int, int] | None, thp: str | None,
            on_cpu: bool) -> list[str]:
  """The tunables to restart with, only with glibc and where the CPU runs
  the steps: huge pages where MIMJAX_HUGE_PAGES=1 asks for them, with
  glibc >= 2.35 (which has the tunable) on a kernel that gives them on
  request ('madvise'; 'always' gives them unasked); reuse where
  MIMJAX_REUSE_HOST_MEMORY=1 asks for it; neither where GLIBC_TUNABLES
  already sets it.
  """
  if glibc is None or not on_cpu:
    return []
  wanted = []
  if (environ.get('MIMJAX_HUGE_PAGES') == '1' and glibc >= (2, 35)
      and thp == 'madvise'):
    wanted += HUGE_PAGES
  if environ.get('MIMJAX_REUSE_HOST_MEMORY') == '1':
    wanted += REUSE
  have = {t.split('=')[0] for t in environ.get('GLIBC_TUNABLES', '').split(':')}
  return [t for t in wanted if t.split('=')[0] not in have]


def reexec_with_tunables() -> None:
  """Starts this program again with the `missing` tunables; returns where
  none is missing. Call it first thing in a program's main block, never
  from a library function (it replaces the process)."""
  argv = getattr(sys, 'orig_argv', [])
  if len(argv) < 2 or argv[1] == '-':
    return
  tunables = missing(os.environ, _glibc_version(), _thp_mode(),
                     _cpu_runs_steps(os.environ))
  if not tunables:
    return
  have = os.environ.get('GLIBC_TUNABLES')
  env = dict(os.environ,
             GLIBC_TUNABLES=':'.join(([have] if have else []) + tunables))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, env)
