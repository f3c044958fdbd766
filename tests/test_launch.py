"""launch/: dry runs, real runs against fake gcloud/sbatch/srun, bad input,
and the launch commands of docs/launch.md and docs/scaling.md.

Fast and offline: nothing here talks to a cloud, a cluster or a GPU. The
commands the scripts would run are printed (--dry-run) or handed to small
fake executables on PATH that record their arguments and environment.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import stat
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / 'launch'
SCRIPTS = ('tpu_vm.sh', 'slurm.sbatch')

TPU = ['--name=mae-l', '--zone=us-central2-b', '--project=my-proj',
       '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base',
       '--config=configs/mae_imagenet.py:L',
       '--workdir=gs://my-bucket/mae_l', '--data-dir=gs://my-bucket/tfds']
STEPS = ['create', 'install', 'copy', 'run', 'stop']

# Variables the scripts read as defaults; the tests start without them.
_SCRIPT_VARS = {
    'TPU_NAME', 'TPU_ZONE', 'TPU_PROJECT', 'CLOUDSDK_CORE_PROJECT',
    'TPU_ACCELERATOR', 'TPU_RUNTIME', 'TPU_SPOT', 'TPU_PREEMPTIBLE',
    'TPU_INTERNAL_IP', 'MIMJAX_CONFIG', 'MIMJAX_WORKDIR', 'TFDS_DATA_DIR',
    'RUN_NAME', 'MIMJAX_INIT_TIMEOUT', 'DRY_RUN', 'CUDA_VISIBLE_DEVICES',
    'XLA_PYTHON_CLIENT_MEM_FRACTION', 'MIMJAX_PYTHON', 'MIMJAX_DISTRIBUTED',
    'MIMJAX_COORDINATOR', 'MIMJAX_NUM_PROCESSES', 'MIMJAX_PROCESS_ID',
    'JAX_LOCAL_DEVICE_IDS', 'TMPDIR', 'value'}


def _env(extra=None, path_prefix=None):
  env = {k: v for k, v in os.environ.items()
         if k not in _SCRIPT_VARS and not k.startswith(('SLURM_', 'SBATCH_'))}
  if path_prefix:
    env['PATH'] = f'{path_prefix}{os.pathsep}{env.get("PATH", "")}'
  env.update(extra or {})
  return env


def run(script, *args, env=None, path_prefix=None, cwd=None):
  return subprocess.run(['bash', str(LAUNCH / script), *args],
                        capture_output=True, text=True, timeout=60,
                        env=_env(env, path_prefix), cwd=cwd or ROOT,
                        check=False)


def ok(script, *args, **kwargs):
  proc = run(script, *args, **kwargs)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout


def one_error_line(script, *args):
  """A dry run that fails with exactly one `script: error:` line, having
  printed (or run) nothing before it; returns that line."""
  proc = run(script, '--dry-run', *args)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'{script}: error:'), lines
  assert proc.stdout == ''
  return lines[0]


def commands(stdout: str) -> list[list[str]]:
  """The printed commands (comments dropped), each split like a shell."""
  return [shlex.split(line) for line in stdout.splitlines()
          if line.strip() and not line.startswith('#')]


def flag(argv, name):
  values = [a.split('=', 1)[1] for a in argv if a.startswith(name + '=')]
  assert len(values) == 1, (name, argv)
  return values[0]


def fake(bindir: pathlib.Path, name: str, log: pathlib.Path,
         env_vars=(), body=''):
  """An executable that appends {'argv': ..., 'env': ...} to log as JSON."""
  bindir.mkdir(parents=True, exist_ok=True)
  path = bindir / name
  names = ' '.join(env_vars)
  path.write_text(f'''#!/usr/bin/env python3
import json, os, sys
with open({str(log)!r}, 'a') as f:
  f.write(json.dumps({{'argv': sys.argv, 'env': {{k: os.environ.get(k)
                       for k in {names.split()!r}}}}}) + '\\n')
{body}
''')
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return path


def records(log: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in log.read_text().splitlines()]


# ------------------------------------------------------------------ syntax


@pytest.mark.parametrize('script', SCRIPTS)
def test_bash_n(script):
  proc = subprocess.run(['bash', '-n', str(LAUNCH / script)],
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize('script', SCRIPTS)
def test_shellcheck(script):
  if not shutil.which('shellcheck'):
    pytest.skip('shellcheck is not installed')
  proc = subprocess.run(
      ['shellcheck', '-x', '--shell=bash', f'launch/{script}'],
      capture_output=True, text=True, check=False, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_help():
  proc = run('tpu_vm.sh', '-h')
  assert proc.returncode == 0
  assert proc.stdout.startswith('usage:') and '--dry-run' in proc.stdout


# ------------------------------------------------------------------ TPU VM


def test_tpu_dry_run_lifecycle():
  out = ok('tpu_vm.sh', '--dry-run', *TPU, *STEPS, '--',
           '--config.mesh=(1,-1,1)', '--config.model.remat=True')
  cmds = commands(out)
  gcloud = [c for c in cmds if c[0] == 'gcloud']
  verbs = [c[4] for c in gcloud]  # gcloud compute tpus tpu-vm VERB
  # create; install = copy (scp + unpack) + pip; copy; run; stop.
  assert verbs == ['create', 'scp', 'ssh', 'ssh', 'scp', 'ssh', 'ssh', 'ssh']
  steps = [line.split(':')[0][2:] for line in out.splitlines()
           if line.startswith('# ')]
  assert steps == ['create', 'copy', 'install', 'copy', 'run', 'stop']
  for c in gcloud:
    assert c[:4] == ['gcloud', 'compute', 'tpus', 'tpu-vm']
    assert 'mae-l' in c or 'mae-l:/tmp/mimjax-src.tgz' in c
    assert '--zone=us-central2-b' in c and '--project=my-proj' in c
  create = gcloud[0]
  assert '--accelerator-type=v4-32' in create
  assert '--version=tpu-ubuntu2204-base' in create
  assert '--spot' not in create and '--preemptible' not in create
  for c in gcloud[1:]:
    assert '--worker=all' in c
  pip = flag(gcloud[3], '--command')
  assert "pip install --python .venv/bin/python -e '.[tpu]'" in pip
  assert 'uv venv --python 3.11 .venv' in pip


def test_tpu_dry_run_run_command():
  out = ok('tpu_vm.sh', '--dry-run', *TPU, 'run', '--',
           '--config.mesh=(1,-1,1)', '--config.pretrain.batch_size=4096')
  (ssh,) = commands(out)
  assert ssh[4] == 'ssh' and '--worker=all' in ssh
  remote = flag(ssh, '--command')
  assert 'python -m mimjax.main' in remote
  assert 'TFDS_DATA_DIR=gs://my-bucket/tfds' in remote
  assert 'MIMJAX_DISTRIBUTED=1' in remote
  assert 'nohup' in remote and '> logs/mimjax.log 2>&1' in remote
  words = shlex.split(remote)
  assert '--config=configs/mae_imagenet.py:L' in words
  assert '--workdir=gs://my-bucket/mae_l' in words
  assert '--config.mesh=(1,-1,1)' in words  # survives both quotings
  assert '--config.pretrain.batch_size=4096' in words


def test_tpu_options_from_environment():
  out = ok('tpu_vm.sh', 'create', 'run', '--', '--config.model.scan=True',
           env={'DRY_RUN': '1', 'TPU_NAME': 'env-tpu', 'TPU_ZONE': 'us-east5-a',
                'TPU_PROJECT': 'env-proj', 'TPU_ACCELERATOR': 'v5p-128',
                'TPU_SPOT': '1', 'TPU_INTERNAL_IP': '1',
                'MIMJAX_CONFIG': 'configs/mae_imagenet.py:H',
                'MIMJAX_WORKDIR': 'gs://b/h', 'TFDS_DATA_DIR': 'gs://b/tfds',
                'MIMJAX_INIT_TIMEOUT': '900', 'RUN_NAME': 'h14'})
  create, ssh = commands(out)
  assert create[5] == 'env-tpu'
  assert '--accelerator-type=v5p-128' in create
  assert '--version=v2-alpha-tpuv5' in create  # the v5p default runtime
  assert '--spot' in create and '--project=env-proj' in create
  assert '--internal-ip' not in create and '--internal-ip' in ssh
  remote = flag(ssh, '--command')
  assert 'MIMJAX_INIT_TIMEOUT=900' in remote
  words = shlex.split(remote)
  assert '--config.model.scan=True' in words
  assert 'logs/h14.log' in words


@pytest.mark.parametrize('accelerator,runtime', [
    ('v4-8', 'tpu-ubuntu2204-base'), ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v6e-8', 'v2-alpha-tpuv6e'), ('v5p-8', 'v2-alpha-tpuv5')])
def test_tpu_default_runtime(accelerator, runtime):
  out = ok('tpu_vm.sh', '--dry-run', '--name=t', '--zone', 'z',
           '--preemptible', f'--accelerator-type={accelerator}', 'create')
  (create,) = commands(out)
  assert f'--version={runtime}' in create and '--preemptible' in create
  assert '--zone=z' in create
  assert not any(a.startswith('--project') for a in create)


def test_tpu_real_run_with_fake_gcloud(tmp_path):
  """Without --dry-run the same commands reach gcloud, argument for argument."""
  log = tmp_path / 'gcloud.jsonl'
  fake(tmp_path / 'bin', 'gcloud', log)
  args = [*TPU, 'create', 'run', 'stop', '--', '--config.mesh=(1,-1,1)']
  ok('tpu_vm.sh', *args, path_prefix=tmp_path / 'bin')
  real = [r['argv'][1:] for r in records(log)]
  printed = [c[1:] for c in commands(ok('tpu_vm.sh', '--dry-run', *args))]
  assert real == printed
  assert [r[3] for r in real] == ['create', 'ssh', 'ssh']


def test_tpu_remote_run_and_stop_commands_work(tmp_path):
  """Runs the printed run/stop worker commands with bash in a fake $HOME."""
  home = tmp_path / 'home'
  out_file = tmp_path / 'python.jsonl'
  fake(home / 'mimjax' / '.venv' / 'bin', 'python', out_file,
       env_vars=('TFDS_DATA_DIR', 'MIMJAX_DISTRIBUTED', 'MIMJAX_INIT_TIMEOUT'),
       body='import time; print("training", flush=True); time.sleep(20)')
  flags = ['--init-timeout=120', 'run', 'stop', '--',
           '--config.mesh=(1,-1,1)', "--config.reference.source=it's"]
  run_cmd, stop_cmd = commands(ok('tpu_vm.sh', '--dry-run', *TPU, *flags))
  env = {'HOME': str(home)}
  subprocess.run(['bash', '-c', flag(run_cmd, '--command')], check=True,
                 env=_env(env), timeout=30)
  pid_file = home / 'mimjax' / 'logs' / 'mimjax.pid'
  pid = int(pid_file.read_text())
  try:
    for _ in range(100):
      if out_file.exists() and 'training' in (
          home / 'mimjax' / 'logs' / 'mimjax.log').read_text():
        break
      time.sleep(0.1)
    (rec,) = records(out_file)
    assert rec['argv'][1:] == [
        '-m', 'mimjax.main', '--config=configs/mae_imagenet.py:L',
        '--workdir=gs://my-bucket/mae_l', '--config.mesh=(1,-1,1)',
        "--config.reference.source=it's"]
    assert rec['env'] == {'TFDS_DATA_DIR': 'gs://my-bucket/tfds',
                          'MIMJAX_DISTRIBUTED': '1',
                          'MIMJAX_INIT_TIMEOUT': '120'}
    again = subprocess.run(['bash', '-c', flag(run_cmd, '--command')],
                           env=_env(env), capture_output=True, text=True,
                           timeout=30, check=False)
    assert again.returncode != 0 and 'already running' in again.stderr
  finally:
    subprocess.run(['bash', '-c', flag(stop_cmd, '--command')], check=True,
                   env=_env(env), timeout=30)
  assert not pid_file.exists()
  for _ in range(50):
    if not _alive(pid):
      break
    time.sleep(0.1)
  else:
    os.kill(pid, 9)
    pytest.fail(f'process {pid} still running after stop')


def _alive(pid: int) -> bool:
  """Running, and not a zombie waiting for a parent that never reaps it."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  try:
    stat_line = pathlib.Path(f'/proc/{pid}/stat').read_text()
  except OSError:
    return False
  return stat_line.rsplit(')', 1)[1].split()[0] != 'Z'


