"""Two processes on localhost: they train together, checkpoint, restart and
match a single process with the same number of devices; when one dies or
never starts, or the coordinator is unreachable, the others stop with one
clear line instead of hanging."""

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from fast_jit import fast_xla_flags
from mimjax import checkpoint
import mesh_equivalence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ['--config.mode=pretrain', '--config.mesh=(4,1,1)',
         '--config.pretrain.data.name=one_image', '--config.checkpoint_every=3',
         '--config.eval_batch_size=96']


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _launch(workdir, data_dir, steps, process_id=None, port=None, extra=()):
  """mimjax.main on tiny_config, alone or as one of two processes; XLA
  compiles fast (tests/fast_jit.py), alike in both kinds of run."""
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3', 'JAX_PLATFORMS': 'cpu',
         'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo'}
  if process_id is None:
    env['XLA_FLAGS'] = fast_xla_flags(
        '--xla_force_host_platform_device_count=4')
  else:
    env.update({'XLA_FLAGS': fast_xla_flags(
                    '--xla_force_host_platform_device_count=2'),
                'MIMJAX_COORDINATOR': f'localhost:{port}',
                'MIMJAX_NUM_PROCESSES': '2',
                'MIMJAX_PROCESS_ID': str(process_id),
                'MIMJAX_INIT_TIMEOUT': os.environ.get('MIMJAX_INIT_TIMEOUT',
                                                      '120'),
                'MIMJAX_HEARTBEAT_TIMEOUT': '10'})
  # A key given in `extra` replaces FLAGS' (tuple flags would append).
  given = {f.split('=')[0] for f in extra}
  cmd = [sys.executable, '-m', 'mimjax.main', f'--workdir={workdir}',
         f'--config={REPO}/tests/tiny_config.py:{data_dir}',
         *[f for f in FLAGS if f.split('=')[0] not in given],
         f'--config.pretrain.steps={steps}', '--verbosity=0', *extra]
  return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _two_processes(workdir, data_dir, steps, *extra, timeout=600):
  port = _free_port()
  procs = [_launch(workdir, data_dir, steps, i, port, extra) for i in range(2)]
  # Both pipes drained at once: a process blocked on a full pipe would stall
  # the other's collectives.
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    outputs = list(pool.map(lambda p: p.communicate(timeout=timeout)[0],
                            procs))
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


def test_two_processes_checkpoint_restart_match_one(tmp_path):
  data_dir = tmp_path / 'tfds'
  single = _launch(tmp_path / 'single', data_dir, 6)
  out = single.communicate(timeout=600)[0]
  assert single.returncode == 0, out[-3000:]

  # First one flat mesh, then (the default) each process one contiguous
  # block of the data axis, as hosts or TPU slices would be.
  _two_processes(tmp_path / 'multi', data_dir, 6, '--config.stop_at_step=3',
                 '--config.mesh_dcn=(1,1,1)')
  outputs = _two_processes(tmp_path / 'multi', data_dir, 6)
  assert any('resumed from step 3' in o for o in outputs), outputs[0][-2000:]
  assert ("split over slices or processes: {'data': 2, 'fsdp': 1, "
          "'tensor': 1}") in outputs[0], outputs[0][-2000:]

  ckpts = lambda d: str(d / 'pretrain' / 'checkpoints')
  a = checkpoint.load_state_params(ckpts(tmp_path / 'single'), step=6)
  b = checkpoint.load_state_params(ckpts(tmp_path / 'multi'), step=6)
  assert mesh_equivalence.max_difference(b, a) < 1e-5


def test_a_dead_worker_stops_the_other(tmp_path):
  data_dir = tmp_path / 'tfds'
  prepare = _launch(tmp_path / 'prepare', data_dir, 1)  # builds one_image
  out = prepare.communicate(timeout=600)[0]
  assert prepare.returncode == 0, out[-3000:]
  port = _free_port()
  procs = [_launch(tmp_path / 'run', data_dir, 100_000, i, port)
           for i in range(2)]
  ckpts = tmp_path / 'run' / 'pretrain' / 'checkpoints'
  deadline = time.time() + 300
  while not (ckpts.exists() and any(p.isdigit() for p in os.listdir(ckpts))):
    assert procs[0].poll() is None and time.time() < deadline
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGKILL)
  started = time.time()
  out = procs[0].communicate(timeout=240)[0]
  assert procs[0].returncode != 0
  # Either the survivor's next collective fails (mimjax's line), or, if it
  # was waiting elsewhere, the runtime's heartbeat check ends it first.
  assert ('mimjax: error: process 0 of 2 stops: a collective failed' in out or
          'JAX distributed service detected fatal errors' in out), out[-3000:]
  assert time.time() - started < 120


