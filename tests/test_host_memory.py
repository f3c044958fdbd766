"""Entry points restart once with glibc's huge-page tunable, where it helps,
and XLA:CPU's fresh buffers then fault far fewer pages."""

import os
import subprocess
import sys

import pytest

from mimjax import host_memory

ON_THIS_MACHINE = host_memory.wanted(
    {}, host_memory._glibc_version(), host_memory._thp_mode())  # pylint: disable=protected-access

# Writes a fresh 196 MB buffer in each of 5 calls, then prints the minor
# page faults those calls took and the tunables it ran with.
PROGRAM = '''
import os, resource, jax, jax.numpy as jnp
from mimjax import host_memory
host_memory.reexec_with_huge_pages()
fill = jax.jit(lambda x: jax.lax.optimization_barrier(
    jnp.tile(x, (3000, 1))).sum())
x = jnp.ones((16, 1024))
fill(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  fill(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
      os.environ.get('GLIBC_TUNABLES'))
'''


def _run(**env):
  base = {k: v for k, v in os.environ.items()
          if k not in ('GLIBC_TUNABLES', 'MIMJAX_HUGE_PAGES')}
  out = subprocess.run([sys.executable, '-c', PROGRAM], env={**base, **env},
                       capture_output=True, text=True, check=True, timeout=300)
  faults, tunables = out.stdout.split()
  return int(faults), tunables


def test_wanted_only_where_glibc_and_the_kernel_can_and_not_yet_set():
  assert host_memory.wanted({}, (2, 35), 'madvise')
  assert not host_memory.wanted({}, (2, 34), 'madvise')  # no such tunable
  assert not host_memory.wanted({}, None, 'madvise')  # not glibc
  assert not host_memory.wanted({}, (2, 39), 'never')
  assert not host_memory.wanted({}, (2, 39), 'always')  # huge pages unasked
  assert not host_memory.wanted({}, (2, 39), None)
  assert not host_memory.wanted({'MIMJAX_HUGE_PAGES': '0'}, (2, 39),
                                'madvise')
  assert not host_memory.wanted(
      {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}, (2, 39), 'madvise')
  assert host_memory.wanted({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'},
                            (2, 39), 'madvise')


@pytest.mark.skipif(not ON_THIS_MACHINE,
                    reason='glibc < 2.35 or kernel THP not "madvise"')
def test_the_restarted_program_faults_far_fewer_pages():
  plain_faults, plain_tunables = _run(MIMJAX_HUGE_PAGES='0')
  faults, tunables = _run(GLIBC_TUNABLES='glibc.malloc.arena_max=8')
  assert plain_tunables == 'None'
  assert tunables == 'glibc.malloc.arena_max=8:glibc.malloc.hugetlb=1'
  assert faults * 2 < plain_faults, (faults, plain_faults)