def test_tpu_copy_builds_a_tarball_without_the_venv(tmp_path):
  out = ok('tpu_vm.sh', '--dry-run', '--name=t', '--zone=z', 'copy',
           env={'TMPDIR': str(tmp_path)})
  tar = next(c for c in commands(out) if c[0] == 'tar')
  subprocess.run(tar, check=True, cwd=tmp_path, timeout=60)
  names = subprocess.run(['tar', '-tzf', tar[2]], check=True, text=True,
                         capture_output=True).stdout.split()
  assert './launch/tpu_vm.sh' in names and './mimjax/main.py' in names
  assert not any(n.startswith(('./.venv', './.git/')) for n in names)


@pytest.mark.parametrize('args,message', [
    (['--zone=z', 'create'], '--name'),
    (['--name=t', 'create'], '--zone'),
    (['--name=t', '--zone=z'], 'no step'),
    (['--name=t', '--zone=z', 'create'], '--accelerator-type'),
    (['--name=t', '--zone=z', '--accelerator-type=x9-8', 'create'],
     'runtime'),
    (['--name=t', '--zone=z', 'run'], '--config'),
    (['--name=t', '--zone=z', '--config=c.py', 'run'], '--workdir'),
    (['--name=t', '--zone=z', '--config=c.py', '--workdir=runs/x', 'run'],
     'every worker sees'),
    (['--name=t', '--zone=z', '--config=c.py', '--workdir=gs://b/x',
      '--data-dir=tfds', 'run'], '--data-dir must'),
    (['--name=t', '--zone=z', '--config=c.py', '--workdir=gs://b/x', 'run'],
     '--data-dir'),
    (['--name=t', '--zone=z', 'delete'], 'unknown step'),
    (['--name=t', '--zone=z', '--colour=red', 'create'], 'unknown option'),
    (['--name=Bad_Name', '--zone=z', 'stop'], '--name'),
    (['--name=t', '--zone=z', '--spot', '--preemptible', '--accelerator-type'
      '=v4-8', 'create'], '--spot'),
    (['--name=t', '--zone=z', '--init-timeout=soon', 'stop'],
     '--init-timeout'),
    (['--name=t', '--zone=z', '--run-name=a b', 'stop'], '--run-name'),
    (['--name=t', '--zone'], '--zone needs a value'),
])
def test_tpu_bad_input(args, message):
  assert message in one_error_line('tpu_vm.sh', *args)


