"""Two processes on localhost train together, checkpoint, restart, and match
a single process with the same number of devices."""

import os
import socket
import subprocess
import sys

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
                'MIMJAX_INIT_TIMEOUT': '120'})
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
