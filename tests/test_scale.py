"""Sharding modes on 8 simulated CPU devices: same math, FSDP memory."""

import json
import os
import subprocess
import sys

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
  results = json.loads(_python([os.path.join(HERE, 'mesh_equivalence.py')],
                               EIGHT))
  assert len(results) == 10
  for name, r in results.items():
    assert r['loss_diff'] < 1e-5, (name, r)
    assert r['param_diff'] < 1e-5, (name, r)


def test_fsdp_over_8_shards_params_and_optimizer():
  code = (
      'import json, sys; sys.argv += ["--devices=8"];'
      'from mimjax.tools import memcheck;'
      'from tiny_config import tiny_config;'
      'c = tiny_config(None, mesh=(1, 8, 1), eval_batch_size=96);'
      # ViT-S: with tiny widths the (replicated) biases would dominate.
      'c.model.size, c.model.scan = "S", True;'
      'print(json.dumps(memcheck.check(c)))')
  r = json.loads(_python(['-c', code], EIGHT).strip().splitlines()[-1])
  assert r['devices'] == 8
  for part in ('params', 'opt_state'):
    assert r[f'{part}_per_device'] <= r[f'{part}_total'] / 8 * 1.05, r
