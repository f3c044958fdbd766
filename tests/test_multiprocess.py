"""Two processes on localhost: they train together, checkpoint, restart and
match a single process with the same number of devices; when one dies, the
other stops with a clear message instead of hanging."""

import os
import signal
import socket
import subprocess
import sys
import time

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
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3', 'JAX_PLATFORMS': 'cpu',
         'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo'}
  if process_id is None:
    env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
  else:
    env.update({'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
                'MIMJAX_COORDINATOR': f'localhost:{port}',
                'MIMJAX_NUM_PROCESSES': '2',
                'MIMJAX_PROCESS_ID': str(process_id),
                'MIMJAX_INIT_TIMEOUT': '120',
                'MIMJAX_HEARTBEAT_TIMEOUT': '10'})
  cmd = [sys.executable, '-m', 'mimjax.main', f'--workdir={workdir}',
         f'--config={REPO}/tests/tiny_config.py:{data_dir}', *FLAGS,
         f'--config.pretrain.steps={steps}', *extra]
  return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _two_processes(workdir, data_dir, steps, *extra):
  port = _free_port()
  procs = [_launch(workdir, data_dir, steps, i, port, extra) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


def test_two_processes_checkpoint_restart_match_one(tmp_path):
  data_dir = tmp_path / 'tfds'
  single = _launch(tmp_path / 'single', data_dir, 6)
  out = single.communicate(timeout=600)[0]
  assert single.returncode == 0, out[-3000:]

  _two_processes(tmp_path / 'multi', data_dir, 6, '--config.stop_at_step=3')
  outputs = _two_processes(tmp_path / 'multi', data_dir, 6)
  assert any('resumed from step 3' in o for o in outputs), outputs[0][-2000:]

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
