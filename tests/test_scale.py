"""Sharding modes on 8 simulated CPU devices: same math, FSDP memory."""

import json
import os
import re
import subprocess
import sys

from fast_jit import fast_xla_flags

HERE = os.path.dirname(os.path.abspath(__file__))
EIGHT = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3'}


def _python(args, env):
  result = subprocess.run(
      [sys.executable, *args], capture_output=True, text=True, timeout=900,
      env={**os.environ, **env, 'PYTHONPATH': HERE}, cwd=HERE)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_meshes_match_single_device():
  # Fast-compiling XLA (tests/fast_jit.py) for its 12 programs: the meshes
  # and the single device are compiled alike, and compared with each other.
  env = dict(EIGHT, XLA_FLAGS=fast_xla_flags(EIGHT['XLA_FLAGS']))
  results = json.loads(_python([os.path.join(HERE, 'mesh_equivalence.py')],
                               env))
  assert len(results) == 10
  for name, r in results.items():
    assert r['loss_diff'] < 1e-5, (name, r)
    assert r['param_diff'] < 1e-5, (name, r)


def test_fsdp_over_8_shards_params_and_optimizer():
  code = (
      'import json;'
      'from mimjax.tools import memory;'
      'from tiny_config import tiny_config;'
      'c = tiny_config(None, mesh=(1, 8, 1), eval_batch_size=96);'
      # ViT-S: with tiny widths the (replicated) biases would dominate.
      'c.model.size, c.model.scan = "S", True;'
      'print(json.dumps(memory.check(c)))')
  r = json.loads(_python(['-c', code], EIGHT).strip().splitlines()[-1])
  assert r['devices'] == 8
  for part in ('params', 'opt_state'):
    assert r[f'{part}_per_device'] <= r[f'{part}_total'] / 8 * 1.05, r



def test_remat_recomputes_the_forward_pass():
  """model.remat reaches the compiled step: every GELU (erf) runs twice
  (the CPU backend cannot show the memory it saves; docs/scaling.md)."""
  from mimjax.tools import memory  # pylint: disable=g-import-not-at-top
  from tiny_config import tiny_config  # pylint: disable=g-import-not-at-top
  counts = []
  for remat in (False, True):
    c = tiny_config(None, mesh=(1, 1, 1))
    c.model.remat = remat
    text = memory.compile_step(c)[0].as_text()
    counts.append(len(re.findall(r' erf\(', text)))
  assert counts[0] > 0 and counts[1] == 2 * counts[0], counts


def test_memcheck_command():
  run = lambda *flags: subprocess.run(
      [sys.executable, '-m', 'mimjax.tools.memcheck', '--devices=4',
       f'--config={HERE}/tiny_config.py', *flags], capture_output=True,
      text=True, timeout=300, env={**os.environ, **EIGHT},
      cwd=os.path.dirname(HERE))
  ok = run('--config.mesh=(2,2,1)', '--config.model.remat=True')
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert ("pretrain step compiled for 4 devices, mesh {'data': 2, 'fsdp': 2, "
          "'tensor': 1}") in ok.stdout
  for part in ('parameters', 'optimizer state', 'XLA temp',
               'no saving from model.remat'):
    assert part in ok.stdout, ok.stdout
  bad = run('--config.mesh=(3,1,1)')
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1] == (
      "memcheck: error: mesh {'data': 3, 'fsdp': 1, 'tensor': 1} has 3 "
      'devices, but 4 are present')