# ------------------------------------------------------------------ SLURM

_SRUN_ENV = ('MIMJAX_DISTRIBUTED', 'JAX_LOCAL_DEVICE_IDS', 'TFDS_DATA_DIR',
             'XLA_PYTHON_CLIENT_MEM_FRACTION')


def sbatch_job(tmp_path, args, slurm_env):
  """Runs slurm.sbatch as SLURM would on the job's first node, with a fake
  srun; returns the srun record (argv, env) or the failed process."""
  bindir, log = tmp_path / 'bin', tmp_path / 'srun.jsonl'
  fake(bindir, 'srun', log, env_vars=_SRUN_ENV)
  proc = subprocess.run(['bash', str(LAUNCH / 'slurm.sbatch'), *args],
                        env=_env({'SLURM_SUBMIT_DIR': str(ROOT), **slurm_env},
                                 bindir), cwd=tmp_path, capture_output=True,
                        text=True, timeout=60, check=False)
  if proc.returncode:
    return proc
  (step,) = records(log)
  return step


def test_slurm_job_runs_one_task_per_node_on_all_gpus(tmp_path):
  args = ['--config=configs/mae_imagenet.py:L', '--workdir=/shared/l',
          '--config.mesh=(3,4,1)']
  step = sbatch_job(tmp_path, args, {
      'SLURM_JOB_ID': '1234', 'SLURM_JOB_NUM_NODES': '3',
      'SLURM_GPUS_PER_NODE': 'h100:4', 'SLURM_CPUS_PER_TASK': '16',
      'TFDS_DATA_DIR': '/shared/tfds'})
  argv = step['argv']
  for f in ('--nodes=3', '--ntasks=3', '--ntasks-per-node=1',
            '--kill-on-bad-exit=1', '--cpus-per-task=16'):
    assert f in argv, f
  assert argv[argv.index('-m') - 1] == '.venv/bin/python'
  assert argv[argv.index('-m'):] == ['-m', 'mimjax.main', *args]
  assert step['env'] == {'MIMJAX_DISTRIBUTED': '1',
                         'JAX_LOCAL_DEVICE_IDS': '0,1,2,3',
                         'TFDS_DATA_DIR': '/shared/tfds',
                         'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.90'}


