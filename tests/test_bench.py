"""benchmarks/run.py (`make bench`): the FLOP count it reports
(mimjax.flops), and a --quick run end to end. No speed is asserted: only that every number is there and sane."""

import importlib.util
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys

import pytest

from fast_jit import fast_env
from mimjax import flops

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'benchmarks' / 'run.py'


def _importable(*names):
  return all(importlib.util.find_spec(n) is not None for n in names)


def test_flops_of_vit_b16_match_the_published_count():
  # ViT-B/16 at 224px: 17.6 GMACs forward (DeiT, fvcore), i.e. 35.2 GFLOPs.
  forward = flops.classifier_flops('B', 16)['forward']
  assert forward == pytest.approx(35.2e9, rel=0.01)
  # MAE: the encoder sees 49 + 1 of 197 tokens; with the 512x8 decoder the
  # step is well under the supervised one.
  assert 0.4 < flops.mae_flops('B', 16)['train'] / (3 * forward) < 0.7


def test_peak_table():
  assert flops.peak_tflops('NVIDIA H100 80GB HBM3') == 989.0
  assert flops.peak_tflops('NVIDIA H200') == 989.0
  assert flops.peak_tflops('NVIDIA A100-SXM4-40GB') == 312.0
  assert flops.peak_tflops('TPU v5 lite') == 197.0
  assert flops.peak_tflops('TPU v5p') == 459.0
  assert flops.peak_tflops('TPU v4') == 275.0
  assert flops.peak_tflops('cpu') is None


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_run(tmp_path):
  out = tmp_path / 'bench.json'
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), '--quick', '--out', str(out)],
      cwd=ROOT, env=fast_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

  def strict(name):
    raise ValueError(f'{name} in the JSON record')
  record = json.loads(out.read_text(), parse_constant=strict)
  assert record['quick'] is True
  for key in ('jax', 'jaxlib', 'flax'):
    assert record['versions'][key]
  assert record['device']['count'] >= 1 and record['device']['kind']
  cpu = record['host_cpu']
  assert cpu['model'] and cpu['cores'] >= 1
  isa = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16')
  if os.path.exists('/proc/cpuinfo'):  # the kernel's own list of flags
    flags = pathlib.Path('/proc/cpuinfo').read_text().split()
    assert cpu['isa'] == [name for name in isa if name in flags]
  described = ', '.join(n if n in cpu['isa'] else f'no {n}' for n in isa)
  assert (f'host CPU {cpu["model"]}, {cpu["cores"]} cores; {described}'
          in proc.stdout), proc.stdout[:1000]
  configs = record['configurations']
  names = [c['name'] for c in configs]
  assert names[:2] == ['ViT-B/16 MAE pre-train', 'ViT-B/16 fine-tune']
  has_peer = _importable('torch', 'transformers')
  has_tf = _importable('tensorflow', 'tensorflow_datasets')
  for c in configs:
    for key in ('img_per_s', 'step_s', 'compile_unrolled_s',
                'compile_scanned_s', 'lower_unrolled_s', 'lower_scanned_s',
                'model_flops_per_step', 'achieved_tflops'):
      assert _positive(c[key]), (c['name'], key, c[key])
    assert len(c['step_s_all']) >= 5
    assert c['host']['sys_s_per_step'] >= 0
    assert c['host']['page_faults_per_step'] >= 0
    assert c['timed'] in ('unrolled', 'scanned')
    assert c['xla_flops_per_step'] is None or _positive(
        c['xla_flops_per_step'])
    assert c['compiled_gib'] is None or _positive(c['compiled_gib'])
    assert math.isfinite(c['loss'])
    if has_tf:
      assert _positive(c['input_img_per_s']), c['input_note']
    if has_peer:
      assert _positive(c['peer_img_per_s']), c['peer_note']
      assert c['ratio'] == pytest.approx(c['img_per_s'] / c['peer_img_per_s'])
      assert c['peer_host']['page_faults_per_step'] >= 0
      assert len(c['peer_step_s_all']) == len(c['step_s_all'])
      # Turns of two timed steps each: one ratio per round.
      assert len(c['round_ratios']) == math.ceil(len(c['step_s_all']) / 2)
      assert all(_positive(x) for x in c['round_ratios'])
      assert len(c['switch_step_s_all']) == len(c['round_ratios'])
      assert len(c['peer_switch_step_s_all']) == len(c['round_ratios'])
    else:
      assert c['peer_img_per_s'] is None and c['ratio'] is None
      assert c['round_ratios'] is None and c['switch_step_s_all'] is None
  ratio_lines = [l for l in proc.stdout.splitlines()
                 if l.strip().startswith('ratio mimjax/PyTorch: ')]
  if has_peer:
    assert len(ratio_lines) == len(configs), proc.stdout
    for line, c in zip(ratio_lines, configs):
      rounds = c['round_ratios']
      assert f'mean {statistics.mean(rounds):.2f}x ± ' in line, line
  else:
    assert not ratio_lines and 'PyTorch peer skipped' in proc.stdout
  assert proc.stdout.count(' page faults per step') == len(configs) * (
      2 if has_peer else 1)
  assert f'JSON record: {out}' in proc.stdout


def test_the_fine_tuning_peer_names_what_it_skips(monkeypatch):
  """run.PEER_SKIPS in words, as the fine-tuning peer's line prints them."""
  monkeypatch.syspath_prepend(str(ROOT / 'benchmarks'))
  import run  # pylint: disable=g-import-not-at-top
  assert run.peer_skips() == (
      'mixup, cutmix, drop path, label smoothing and layer decay')


def test_profile_step_sums_a_traced_step(tmp_path):
  """benchmarks/profile_step.py --quick: a table of operation kinds whose
  shares add up, and the wall time; no speed is asserted."""
  proc = subprocess.run(
      [sys.executable, str(ROOT / 'benchmarks' / 'profile_step.py'),
       '--quick', '--batch=4', '--steps=1', '--top=500',
       f'--trace_dir={tmp_path}'],
      cwd=ROOT, env=fast_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  total = next(l for l in lines if l.strip().startswith('host: '))
  assert float(total.split()[1]) > 0
  rows = [l.split() for l in lines
          if len(l.split()) == 4 and l.split()[1].endswith('%')]
  # Every kind is one row (a name without spaces); each share is printed
  # rounded to 0.1%.
  assert int(total.split()[-2]) == len(rows), proc.stdout
  assert sum(float(r[1][:-1]) for r in rows) == pytest.approx(
      100, abs=0.05 * len(rows))
  wall = next(l for l in lines if 'wall time per step:' in l)
  assert float(wall.split(':')[1].split()[0]) > 0


def test_profile_step_traces_a_compilation(tmp_path):
  """profile_step.py --compile: the compile time and XLA's compile events,
  none of them a step's operations."""
  proc = subprocess.run(
      [sys.executable, str(ROOT / 'benchmarks' / 'profile_step.py'),
       '--quick', '--batch=4', '--compile', '--scan', '--top=500',
       f'--trace_dir={tmp_path}'],
      cwd=ROOT, env=fast_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  took = float(next(l for l in lines if 'scanned step took' in l).split(
      'took ')[1].split(' s')[0])
  rows = {l.split()[2]: float(l.split()[0]) for l in lines
          if len(l.split()) == 3 and l.split()[1].isdigit()}
  assert 0 < rows['PjRtCpuClient::Compile'] <= took, proc.stdout
  assert not [event for event in rows if event.endswith('_fusion')], rows
