#!/usr/bin/env bash
# Submits launch/slurm.sbatch: one task per node, each driving all of its
# node's GPUs. --dry-run prints the sbatch command and the srun line the job
# will run, without submitting anything.
set -euo pipefail

PROG=${0##*/}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SBATCH_FILE=$REPO_ROOT/launch/slurm.sbatch

usage() {
  cat <<EOF
usage: $PROG [options] [-- MIMJAX_FLAGS ...]

Job (defaults: the #SBATCH lines of launch/slurm.sbatch):
  --nodes N             nodes, one process each [MIMJAX_SLURM_NODES]
  --gpus-per-node G     GPUs per node [MIMJAX_SLURM_GPUS]
  --cpus-per-task C     CPUs per process, for the input pipeline
  --time T              time limit, e.g. 24:00:00
  --partition P         partition
  --account A           account
  --job-name NAME       job name
  --sbatch-flag FLAG    any other sbatch flag, repeatable (e.g. --sbatch-flag=--qos=high)
  (sbatch's own SBATCH_PARTITION, SBATCH_TIMELIMIT, SBATCH_ACCOUNT, ... work too)
mimjax:
  --config CONFIG       recipe, e.g. configs/mae_imagenet.py:L [MIMJAX_CONFIG] (required)
  --workdir DIR         run directory on a filesystem every node sees
                        (or gs://) [MIMJAX_WORKDIR] (required)
  --data-dir DIR        TFDS_DATA_DIR, seen by every node [TFDS_DATA_DIR]
  --flags "FLAGS"       extra mimjax flags [MIMJAX_FLAGS]; flags after '--'
                        are appended too
  --init-timeout S      MIMJAX_INIT_TIMEOUT: seconds jax.distributed waits for
                        every process (default 300) [MIMJAX_INIT_TIMEOUT]
  --mem-fraction F      XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.90)
  --python PATH         interpreter on the nodes [MIMJAX_PYTHON] (.venv/bin/python)
  --dry-run             print the sbatch command and the srun line [DRY_RUN=1]
  -h, --help            this text

Example:
  $PROG --dry-run --nodes=4 --gpus-per-node=8 --time=48:00:00 \\
      --config=configs/mae_imagenet.py:L --workdir=/shared/runs/mae_l \\
      --data-dir=/shared/tfds -- --config.mesh='(4,8,1)'
EOF
}

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# The value of '#SBATCH --KEY=VALUE' in the template.
template() {
  sed -n "s/^#SBATCH --$1=\\(.*\\)$/\\1/p" "$SBATCH_FILE" | head -n 1
}

NODES=${MIMJAX_SLURM_NODES:-$(template nodes)}
GPUS=${MIMJAX_SLURM_GPUS:-$(template gpus-per-node)}
CPUS=$(template cpus-per-task)
TIME=''
PARTITION=''
ACCOUNT=''
JOB_NAME=
SBATCH_FLAGS=()
CONFIG=${MIMJAX_CONFIG:-}
WORKDIR=${MIMJAX_WORKDIR:-}
DATA_DIR=${TFDS_DATA_DIR:-}
FLAGS=${MIMJAX_FLAGS:-}
INIT_TIMEOUT=${MIMJAX_INIT_TIMEOUT:-}
MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-}
PYTHON=${MIMJAX_PYTHON:-}
DRY=${DRY_RUN:-0}
EXTRA=()

while (($#)); do
  arg=$1
  has_next=0
  (($# > 1)) && has_next=1
  SHIFT=1
  case "$arg" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY=1 ;;
    --nodes | --nodes=*) take "$arg" "${2-}" "$has_next"; NODES=$VALUE ;;
    --gpus-per-node | --gpus-per-node=*)
      take "$arg" "${2-}" "$has_next"; GPUS=$VALUE ;;
    --cpus-per-task | --cpus-per-task=*)
      take "$arg" "${2-}" "$has_next"; CPUS=$VALUE ;;
    --time | --time=*) take "$arg" "${2-}" "$has_next"; TIME=$VALUE ;;
    --partition | --partition=*) take "$arg" "${2-}" "$has_next"; PARTITION=$VALUE ;;
    --account | --account=*) take "$arg" "${2-}" "$has_next"; ACCOUNT=$VALUE ;;
    --job-name | --job-name=*) take "$arg" "${2-}" "$has_next"; JOB_NAME=$VALUE ;;
    --sbatch-flag | --sbatch-flag=*)
      take "$arg" "${2-}" "$has_next"; SBATCH_FLAGS+=("$VALUE") ;;
    --config | --config=*) take "$arg" "${2-}" "$has_next"; CONFIG=$VALUE ;;
    --workdir | --workdir=*) take "$arg" "${2-}" "$has_next"; WORKDIR=$VALUE ;;
    --data-dir | --data-dir=*) take "$arg" "${2-}" "$has_next"; DATA_DIR=$VALUE ;;
    --flags | --flags=*) take "$arg" "${2-}" "$has_next"; FLAGS=$VALUE ;;
    --init-timeout | --init-timeout=*)
      take "$arg" "${2-}" "$has_next"; INIT_TIMEOUT=$VALUE ;;
    --mem-fraction | --mem-fraction=*)
      take "$arg" "${2-}" "$has_next"; MEM_FRACTION=$VALUE ;;
    --python | --python=*) take "$arg" "${2-}" "$has_next"; PYTHON=$VALUE ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument ${arg%%=*} (see $PROG -h)" ;;
  esac
  shift "$SHIFT"
