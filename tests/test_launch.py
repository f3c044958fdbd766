"""The launch scripts: dry runs, real runs against fake gcloud/sbatch/srun, bad input.

Fast and offline: nothing here talks to a cloud, a cluster or a GPU. The
commands the scripts would run are printed (--dry-run) or handed to small
fake executables on PATH that record their arguments and environment.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import stat
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / 'launch'
SCRIPTS = ('tpu_vm.sh', 'gpu_node.sh', 'slurm.sh', 'slurm.sbatch')

TPU = ['--name=mae-l', '--zone=us-central2-b', '--project=my-proj',
       '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base',
       '--config=configs/mae_imagenet.py:L',
       '--workdir=gs://my-bucket/mae_l', '--data-dir=gs://my-bucket/tfds']
STEPS = ['create', 'install', 'copy', 'run', 'logs', 'delete']

# Variables the scripts read as defaults; the tests start without them.
_SCRIPT_VARS = {
    'TPU_NAME', 'TPU_ZONE', 'TPU_PROJECT', 'CLOUDSDK_CORE_PROJECT',
    'TPU_ACCELERATOR', 'TPU_RUNTIME', 'TPU_SPOT', 'TPU_PREEMPTIBLE',
    'TPU_INTERNAL_IP', 'TPU_YES', 'MIMJAX_CONFIG', 'MIMJAX_WORKDIR',
    'TFDS_DATA_DIR', 'MIMJAX_FLAGS', 'RUN_NAME', 'MIMJAX_INIT_TIMEOUT',
    'REMOTE_DIR', 'GIT_URL', 'GIT_REF', 'PYTHON_VERSION', 'LOG_WORKER',
    'DRY_RUN', 'CUDA_VISIBLE_DEVICES', 'XLA_PYTHON_CLIENT_MEM_FRACTION',
    'MIMJAX_PYTHON', 'MIMJAX_SLURM_NODES', 'MIMJAX_SLURM_GPUS',
    'MIMJAX_DISTRIBUTED', 'MIMJAX_COORDINATOR', 'MIMJAX_NUM_PROCESSES',
    'MIMJAX_PROCESS_ID', 'JAX_LOCAL_DEVICE_IDS', 'MIMJAX_SLURM_DRY_RUN',
    'MIMJAX_REPO', 'TMPDIR'}


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


@pytest.mark.parametrize('script', ('tpu_vm.sh', 'gpu_node.sh', 'slurm.sh'))
def test_help(script):
  proc = run(script, '-h')
  assert proc.returncode == 0
  assert proc.stdout.startswith('usage:') and '--dry-run' in proc.stdout


# ------------------------------------------------------------------ TPU VM


def test_tpu_dry_run_lifecycle():
  out = ok('tpu_vm.sh', '--dry-run', *TPU, *STEPS, '--',
           '--config.mesh=(1,-1,1)', '--config.model.remat=True')
  cmds = commands(out)
  gcloud = [c for c in cmds if c[0] == 'gcloud']
  verbs = [c[4] for c in gcloud]  # gcloud compute tpus tpu-vm VERB
  # create; install = copy (scp + unpack) + pip; copy; run; logs; delete.
  assert verbs == ['create', 'scp', 'ssh', 'ssh', 'scp', 'ssh', 'ssh', 'ssh',
                   'delete']
  steps = [line.split(':')[0][2:] for line in out.splitlines()
           if line.startswith('# ')]
  assert steps == ['create', 'install', 'copy', 'copy', 'run', 'logs',
                   'delete']
  for c in gcloud:
    assert c[:4] == ['gcloud', 'compute', 'tpus', 'tpu-vm']
    assert 'mae-l' in c or 'mae-l:/tmp/mimjax-src.tgz' in c
    assert '--zone=us-central2-b' in c and '--project=my-proj' in c
  create = gcloud[0]
  assert '--accelerator-type=v4-32' in create
  assert '--version=tpu-ubuntu2204-base' in create
  assert '--spot' not in create and '--preemptible' not in create
  for c in gcloud[1:-1]:
    assert '--worker=all' in c
  pip = flag(gcloud[3], '--command')
  assert "pip install --python .venv/bin/python -e '.[tpu]'" in pip
  assert 'uv venv --python 3.11 .venv' in pip
  assert gcloud[-1][4] == 'delete' and '--quiet' not in gcloud[-1]


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
  out = ok('tpu_vm.sh', 'create', 'run', env={
      'DRY_RUN': '1', 'TPU_NAME': 'env-tpu', 'TPU_ZONE': 'us-east5-a',
      'TPU_PROJECT': 'env-proj', 'TPU_ACCELERATOR': 'v5p-128',
      'TPU_SPOT': '1', 'MIMJAX_CONFIG': 'configs/mae_imagenet.py:H',
      'MIMJAX_WORKDIR': 'gs://b/h', 'TFDS_DATA_DIR': 'gs://b/tfds',
      'MIMJAX_FLAGS': '--config.model.scan=True --config.model.remat=True',
      'MIMJAX_INIT_TIMEOUT': '900', 'RUN_NAME': 'h14'})
  create, ssh = commands(out)
  assert create[5] == 'env-tpu'
  assert '--accelerator-type=v5p-128' in create
  assert '--version=v2-alpha-tpuv5' in create  # the v5p default runtime
  assert '--spot' in create and '--project=env-proj' in create
  remote = flag(ssh, '--command')
  assert 'MIMJAX_INIT_TIMEOUT=900' in remote
  words = shlex.split(remote)
  assert '--config.model.scan=True' in words
  assert '--config.model.remat=True' in words
  assert 'logs/h14.log' in words


@pytest.mark.parametrize('accelerator,runtime', [
    ('v4-8', 'tpu-ubuntu2204-base'), ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v6e-8', 'v2-alpha-tpuv6e'), ('v5p-8', 'v2-alpha-tpuv5')])
def test_tpu_default_runtime(accelerator, runtime):
  out = ok('tpu_vm.sh', '--dry-run', '--name=t', '--zone=z', '--preemptible',
           f'--accelerator-type={accelerator}', 'create')
  (create,) = commands(out)
  assert f'--version={runtime}' in create and '--preemptible' in create
  assert not any(a.startswith('--project') for a in create)


def test_tpu_install_from_git():
  out = ok('tpu_vm.sh', '--dry-run', '--name=t', '--zone=z',
           '--git-url=https://example.com/mimjax.git', '--git-ref=v0.1',
           'install')
  clone, pip = commands(out)
  assert 'scp' not in out
  assert 'git clone https://example.com/mimjax.git $HOME/mimjax' in flag(
      clone, '--command')
  assert 'checkout --detach FETCH_HEAD' in flag(clone, '--command')
  assert "-e '.[tpu]'" in flag(pip, '--command')


def test_tpu_logs_and_delete_options():
  out = ok('tpu_vm.sh', '--dry-run', '--name=t', '--zone=z', '--yes',
           '--log-worker=0', '--internal-ip', 'logs', 'delete')
  logs, delete = commands(out)
  assert '--worker=0' in logs and '--internal-ip' in logs
  assert 'tail -n 100 -F $HOME/mimjax/logs/mimjax.log' in flag(logs,
                                                               '--command')
  assert '--quiet' in delete


def test_tpu_real_run_with_fake_gcloud(tmp_path):
  """Without --dry-run the same commands reach gcloud, argument for argument."""
  log = tmp_path / 'gcloud.jsonl'
  fake(tmp_path / 'bin', 'gcloud', log)
  args = [*TPU, 'create', 'run', 'delete', '--', '--config.mesh=(1,-1,1)']
  ok('tpu_vm.sh', *args, path_prefix=tmp_path / 'bin')
  real = [r['argv'][1:] for r in records(log)]
  printed = [c[1:] for c in commands(ok('tpu_vm.sh', '--dry-run', *args))]
  assert real == printed
  assert [r[3] for r in real] == ['create', 'ssh', 'delete']


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
    (['--name=t', '--zone=z', 'launch'], 'unknown step'),
    (['--name=t', '--zone=z', '--colour=red', 'create'], 'unknown option'),
    (['--name=Bad_Name', '--zone=z', 'delete'], '--name'),
    (['--name=t', '--zone=z', '--spot', '--preemptible', '--accelerator-type'
      '=v4-8', 'create'], '--spot'),
    (['--name=t', '--zone=z', '--init-timeout=soon', 'delete'],
     '--init-timeout'),
    (['--name=t', '--zone'], '--zone needs a value'),
])
def test_tpu_bad_input(args, message):
  assert message in one_error_line('tpu_vm.sh', *args)


# ------------------------------------------------------------------ GPU node


def test_gpu_node_dry_run():
  out = ok('gpu_node.sh', '--dry-run', '--gpus=0,1,2,3', '--mem-fraction=.8',
           '--config=configs/mae_imagenet.py:B', '--workdir=/scratch/mae_b',
           '--data-dir=/data/tfds', '--', '--config.mesh=(-1,1,1)')
  lines = out.splitlines()
  assert lines[0] == f'cd {ROOT}'
  assert 'export XLA_PYTHON_CLIENT_MEM_FRACTION=.8' in lines
  assert 'export CUDA_VISIBLE_DEVICES=0,1,2,3' in lines
  assert 'export TFDS_DATA_DIR=/data/tfds' in lines
  assert any(l.startswith('unset ') and 'MIMJAX_DISTRIBUTED' in l
             for l in lines)
  cmd = shlex.split(lines[-1])
  assert 'python -m mimjax.main' in lines[-1]
  assert cmd[1:] == ['-m', 'mimjax.main',
                     '--config=configs/mae_imagenet.py:B',
                     '--workdir=/scratch/mae_b', '--config.mesh=(-1,1,1)']


def test_gpu_node_defaults():
  out = ok('gpu_node.sh', '--dry-run', '--config=c.py', '--workdir=/w')
  assert 'export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90' in out
  assert 'CUDA_VISIBLE_DEVICES' not in out  # all GPUs


def test_gpu_node_real_run_with_fake_python(tmp_path):
  log = tmp_path / 'python.jsonl'
  python = fake(tmp_path / 'bin', 'python', log, env_vars=(
      'XLA_PYTHON_CLIENT_MEM_FRACTION', 'CUDA_VISIBLE_DEVICES',
      'MIMJAX_DISTRIBUTED'), body='print("step 1")')
  out_log = tmp_path / 'run.log'
  stdout = ok('gpu_node.sh', f'--python={python}', '--gpus=1,3',
              '--config=configs/demo.py', '--workdir=/tmp/w',
              f'--log={out_log}', '--', '--config.pretrain.steps=2',
              env={'MIMJAX_DISTRIBUTED': '1'})
  (rec,) = records(log)
  assert rec['argv'][1:] == ['-m', 'mimjax.main', '--config=configs/demo.py',
                             '--workdir=/tmp/w', '--config.pretrain.steps=2']
  assert rec['env'] == {'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.90',
                        'CUDA_VISIBLE_DEVICES': '1,3',
                        'MIMJAX_DISTRIBUTED': None}
  assert 'step 1' in stdout and 'step 1' in out_log.read_text()


@pytest.mark.parametrize('args,message', [
    (['--workdir=/w'], '--config'),
    (['--config=c.py'], '--workdir'),
    (['--config=c.py', '--workdir=/w', '--gpus=0;1'], '--gpus'),
    (['--config=c.py', '--workdir=/w', '--mem-fraction=1.5'],
     '--mem-fraction'),
    (['--config=c.py', '--workdir=/w', '--nodes=2'], 'unknown argument'),
])
def test_gpu_node_bad_input(args, message):
  assert message in one_error_line('gpu_node.sh', *args)


# ------------------------------------------------------------------ SLURM


def test_slurm_dry_run():
  out = ok('slurm.sh', '--dry-run', '--nodes=4', '--gpus-per-node=8',
           '--time=48:00:00', '--partition=gpu', '--account=ml',
           '--sbatch-flag=--qos=high', '--config=configs/mae_imagenet.py:L',
           '--workdir=/shared/runs/mae_l', '--data-dir=/shared/tfds',
           '--init-timeout=600', '--', '--config.mesh=(4,8,1)')
  cmds = commands(out)
  sbatch = next(c for c in cmds if 'sbatch' in c)
  i = sbatch.index('sbatch')
  assert sbatch[:i] == ['TFDS_DATA_DIR=/shared/tfds', 'MIMJAX_INIT_TIMEOUT=600']
  for f in ('--nodes=4', '--ntasks-per-node=1', '--gpus-per-node=8',
            '--time=48:00:00', '--partition=gpu', '--account=ml',
            '--qos=high', f'--chdir={ROOT}'):
    assert f in sbatch, f
  j = sbatch.index(str(LAUNCH / 'slurm.sbatch'))
  assert sbatch[j + 1:] == ['--config=configs/mae_imagenet.py:L',
                            '--workdir=/shared/runs/mae_l',
                            '--config.mesh=(4,8,1)']
  srun = next(c for c in cmds if c[0] == 'srun')
  for f in ('--nodes=4', '--ntasks=4', '--ntasks-per-node=1',
            '--kill-on-bad-exit=1'):
    assert f in srun, f
  k = srun.index('-m')
  assert srun[k:] == ['-m', 'mimjax.main', *sbatch[j + 1:]]
  assert 'export MIMJAX_DISTRIBUTED=1' in out
  assert 'export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7' in out
  assert 'export MIMJAX_INIT_TIMEOUT=600' in out


def test_slurm_defaults_come_from_the_template():
  template = (LAUNCH / 'slurm.sbatch').read_text()
  for line in ('#SBATCH --nodes=2', '#SBATCH --gpus-per-node=8',
               '#SBATCH --ntasks-per-node=1', '#SBATCH --time=',
               '#SBATCH --partition='):
    assert line in template, line
  out = ok('slurm.sh', '--dry-run', '--config=c.py', '--workdir=/w')
  sbatch = next(c for c in commands(out) if c[0] == 'sbatch')
  assert '--nodes=2' in sbatch and '--gpus-per-node=8' in sbatch
  assert not any(a.startswith('--partition') for a in sbatch)


def test_slurm_real_submit_and_job_with_fakes(tmp_path):
  """slurm.sh -> fake sbatch; then the batch script itself -> fake srun."""
  bindir = tmp_path / 'bin'
  sbatch_log, srun_log = tmp_path / 'sbatch.jsonl', tmp_path / 'srun.jsonl'
  fake(bindir, 'sbatch', sbatch_log, env_vars=('TFDS_DATA_DIR',))
  fake(bindir, 'srun', srun_log, env_vars=(
      'MIMJAX_DISTRIBUTED', 'JAX_LOCAL_DEVICE_IDS', 'TFDS_DATA_DIR',
      'XLA_PYTHON_CLIENT_MEM_FRACTION'))
  ok('slurm.sh', '--nodes=3', '--gpus-per-node=h100:4',
     '--config=configs/mae_imagenet.py:L', '--workdir=/shared/l',
     '--data-dir=/shared/tfds', '--', '--config.mesh=(3,4,1)',
     path_prefix=bindir)
  (sub,) = records(sbatch_log)
  assert '--nodes=3' in sub['argv'] and '--gpus-per-node=h100:4' in sub['argv']
  assert sub['env'] == {'TFDS_DATA_DIR': '/shared/tfds'}
  script = sub['argv'].index(str(LAUNCH / 'slurm.sbatch'))
  job_args = sub['argv'][script + 1:]
  # What SLURM would do with the submission, on the job's first node.
  job_env = {'SLURM_JOB_ID': '1234', 'SLURM_JOB_NUM_NODES': '3',
             'SLURM_GPUS_PER_NODE': 'h100:4', 'SLURM_SUBMIT_DIR': str(ROOT),
             'TFDS_DATA_DIR': '/shared/tfds'}
  proc = subprocess.run(['bash', str(LAUNCH / 'slurm.sbatch'), *job_args],
                        env=_env(job_env, bindir), cwd=tmp_path,
                        capture_output=True, text=True, timeout=60,
                        check=False)
  assert proc.returncode == 0, proc.stderr
  (step,) = records(srun_log)
  argv = step['argv']
  assert '--nodes=3' in argv and '--ntasks-per-node=1' in argv
  assert argv[argv.index('-m') - 1] == '.venv/bin/python'
  assert argv[argv.index('-m'):] == ['-m', 'mimjax.main', *job_args]
  assert step['env'] == {'MIMJAX_DISTRIBUTED': '1',
                         'JAX_LOCAL_DEVICE_IDS': '0,1,2,3',
                         'TFDS_DATA_DIR': '/shared/tfds',
                         'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.90'}


def test_slurm_sbatch_outside_a_job():
  proc = subprocess.run(['bash', str(LAUNCH / 'slurm.sbatch')], env=_env(),
                        capture_output=True, text=True, check=False)
  assert proc.returncode != 0
  assert 'not inside a SLURM job' in proc.stderr


@pytest.mark.parametrize('args,message', [
    (['--workdir=/w'], '--config'),
    (['--config=c.py'], '--workdir'),
    (['--config=c.py', '--workdir=runs/x'], 'absolute path'),
    (['--config=c.py', '--workdir=/w', '--nodes=0'], '--nodes'),
    (['--config=c.py', '--workdir=/w', '--gpus-per-node=many'],
     '--gpus-per-node'),
    (['--config=c.py', '--workdir=/w', '--gpus=8'], 'unknown argument'),
])
def test_slurm_bad_input(args, message):
  assert message in one_error_line('slurm.sh', *args)


# ------------------------------------------------------------------ docs


def test_scaling_doc_commands_are_valid():
  """Every launch/ dry-run command in docs/scaling.md runs as written."""
  doc = (ROOT / 'docs' / 'scaling.md').read_text()
  blocks, current, inside = [], [], False
  for line in doc.splitlines():
    if line.startswith('```'):
      if inside:
        blocks.append('\n'.join(current))
      current, inside = [], not inside
      continue
    if inside:
      current.append(line)
  snippets = [b for b in blocks if 'launch/' in b and '--dry-run' in b]
  assert len(snippets) >= 3
  for snippet in snippets:
    proc = subprocess.run(['bash', '-euo', 'pipefail', '-c', snippet],
                          cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, (snippet, proc.stderr)
    assert 'mimjax.main' in proc.stdout
