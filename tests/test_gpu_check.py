"""benchmarks/gpu_check.sh --tiny: the GPU check's code runs on CPU.

No speed is asserted: on CPU the numbers mean nothing, and MFU is n/a.
Where torch or transformers is missing the peer is skipped with a line.
"""

import importlib.util
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_PEER = all(importlib.util.find_spec(m) for m in ('torch', 'transformers'))


def test_gpu_check_tiny_runs_on_cpu():
  env = {**os.environ, 'PYTHON': sys.executable, 'JAX_PLATFORMS': 'cpu',
         'CUDA_VISIBLE_DEVICES': '', 'TF_CPP_MIN_LOG_LEVEL': '3'}
  env.pop('GPU_CHECK_TINY', None)
  result = subprocess.run(
      ['bash', os.path.join(REPO, 'benchmarks', 'gpu_check.sh'), '--tiny',
       '--profile=1'],
      capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
  out = result.stdout
  assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
  assert re.search(r'^mimjax: [\d.]+ img/s \(median of 3 steps', out, re.M), out
  assert re.search(r'^mimjax: model FLOPs .* MFU n/a', out, re.M), out
  assert 'mimjax: cuDNN attention: n/a (cpu)' in out, out
  assert 'mimjax: imports no tensorflow, tfds, clu or ml_collections' in out
  assert 'all float32: yes' in out, out
  # --profile: the traced step's operations, summed per kind (on CPU, the
  # host threads' XLA operations).
  assert re.search(r'^mimjax: profile of 1 steps', out, re.M), out
  assert re.search(r'^mimjax:   host: [\d.]+ ms per step in \d+ kinds', out,
                   re.M), out
  assert re.search(r'^mimjax: +[\d.]+ +[\d.]+% +\d+  \w', out, re.M), out
  if HAVE_PEER:
    assert re.search(r'^peer: [\d.]+ img/s', out, re.M), out
    assert re.search(r'^peer: model FLOPs .* MFU n/a', out, re.M), out
    assert re.search(r'mimjax/PyTorch: [\d.]+x', out), out
  else:
    assert 'peer (HF PyTorch): skipped: torch/transformers not importable' in (
        out), out
  assert re.search(r'target MFU >= 50%: n/a', out), out
  assert re.search(r'target mimjax/PyTorch >= 1.5x: ([\d.]+x )?n/a', out), out
