"""benchmarks/gpu_check.sh --tiny: the GPU check's code runs on CPU.

No speed is asserted: on CPU the numbers mean nothing, and MFU is n/a.
Where torch or transformers is missing the peer is skipped with a line.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from fast_jit import fast_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_PEER = all(importlib.util.find_spec(m) for m in ('torch', 'transformers'))


def test_gpu_check_tiny_runs_on_cpu():
  # Fast-compiling XLA (tests/fast_jit.py): compile times are printed,
  # not judged.
  env = {**fast_env(), 'PYTHON': sys.executable, 'JAX_PLATFORMS': 'cpu',
         'CUDA_VISIBLE_DEVICES': '', 'TF_CPP_MIN_LOG_LEVEL': '3'}
  env.pop('GPU_CHECK_TINY', None)
  result = subprocess.run(
      ['bash', os.path.join(REPO, 'benchmarks', 'gpu_check.sh'), '--tiny',
       '--profile=1',
       '--variant=--batch=2 XLA_FLAGS=--xla_cpu_enable_fast_math=false'],
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
  # --variant: mimjax once more, in its own process, with the variant's
  # arguments (a batch of 2) and XLA flags.
  assert re.search(r"^gpu_check: variant '--batch=2 XLA_FLAGS=", out, re.M), out
  assert re.search(r'^mimjax: [\d.]+ img/s \(median of 3 steps, [\d.]+ '
                   r'ms/step, batch 2\)', out, re.M), out
  assert re.search(r"^  variant '--batch=2 .*': [\d.]+ img/s, MFU n/a, "
                   r'compile [\d.]+ s; [\d.]+x the first run', out, re.M), out


def test_gpu_check_variant_spec(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(REPO, 'benchmarks'))
  import gpu_check  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('XLA_FLAGS', '--a=1')
  extra, env = gpu_check.variant_run("--batch=8 XLA_FLAGS=--b=2 FOO='x y'")
  assert extra == ['--batch=8']
  assert env['XLA_FLAGS'] == '--a=1 --b=2' and env['FOO'] == 'x y'
  with pytest.raises(SystemExit, match="'oops' is neither"):
    gpu_check.variant_run('--batch=8 oops')


def test_gpu_check_rejects_a_bad_variant_before_running():
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', 'gpu_check.py'),
       '--tiny', '--variant=--batch=2 --bogus=1'],
      capture_output=True, text=True, timeout=60, cwd=REPO)
  assert result.returncode == 2, result.stdout + result.stderr
  assert 'unrecognized arguments: --bogus=1' in result.stderr
  assert 'gpu_check: ' not in result.stdout  # nothing ran