done

[[ -n $CONFIG ]] || die "--config (or MIMJAX_CONFIG) is required, e.g. configs/mae_imagenet.py:L"
[[ -n $WORKDIR ]] || die "--workdir (or MIMJAX_WORKDIR) is required (a path every node sees)"
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive whole number, got '$NODES'"
[[ $GPUS =~ ^([A-Za-z0-9_-]+:)?[1-9][0-9]*$ ]] ||
  die "--gpus-per-node must be a count like 8 (or type:8), got '$GPUS'"
[[ -z $CPUS || $CPUS =~ ^[1-9][0-9]*$ ]] || die "--cpus-per-task must be a positive whole number, got '$CPUS'"
[[ -z $INIT_TIMEOUT || $INIT_TIMEOUT =~ ^[0-9]+$ ]] ||
  die "--init-timeout must be a whole number of seconds, got '$INIT_TIMEOUT'"
if [[ $WORKDIR != gs://* && $WORKDIR != /* ]]; then
  die "--workdir must be an absolute path on a shared filesystem (or gs://), got '$WORKDIR'"
fi

FLAG_ARGS=()
if [[ -n $FLAGS ]]; then
  read -r -a FLAG_ARGS <<<"$FLAGS"
fi
FLAG_ARGS+=("${EXTRA[@]}")

# sbatch exports the submitting environment to the job (--export=ALL).
ENV=()
[[ -n $DATA_DIR ]] && ENV+=(TFDS_DATA_DIR="$DATA_DIR")
[[ -n $INIT_TIMEOUT ]] && ENV+=(MIMJAX_INIT_TIMEOUT="$INIT_TIMEOUT")
[[ -n $MEM_FRACTION ]] && ENV+=(XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION")
[[ -n $PYTHON ]] && ENV+=(MIMJAX_PYTHON="$PYTHON")

SBATCH=(sbatch --chdir="$REPO_ROOT" --nodes="$NODES" --ntasks-per-node=1
  --gpus-per-node="$GPUS")
[[ -n $CPUS ]] && SBATCH+=(--cpus-per-task="$CPUS")
[[ -n $TIME ]] && SBATCH+=(--time="$TIME")
[[ -n $PARTITION ]] && SBATCH+=(--partition="$PARTITION")
[[ -n $ACCOUNT ]] && SBATCH+=(--account="$ACCOUNT")
[[ -n $JOB_NAME ]] && SBATCH+=(--job-name="$JOB_NAME")
SBATCH+=("${SBATCH_FLAGS[@]}" "$SBATCH_FILE" --config="$CONFIG"
  --workdir="$WORKDIR" "${FLAG_ARGS[@]}")

if truthy "$DRY"; then
  echo "# submit:"
  if ((${#ENV[@]})); then
    echo "$(quote_all "${ENV[@]}") $(quote_all "${SBATCH[@]}")"
  else
    quote_all "${SBATCH[@]}"
    echo
  fi
  echo "# the job then runs, on its first node:"
  env "${ENV[@]}" SLURM_JOB_NUM_NODES="$NODES" SLURM_GPUS_ON_NODE="${GPUS##*:}" \
    SLURM_CPUS_PER_TASK="$CPUS" MIMJAX_REPO="$REPO_ROOT" MIMJAX_SLURM_DRY_RUN=1 \
    bash "$SBATCH_FILE" --config="$CONFIG" --workdir="$WORKDIR" "${FLAG_ARGS[@]}"
  exit 0
fi

command -v sbatch >/dev/null || die "sbatch not found (run this on a SLURM login node, or use --dry-run)"
exec env "${ENV[@]}" "${SBATCH[@]}"