@pytest.mark.parametrize('requeue', ['1', '0'])
def test_slurm_job_stopped_on_sigterm_is_requeued(tmp_path, requeue):
  """srun's tasks exit 75 (pre-empted, their step saved): the job is
  requeued with scontrol, unless MIMJAX_REQUEUE=0; the exit code stays."""
  bindir = tmp_path / 'bin'
  fake(bindir, 'srun', tmp_path / 'srun.jsonl', body='sys.exit(75)')
  fake(bindir, 'scontrol', tmp_path / 'scontrol.jsonl')
  proc = subprocess.run(
      ['bash', str(LAUNCH / 'slurm.sbatch'), '--config=c.py'],
      env=_env({'SLURM_SUBMIT_DIR': str(ROOT), 'SLURM_JOB_ID': '77',
                'SLURM_JOB_NUM_NODES': '1', 'SLURM_GPUS_PER_NODE': '8',
                'MIMJAX_REQUEUE': requeue}, bindir),
      cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 75, proc.stderr
  requeued = tmp_path / 'scontrol.jsonl'
  if requeue == '1':
    assert [r['argv'][1:] for r in records(requeued)] == [['requeue', '77']]
    assert 'requeueing job 77' in proc.stderr
  else:
    assert not requeued.exists()


def test_slurm_defaults_in_the_template():
  template = (LAUNCH / 'slurm.sbatch').read_text()
  for line in ('#SBATCH --nodes=2', '#SBATCH --gpus-per-node=8',
               '#SBATCH --ntasks-per-node=1', '#SBATCH --time=',
               '##SBATCH --partition=', '#SBATCH --signal=TERM@',
               '#SBATCH --requeue'):
    assert line in template, line


@pytest.mark.parametrize('slurm_env,message', [
    ({}, 'not inside a SLURM job'),
    ({'SLURM_JOB_NUM_NODES': '2', 'SLURM_GPUS_PER_NODE': 'h100:0'},
     'cannot tell how many GPUs'),
])
def test_slurm_bad_input(tmp_path, slurm_env, message):
  proc = sbatch_job(tmp_path, ['--config=c.py'], slurm_env)
  assert proc.returncode == 2 and proc.stdout == ''
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('slurm.sbatch: error:')
  assert message in lines[0]


# ------------------------------------------------------------------ docs


def doc_blocks(language='bash'):
  """The fenced ```bash blocks of docs/launch.md and docs/scaling.md."""
  return [block for name in ('launch.md', 'scaling.md')
          for block in re.findall(rf'^```{language}\n(.*?)^```',
                                  (ROOT / 'docs' / name).read_text(),
                                  re.S | re.M)]


def test_scaling_doc_tpu_command_runs_as_written():
  (snippet,) = [b for b in doc_blocks() if 'launch/tpu_vm.sh' in b]
  proc = subprocess.run(['bash', '-euo', 'pipefail', '-c', snippet],
                        cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=60, check=False)
  assert proc.returncode == 0, proc.stderr
  assert 'mimjax.main' in proc.stdout


def test_scaling_doc_gpu_command_runs_as_written(tmp_path):
  (snippet,) = [b for b in doc_blocks() if 'CUDA_VISIBLE_DEVICES' in b]
  log = tmp_path / 'python.jsonl'
  fake(tmp_path / '.venv' / 'bin', 'python', log, env_vars=(
      'CUDA_VISIBLE_DEVICES', 'XLA_PYTHON_CLIENT_MEM_FRACTION',
      'TFDS_DATA_DIR'), body='print("step 1")')
  subprocess.run(['bash', '-euo', 'pipefail', '-c', snippet], cwd=tmp_path,
                 env=_env(), capture_output=True, timeout=60, check=True)
  (rec,) = records(log)
  assert rec['argv'][1:] == [
      '-m', 'mimjax.main', '--config=configs/mae_imagenet.py:B',
      '--workdir=/scratch/runs/mae_b', '--config.mesh=(8,1,1)',
      '--config.model.remat=True']
  assert rec['env'] == {'CUDA_VISIBLE_DEVICES': '0,1,2,3,4,5,6,7',
                        'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.90',
                        'TFDS_DATA_DIR': '/scratch/tensorflow_datasets'}
  assert 'step 1' in (tmp_path / 'mae_b.log').read_text()


def test_scaling_doc_slurm_command_submits_the_job(tmp_path):
  """The documented sbatch line, against a fake sbatch; then the job it
  submits, against a fake srun."""
  (snippet,) = [b for b in doc_blocks() if 'launch/slurm.sbatch' in b]
  log = tmp_path / 'sbatch.jsonl'
  fake(tmp_path / 'bin', 'sbatch', log, env_vars=('TFDS_DATA_DIR',))
  subprocess.run(['bash', '-euo', 'pipefail', '-c', snippet], cwd=ROOT,
                 env=_env(path_prefix=tmp_path / 'bin'), timeout=60,
                 check=True)
  (sub,) = records(log)
  argv = sub['argv']
  assert {'--nodes=4', '--gpus-per-node=8'} <= set(argv)
  job_args = argv[argv.index('launch/slurm.sbatch') + 1:]
  assert job_args[-1] == '--config.mesh=(4,8,1)'
  step = sbatch_job(tmp_path, job_args, {
      'SLURM_JOB_NUM_NODES': '4', 'SLURM_GPUS_ON_NODE': '8', **sub['env']})
  assert step['argv'][step['argv'].index('-m'):] == ['-m', 'mimjax.main',
                                                      *job_args]
  assert step['env']['TFDS_DATA_DIR'] == '/shared/tensorflow_datasets'
  assert step['env']['JAX_LOCAL_DEVICE_IDS'] == '0,1,2,3,4,5,6,7'
