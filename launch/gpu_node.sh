#!/usr/bin/env bash
# mimjax on one machine with all (or some) of its GPUs: one Python process
# drives every visible GPU (JAX single-controller on one host; no
# jax.distributed). --dry-run prints the environment and the command.
set -euo pipefail

PROG=${0##*/}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
usage: $PROG [options] [-- MIMJAX_FLAGS ...]

Options (environment variable in brackets):
  --config CONFIG       recipe, e.g. configs/mae_imagenet.py:B [MIMJAX_CONFIG] (required)
  --workdir DIR         run directory [MIMJAX_WORKDIR] (required)
  --gpus LIST           CUDA_VISIBLE_DEVICES, e.g. 0,1,2,3 (default: leave it
                        as it is, i.e. every GPU) [CUDA_VISIBLE_DEVICES]
  --mem-fraction F      XLA_PYTHON_CLIENT_MEM_FRACTION, the share of each
                        GPU's memory JAX preallocates (default 0.90)
                        [XLA_PYTHON_CLIENT_MEM_FRACTION]
  --data-dir DIR        TFDS_DATA_DIR [TFDS_DATA_DIR]
  --flags "FLAGS"       extra mimjax flags [MIMJAX_FLAGS]; flags after '--'
                        are appended too
  --python PATH         interpreter [MIMJAX_PYTHON] (default: the repo's
                        .venv/bin/python if present, else python3)
  --log FILE            also write the output to FILE (tee)
  --dry-run             print the environment and the command [DRY_RUN=1]
  -h, --help            this text

Example:
  $PROG --dry-run --gpus=0,1,2,3 --config=configs/mae_imagenet.py:B \\
      --workdir=/scratch/mae_b -- --config.mesh='(-1,1,1)'
EOF
}

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CONFIG=${MIMJAX_CONFIG:-}
WORKDIR=${MIMJAX_WORKDIR:-}
GPUS=${CUDA_VISIBLE_DEVICES:-}
MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
DATA_DIR=${TFDS_DATA_DIR:-}
FLAGS=${MIMJAX_FLAGS:-}
PYTHON=${MIMJAX_PYTHON:-}
LOG=''
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
    --config | --config=*) take "$arg" "${2-}" "$has_next"; CONFIG=$VALUE ;;
    --workdir | --workdir=*) take "$arg" "${2-}" "$has_next"; WORKDIR=$VALUE ;;
    --gpus | --gpus=*) take "$arg" "${2-}" "$has_next"; GPUS=$VALUE ;;
    --mem-fraction | --mem-fraction=*)
      take "$arg" "${2-}" "$has_next"; MEM_FRACTION=$VALUE ;;
    --data-dir | --data-dir=*) take "$arg" "${2-}" "$has_next"; DATA_DIR=$VALUE ;;
    --flags | --flags=*) take "$arg" "${2-}" "$has_next"; FLAGS=$VALUE ;;
    --python | --python=*) take "$arg" "${2-}" "$has_next"; PYTHON=$VALUE ;;
    --log | --log=*) take "$arg" "${2-}" "$has_next"; LOG=$VALUE ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument ${arg%%=*} (see $PROG -h)" ;;
  esac
  shift "$SHIFT"
done

[[ -n $CONFIG ]] || die "--config (or MIMJAX_CONFIG) is required, e.g. configs/mae_imagenet.py:B"
[[ -n $WORKDIR ]] || die "--workdir (or MIMJAX_WORKDIR) is required"
[[ -z $GPUS || $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] ||
  die "--gpus must be a comma-separated list of GPU indices like 0,1,2,3, got '$GPUS'"
[[ $MEM_FRACTION =~ ^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$ ]] ||
  die "--mem-fraction must be a number in (0, 1], got '$MEM_FRACTION'"
if [[ -z $PYTHON ]]; then
  if [[ -x $REPO_ROOT/.venv/bin/python ]]; then
    PYTHON=$REPO_ROOT/.venv/bin/python
  else
    PYTHON=python3
  fi
fi

FLAG_ARGS=()
if [[ -n $FLAGS ]]; then
  read -r -a FLAG_ARGS <<<"$FLAGS"
fi
FLAG_ARGS+=("${EXTRA[@]}")

# One host: no jax.distributed, whatever the calling shell has set.
UNSET=(MIMJAX_DISTRIBUTED MIMJAX_COORDINATOR MIMJAX_NUM_PROCESSES MIMJAX_PROCESS_ID)
ENV=(XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION")
[[ -n $GPUS ]] && ENV+=(CUDA_VISIBLE_DEVICES="$GPUS")
[[ -n $DATA_DIR ]] && ENV+=(TFDS_DATA_DIR="$DATA_DIR")
CMD=("$PYTHON" -m mimjax.main --config="$CONFIG" --workdir="$WORKDIR"
  "${FLAG_ARGS[@]}")

if truthy "$DRY"; then
  echo "cd $(quote "$REPO_ROOT")"
  echo "unset ${UNSET[*]}"
  for kv in "${ENV[@]}"; do
    echo "export ${kv%%=*}=$(quote "${kv#*=}")"
  done
  if [[ -n $LOG ]]; then
    echo "$(quote_all "${CMD[@]}") 2>&1 | tee -a $(quote "$LOG")"
  else
    quote_all "${CMD[@]}"
    echo
  fi
  exit 0
fi

cd "$REPO_ROOT"
unset "${UNSET[@]}"
export "${ENV[@]}"
if [[ -n $LOG ]]; then
  "${CMD[@]}" 2>&1 | tee -a "$LOG"
else
  exec "${CMD[@]}"
fi
