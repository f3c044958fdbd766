"""Pre-emption: SIGTERM (or SIGINT) saves the step every process agrees on,
exits with preemption.EXIT_CODE, and the same command resumes to a result
bitwise equal to an uninterrupted run; a signal during a save or an
evaluation loses nothing."""

import concurrent.futures
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from fast_jit import fast_env
from mimjax import checkpoint, evaluators
from mimjax.training import pipeline, preemption
from tiny_config import tiny_config
import test_multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ['--config.mode=pretrain', '--config.pretrain.steps=40',
         '--config.checkpoint_every=1000', '--config.log_every=2']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


def _params(workdir, step):
  return checkpoint.load_state_params(
      str(workdir / 'pretrain' / 'checkpoints'), step=step)


def _assert_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _signal_after(proc, line_start: str, sig=signal.SIGTERM):
  """Reads `proc`'s output until a line starts with `line_start`, then
  sends `sig`; returns all the output once the process has ended."""
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if line.startswith(line_start):
      proc.send_signal(sig)
      break
  seen.append(proc.communicate(timeout=600)[0])
  return ''.join(seen)


def _cli(workdir, data_dir, extra=(), **popen):
  cmd = [sys.executable, '-m', 'mimjax.main', f'--workdir={workdir}',
         f'--config={REPO}/tests/tiny_config.py:{data_dir}', *STEPS, *extra]
  env = fast_env({**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
  return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **popen)


def test_sigterm_saves_and_the_same_command_resumes_bitwise(tmp_path,
                                                           data_dir):
  sig = signal.SIGTERM
  straight = _cli(tmp_path / 'straight', data_dir)
  out = straight.communicate(timeout=600)[0]
  assert straight.returncode == 0, out[-3000:]

  stopped = _cli(tmp_path / 'stopped', data_dir)
  out = _signal_after(stopped, 'pretrain step 6/40', sig)
  assert stopped.returncode == preemption.EXIT_CODE, out[-3000:]
  lines = [l for l in out.splitlines() if 'pre-emption notice' in l]
  assert len(lines) == 1 and 'Traceback' not in out, out[-3000:]
  step = int(lines[0].split('stopped at step ')[1].split()[0])
  assert 6 <= step < 40, lines
  assert (f'mimjax: pretrain: stopped at step {step} of 40 on a pre-emption '
          f'notice ({sig.name}); step {step} is saved in ') in lines[0]
  assert checkpoint.latest_step(
      tmp_path / 'stopped' / 'pretrain' / 'checkpoints') == step

  resumed = _cli(tmp_path / 'stopped', data_dir)
  out = resumed.communicate(timeout=600)[0]
  assert resumed.returncode == 0, out[-3000:]
  assert f'steps {step + 1}-40 of 40 (resumed)' in out, out[-3000:]
  _assert_equal(_params(tmp_path / 'stopped', 40),
                _params(tmp_path / 'straight', 40))


def test_signal_during_a_save_or_an_evaluation_loses_nothing(
    tmp_path, data_dir, monkeypatch):
  """In-process: SIGTERM arrives (its handler runs) inside a checkpoint
  save at step 4, and SIGINT inside the kNN evaluation at step 9."""
  monkeypatch.setattr(preemption, '_received', [])
  c = tiny_config(data_dir, mode='pretrain', **{
      'pretrain.steps': 12, 'pretrain.knn_every': 3, 'checkpoint_every': 4,
      'keep_checkpoints': 10})
  straight = pipeline.run(c, str(tmp_path / 'straight'))

  save, knn = checkpoint.Checkpoints.save, evaluators.Knn.run
  def save_with_signal(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if step == 4:
      preemption._note(signal.SIGTERM, None)
  def knn_with_signal(self, step, *args):
    if step == 9:
      preemption._note(signal.SIGINT, None)
    return knn(self, step, *args)
  monkeypatch.setattr(checkpoint.Checkpoints, 'save', save_with_signal)
  monkeypatch.setattr(evaluators.Knn, 'run', knn_with_signal)

  workdir = tmp_path / 'stopped'
  with pytest.raises(preemption.Preempted, match='stopped at step 5 of 12'):
    pipeline.run(c, str(workdir))
  preemption._received.clear()
  with pytest.raises(preemption.Preempted,
                     match=r'stopped at step 9 of 12 .*notice \(SIGINT\)'):
    pipeline.run(c, str(workdir))
  preemption._received.clear()
  assert checkpoint.latest_step(workdir / 'pretrain' / 'checkpoints') == 9
  resumed = pipeline.run(c, str(workdir))
  assert resumed[0]['knn_top1'] == straight[0]['knn_top1']
  _assert_equal(_params(workdir, 12), _params(tmp_path / 'straight', 12))


def test_two_processes_stop_at_one_step_and_resume_bitwise(tmp_path):
  """SIGTERM to one process of two whose parameters are sharded over both:
  both save the same step and exit; run again, they finish equal to an
  uninterrupted two-process run."""
  data_dir = tmp_path / 'tfds'
  prepare = test_multiprocess._launch(tmp_path / 'prepare', data_dir, 1)
  out = prepare.communicate(timeout=600)[0]
  assert prepare.returncode == 0, out[-3000:]
  # The parameters sharded over both processes (fsdp 4 = 2 devices each):
  # the saved step spans them, and so does its restore.
  steps = ['--config.log_every=2', '--config.checkpoint_every=1000',
           '--config.mesh=(1,4,1)']
  test_multiprocess._two_processes(tmp_path / 'straight', data_dir, 30, *steps)

  port = test_multiprocess._free_port()
  procs = [test_multiprocess._launch(tmp_path / 'stopped', data_dir, 30, i,
                                     port, steps) for i in range(2)]
  with concurrent.futures.ThreadPoolExecutor(1) as pool:  # drain both pipes
    later = pool.submit(lambda: procs[1].communicate(timeout=600)[0])
    out0 = _signal_after(procs[0], 'pretrain step 6/30')  # process 0 only
    out1 = later.result()
  for p, out in zip(procs, (out0, out1)):
    assert p.returncode == preemption.EXIT_CODE, out[-3000:]
  said = [[l for l in out.splitlines() if 'pre-emption notice' in l]
          for out in (out0, out1)]
  assert all(len(s) == 1 for s in said), (out0[-2000:], out1[-2000:])
  step = int(said[0][0].split('stopped at step ')[1].split()[0])
  assert f'stopped at step {step} of 30' in said[1][0], said
  assert step < 30

  outputs = test_multiprocess._two_processes(tmp_path / 'stopped', data_dir,
                                             30, *steps)
  assert f'steps {step + 1}-30 of 30 (resumed)' in outputs[0], outputs[0][-2000:]
  _assert_equal(_params(tmp_path / 'stopped', 30),
                _params(tmp_path / 'straight', 30))
