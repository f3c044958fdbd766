"""benchmarks/run.py (`make bench`): the FLOP count it reports
(mimjax.flops), and a --quick run end to end. No speed is asserted: only that every number is there and sane."""

import importlib.util
import json
import math
import os
import pathlib
import re
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


def test_ab_step_times_variants_of_the_same_step():
  """benchmarks/ab_step.py --quick --scan: the variants compute the same
  loss (the matmul library and attention's chunks change no result beyond
  rounding), each with its compile time and what its compiled step is made
  of, and a ratio line is printed; no speed is asserted. Each variant
  reaches the compiled step: `eigen` leaves no matmul to YNNPACK, where the
  default step gives it some; `chunked_attention` recomputes its products;
  `fast_compile` fuses less; and --scan reaches the recipe."""
  variants = ('default', 'eigen', 'chunked_attention', 'fast_compile')
  proc = subprocess.run(
      [sys.executable, str(ROOT / 'benchmarks' / 'ab_step.py'), '--quick',
       '--scan', '--batch=4', '--timed=2', *variants],
      cwd=ROOT, env=fast_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  medians = [l for l in lines if ' median ' in l]
  losses = [float(l.split('loss ')[1].split(',')[0]) for l in medians]
  assert len(losses) == 4 and losses == pytest.approx([losses[0]] * 4,
                                                      rel=1e-4)
  assert all(_positive(float(re.search(r', compile ([\d.]+) s', l)[1]))
             for l in medians), proc.stdout
  for name in variants[1:]:
    ratio = next(l for l in lines if f'{name} against default:' in l)
    assert _positive(float(ratio.split(':')[1].split('x')[0])), proc.stdout
  anatomies = [lines[lines.index(median) + 1] for median in medians]
  assert all(a.split()[0] == 'scanned:' for a in anatomies), anatomies
  anatomy = {name: dict(zip(('loops', 'matmuls', 'in_ynnpack'),
                            map(int, re.findall(r'\d+', a))))
             for name, a in zip(variants, anatomies)}
  assert anatomy['chunked_attention']['matmuls'] > anatomy['default'][
      'matmuls'] > 0, anatomy
  assert anatomy['fast_compile']['loops'] > anatomy['default']['loops']
  if not anatomy['default']['in_ynnpack']:
    pytest.skip('this jaxlib runs no matmul in YNNPACK')
  assert anatomy['eigen']['in_ynnpack'] == 0, anatomy


def test_peer_work_variant_compiles_the_step_without_the_peers_skips(
    monkeypatch):
  """ab_step's peer_work overrides reach the compiled fine-tuning step: its
  random draws (mixup/cutmix's Beta, drop path's masks, each a while loop
  on CPU) are gone, and the peer's line names what it skips."""
  monkeypatch.syspath_prepend(str(ROOT / 'benchmarks'))
  import ab_step  # pylint: disable=g-import-not-at-top
  loops = {name: ab_step.variant_step(name, 'finetune', 4, True)[3][
      'compiled'].as_text().count(' while(')
           for name in ('default', 'peer_work')}
  assert loops['default'] > loops['peer_work'] == 0, loops
  assert ab_step.bench_lib.peer_skips() == (
      'mixup, cutmix, drop path, label smoothing and layer decay')


def test_chunked_attention_tried_is_attention(monkeypatch):
  """ab_step's chunked_attention (tried, not kept) computes vit.attend's
  values and gradients, in chunks of two rows here."""
  monkeypatch.syspath_prepend(str(ROOT / 'benchmarks'))
  import attention_chunks  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mimjax.models import vit  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(attention_chunks, 'CHUNK_BYTES', 2 * 2 * 9 * 9 * 4)
  q, k, v, cotangent = (jax.random.normal(key, (6, 2, 9, 4)) * 2
                        for key in jax.random.split(jax.random.key(0), 4))
  chunked = attention_chunks.chunked_attend
  assert str(jax.make_jaxpr(chunked)(q, k, v)).count('dot_general') == 6
  for got, want in zip(*(
      jax.value_and_grad(lambda *x, fn=fn: (fn(*x) * cotangent).sum(),
                         argnums=(0, 1, 2))(q, k, v)
      for fn in (chunked, vit.attend))):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_matmul_rate_counts_each_products_flops(monkeypatch):
  monkeypatch.syspath_prepend(str(ROOT / 'benchmarks'))
  import matmul_rate  # pylint: disable=g-import-not-at-top
  assert matmul_rate.flop('square') == 2 * 2048**3
  assert matmul_rate.flop('mlp') == 2 * 16 * 197 * 768 * 3072
  assert matmul_rate.flop('weight_grad') == 2 * 16 * 197 * 768 * 3072
  assert matmul_rate.flop('scores') == 2 * 16 * 12 * 197 * 64 * 197
  assert matmul_rate.flop('encoder_mlp') == 2 * 16 * 50 * 768 * 3072
  assert matmul_rate.flop('decoder_mlp') == 2 * 16 * 197 * 512 * 2048


def test_matmul_rate_passes_its_settling_pause_to_the_turns(monkeypatch):
  monkeypatch.syspath_prepend(str(ROOT / 'benchmarks'))
  import matmul_rate  # pylint: disable=g-import-not-at-top
  settles = []

  def turns(steps, warmup, timed, settle_s=0.0):
    settles.append(settle_s)
    return {name: (1.0, [1.0], {}, []) for name in steps}, []

  monkeypatch.setattr(matmul_rate, 'taking_turns', turns)
  matmul_rate.main(['--shapes=scores', '--dtypes=float32', '--settle=0.7'])
  matmul_rate.main(['--shapes=scores', '--dtypes=float32'])
  assert settles == [0.7, 0.5]


def test_matmul_rate_times_each_library_in_turns():
  """benchmarks/matmul_rate.py: one line per shape and dtype, a positive
  rate for each library (XLA's Eigen always; torch when installed; NumPy
  in float32 only); no speed is asserted."""
  proc = subprocess.run(
      [sys.executable, str(ROOT / 'benchmarks' / 'matmul_rate.py'),
       '--shapes=mlp', '--timed=2'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = {l.split()[1]: dict(re.findall(r'(jax \w+|torch|numpy) +([\d.]+)', l))
          for l in proc.stdout.splitlines() if l.startswith('  mlp ')}
  assert set(rows) == {'float32', 'bfloat16'}, proc.stdout
  libraries = {'jax Eigen'} | ({'torch'} if _importable('torch') else set())
  assert libraries <= set(rows['bfloat16']), proc.stdout
  assert libraries | {'numpy'} <= set(rows['float32']), proc.stdout
  assert 'numpy' not in rows['bfloat16']
  assert all(_positive(float(rate)) for row in rows.values()
             for rate in row.values()), proc.stdout


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


def test_attention_rate_times_each_shape_in_turns():
  """benchmarks/attention_rate.py --quick: for each shape, a positive time
  a pass and a step for mimjax, and for PyTorch's two passes when torch is
  installed; no speed is asserted."""
  proc = subprocess.run(
      [sys.executable, str(ROOT / 'benchmarks' / 'attention_rate.py'),
       '--quick', '--timed=2'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  headers = [l for l in lines if l.startswith('  ') and l.endswith(':')]
  shapes = [l.split()[0] for l in headers]
  assert shapes == ['decoder', 'encoder', 'finetune'], proc.stdout
  times = re.findall(r'^    (mimjax|torch sdpa|torch bmm) +([\d.]+) ms a pass, '
                     r'+([\d.]+) ms a step$', proc.stdout, re.M)
  libraries = ['mimjax'] + (['torch sdpa', 'torch bmm']
                            if _importable('torch') else [])
  assert [t[0] for t in times] == libraries * 3, proc.stdout
  assert all(float(a) > 0 and float(b) > 0 for _, a, b in times), proc.stdout
  if _importable('torch'):  # the same function in both frameworks
    assert all(float(re.search(r'at most ([\d.e+-]+)\)', h).group(1)) < 1e-4
               for h in headers), proc.stdout
