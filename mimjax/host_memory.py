"""Transparent huge pages for XLA:CPU's host buffers.

XLA:CPU maps a step's large buffers afresh on every call, and with 4 KiB
pages the kernel faults on each page the step first writes: the ViT-B/16
MAE step at batch 16 took about 626,000 page faults and over 1 s of system
time per step (docs/performance.md). glibc's malloc asks the kernel for
transparent huge pages when its tunable `glibc.malloc.hugetlb=1` is set, but
reads its tunables only when a process starts. So the command-line entry
points call `reexec_with_huge_pages()` first: where the tunable would help
and is not set, the process starts again, once, with it set.

MIMJAX_HUGE_PAGES=0 turns this off.
"""

from __future__ import annotations

import os
import re
import sys

TUNABLE = 'glibc.malloc.hugetlb=1'
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


def wanted(environ, glibc: tuple[int, int] | None, thp: str | None) -> bool:
  """Whether to restart with the tunable: glibc >= 2.35 (which has it), a
  kernel that gives huge pages on request ('madvise'; 'always' gives them
  unasked), the tunable not set yet, and no MIMJAX_HUGE_PAGES=0."""
  return (environ.get('MIMJAX_HUGE_PAGES', '1') != '0'
          and glibc is not None and glibc >= (2, 35) and thp == 'madvise'
          and 'glibc.malloc.hugetlb' not in environ.get('GLIBC_TUNABLES', ''))


def reexec_with_huge_pages() -> None:
  """Starts this program again with glibc's huge-page tunable, where
  `wanted`; returns where not. Call it first thing in a program's main
  block, never from a library function (it replaces the process)."""
  argv = getattr(sys, 'orig_argv', [])
  if (len(argv) < 2 or argv[1] == '-' or
      not wanted(os.environ, _glibc_version(), _thp_mode())):
    return
  tunables = os.environ.get('GLIBC_TUNABLES')
  env = dict(os.environ,
             GLIBC_TUNABLES=f'{tunables}:{TUNABLE}' if tunables else TUNABLE)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, env)
