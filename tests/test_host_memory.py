"""Entry points restart once with glibc's malloc tunables, on request and
only where the CPU runs the steps: XLA:CPU's fresh buffers then fault far
fewer pages (huge pages), or none once the step is steady (reuse)."""

import os
import subprocess
import sys

import pytest

from mimjax import host_memory

GLIBC = host_memory._glibc_version()  # pylint: disable=protected-access
ASK_HUGE = {'MIMJAX_HUGE_PAGES': '1'}
HUGE_PAGES_HERE = bool(host_memory.missing(ASK_HUGE, GLIBC,
                                           host_memory._thp_mode(), True))  # pylint: disable=protected-access

# Writes a fresh 196 MB buffer in each of 5 calls, then prints the minor
# page faults those calls took and the tunables it ran with.
PROGRAM = '''
import os, resource, jax, jax.numpy as jnp
from mimjax import host_memory
host_memory.reexec_with_tunables()
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
          if k not in ('GLIBC_TUNABLES', 'MIMJAX_HUGE_PAGES',
                       'MIMJAX_REUSE_HOST_MEMORY', 'JAX_PLATFORMS')}
  out = subprocess.run([sys.executable, '-c', PROGRAM], env={**base, **env},
                       capture_output=True, text=True, check=True, timeout=300)
  faults, tunables = out.stdout.split()
  return int(faults), tunables


def test_huge_pages_on_request_where_glibc_and_the_kernel_can_and_not_yet_set():
  def huge(environ, glibc, thp):
    return host_memory.missing({**ASK_HUGE, **environ}, glibc, thp,
                               on_cpu=True)
  assert huge({}, (2, 35), 'madvise') == ['glibc.malloc.hugetlb=1']
  assert not huge({}, (2, 34), 'madvise')  # no such tunable
  assert not huge({}, None, 'madvise')  # not glibc
  assert not huge({}, (2, 39), 'never')
  assert not huge({}, (2, 39), 'always')  # huge pages unasked
  assert not huge({}, (2, 39), None)
  assert not huge({'MIMJAX_HUGE_PAGES': '0'}, (2, 39), 'madvise')
  assert not huge({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}, (2, 39),
                  'madvise')
  assert huge({'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=8'}, (2, 39),
              'madvise')


def test_no_restart_unasked_or_where_an_accelerator_runs_the_steps():
  """The restart detaches a debugger or profiler: opt-in, and never where
  the host holds no step buffers."""
  assert not host_memory.missing({}, (2, 39), 'madvise', on_cpu=True)
  both = {**ASK_HUGE, 'MIMJAX_REUSE_HOST_MEMORY': '1'}
  assert not host_memory.missing(both, (2, 39), 'madvise', on_cpu=False)


def test_reuse_on_request_where_the_cpu_runs_the_steps_and_not_yet_set():
  reuse, ask = list(host_memory.REUSE), {'MIMJAX_REUSE_HOST_MEMORY': '1'}
  assert not host_memory.missing({}, (2, 31), None, on_cpu=True)
  assert host_memory.missing(ask, (2, 31), None, on_cpu=True) == reuse
  assert host_memory.missing(ask, (2, 39), 'madvise', on_cpu=True) == reuse
  assert host_memory.missing({**ask, **ASK_HUGE}, (2, 39), 'madvise',
                             on_cpu=True) == ['glibc.malloc.hugetlb=1', *reuse]
  assert not host_memory.missing(ask, (2, 39), 'never', on_cpu=False)
  assert not host_memory.missing(ask, None, None, on_cpu=True)
  assert host_memory.missing(
      {**ask, 'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4'}, (2, 39), 'never',
      on_cpu=True) == reuse[1:]  # the user's arena_max stands
  # JAX_PLATFORMS decides where it is set.
  assert host_memory._cpu_runs_steps({'JAX_PLATFORMS': 'cpu'})  # pylint: disable=protected-access
  assert not host_memory._cpu_runs_steps({'JAX_PLATFORMS': 'cuda,cpu'})  # pylint: disable=protected-access


@pytest.mark.skipif(not HUGE_PAGES_HERE,
                    reason='glibc < 2.35 or kernel THP not "madvise"')
def test_the_restarted_program_faults_far_fewer_pages():
  plain_faults, plain_tunables = _run(JAX_PLATFORMS='cpu')  # unasked
  faults, tunables = _run(GLIBC_TUNABLES='glibc.malloc.tcache_count=8',
                          JAX_PLATFORMS='cpu', **ASK_HUGE)
  assert plain_tunables == 'None'
  assert tunables == 'glibc.malloc.tcache_count=8:glibc.malloc.hugetlb=1'
  assert faults * 2 < plain_faults, (faults, plain_faults)


@pytest.mark.skipif(GLIBC is None, reason='not glibc')
def test_reused_host_memory_faults_no_pages_once_steady():
  plain_faults, _ = _run(JAX_PLATFORMS='cpu')
  faults, tunables = _run(JAX_PLATFORMS='cpu', MIMJAX_REUSE_HOST_MEMORY='1')
  assert tunables == ':'.join(host_memory.REUSE)
  # 5 calls of a 196 MB buffer: 4 KiB pages fault ~240,000 times afresh.
  assert plain_faults > 10_000, plain_faults
  assert faults < plain_faults / 100, (faults, plain_faults)