def _alone(tmp_path, process_id, port):
  """One process of a 2-process job whose partner never starts."""
  proc = _launch(tmp_path / 'alone', tmp_path / 'tfds', 1, process_id, port)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 1, out[-3000:]
  lines = [l for l in out.splitlines() if l.startswith('mimjax: error:')]
  assert len(lines) == 1 and 'Traceback' not in out, out[-3000:]
  return lines[0]


def test_unreachable_coordinator_is_one_clear_line(tmp_path, monkeypatch):
  monkeypatch.setenv('MIMJAX_INIT_TIMEOUT', '3')
  port = _free_port()  # nothing listens there
  line = _alone(tmp_path, 1, port)
  assert line == ('mimjax: error: process 1 of 2 gave up after '
                  'MIMJAX_INIT_TIMEOUT=3 s: nothing answers at the '
                  f'coordinator address localhost:{port}')


def test_a_worker_that_never_joins_is_one_clear_line(tmp_path, monkeypatch):
  monkeypatch.setenv('MIMJAX_INIT_TIMEOUT', '3')
  line = _alone(tmp_path, 0, _free_port())
  assert 'process 0 of 2 gave up after MIMJAX_INIT_TIMEOUT=3 s: not all 2 ' \
         'processes joined' in line, line


def test_bad_distributed_environment(monkeypatch):
  from mimjax import distributed
  monkeypatch.setenv('MIMJAX_COORDINATOR', 'localhost:1234')
  monkeypatch.setenv('MIMJAX_NUM_PROCESSES', '2')
  monkeypatch.delenv('MIMJAX_PROCESS_ID', raising=False)
  with pytest.raises(ValueError, match='MIMJAX_PROCESS_ID is not'):
    distributed.initialize()
  monkeypatch.setenv('MIMJAX_PROCESS_ID', '2')
  with pytest.raises(ValueError, match=r'MIMJAX_PROCESS_ID=2 is not in 0 \.\.\. '
                     r'MIMJAX_NUM_PROCESSES-1 = 1'):
    distributed.initialize()
  monkeypatch.setenv('MIMJAX_PROCESS_ID', 'one')
  with pytest.raises(ValueError, match="MIMJAX_PROCESS_ID='one' is not a whole"):
    distributed.initialize()


def _table(output: str) -> list[list[str]]:
  """The summary table's rows, train_seconds (each process's own clock)
  left out."""
  lines = output.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith('stage '))
  rows = []
  for line in lines[start:]:
    if not line.strip() or line.startswith(('Pictures', 'TensorBoard', 'I1',
                                            'W1', 'mimjax')):
      break
    rows.append(line.split()[:-1])
  return rows


def test_fsdp_across_two_processes_runs_every_stage_and_evaluator(tmp_path):
  """The parameters sharded over 4 devices of 2 processes (fsdp=4): the
  pipeline pre-trains with kNN and reconstructions, fine-tunes with
  evaluations, probes and analyses; both processes report the same
  numbers."""
  data_dir = tmp_path / 'tfds'
  prepare = _launch(tmp_path / 'prepare', data_dir, 1,
                    extra=['--config.pretrain.data.name=digits',
                           '--config.pretrain.steps=1'])
  out = prepare.communicate(timeout=600)[0]
  assert prepare.returncode == 0, out[-3000:]
  outputs = _two_processes(
      tmp_path / 'run', data_dir, 8, '--config.mode=pipeline',
      '--config.mesh=(1,4,1)', '--config.pretrain.data.name=digits',
      '--config.pretrain.knn_every=4', '--config.pretrain.recon_every=4',
      '--config.pretrain.knn_examples=200',
      '--config.finetune.steps=8', '--config.finetune.eval_every=4',
      '--config.linprobe.steps=6', '--config.linprobe.eval_every=3',
      '--config.analyze.examples=96', timeout=1200)
  assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in outputs[0]
  overview = (tmp_path / 'run' / 'pretrain' / 'parameters.txt').read_text()
  assert "(None, 'fsdp')" in overview, overview[:2000]
  run = tmp_path / 'run'
  assert (run / 'pretrain' / 'reconstructions_8.png').exists()
  assert (run / 'analyze' / 'occlusion_invariance.png').exists()
  tables = [_table(out) for out in outputs]
  assert [row[0] for row in tables[0]] == [
      'stage', 'pretrain', 'finetune', 'linprobe', 'analyze', 'analyze'], (
          outputs[0][-3000:])
  assert tables[0] == tables[1], (tables, outputs[1][-3000:])
