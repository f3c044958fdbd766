#!/usr/bin/env bash
# mimjax on a Cloud TPU VM or pod slice: create it, put the code and a venv
# on every worker, start the same run on all of them, stop it. Every
# parameter is a flag or an environment variable; --dry-run prints the exact
# commands. Following the logs and deleting the TPU are one gcloud command
# each: see docs/launch.md.
set -euo pipefail

PROG=${0##*/}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LIBTPU_INDEX=https://storage.googleapis.com/jax-releases/libtpu_releases.html

usage() {
  cat <<EOF
usage: $PROG [options] STEP [STEP ...] [-- MIMJAX_FLAGS ...]

Steps (run in the order given; flags after '--' go to mimjax):
  create    gcloud compute tpus tpu-vm create (needs --accelerator-type)
  install   copy the working tree to every worker and pip install -e '.[tpu]'
            into ~/mimjax/.venv (Python 3.11, through uv)
  copy      copy the working tree to every worker again (after an edit)
  run       start 'python -m mimjax.main' on every worker in the background
            (nohup); each worker logs to ~/mimjax/logs/RUN_NAME.log
  stop      kill the run started by 'run' on every worker

Options (environment variable in brackets):
  --name NAME               TPU name [TPU_NAME] (required)
  --zone ZONE               e.g. us-central2-b [TPU_ZONE] (required)
  --project PROJECT         GCP project [TPU_PROJECT, CLOUDSDK_CORE_PROJECT]
  --accelerator-type TYPE   v4-32, v5p-128, v5litepod-16, v6e-8 [TPU_ACCELERATOR]
  --version VERSION         runtime version [TPU_RUNTIME]; default from the
                            type: v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5,
                            v5e v2-alpha-tpuv5-lite, v2-v4 tpu-ubuntu2204-base
  --spot | --preemptible    create a spot or preemptible TPU [TPU_SPOT=1,
                            TPU_PREEMPTIBLE=1]
  --internal-ip             ssh/scp over internal IPs [TPU_INTERNAL_IP=1]
  --config CONFIG           recipe, e.g. configs/mae_imagenet.py:L [MIMJAX_CONFIG]
  --workdir gs://...        run directory every worker sees: gs://, or an
                            absolute path on a shared mount [MIMJAX_WORKDIR]
  --data-dir gs://...       TFDS_DATA_DIR on the workers, likewise [TFDS_DATA_DIR]
  --run-name NAME           names logs/NAME.log and logs/NAME.pid on each
                            worker [RUN_NAME] (default: mimjax)
  --init-timeout SECONDS    MIMJAX_INIT_TIMEOUT on the workers (default: the
                            library's, 300) [MIMJAX_INIT_TIMEOUT]
  --dry-run                 print the commands instead of running them [DRY_RUN=1]
  -h, --help                this text

Example (prints every command, runs none):
  $PROG --dry-run --name=mae-l --zone=us-central2-b --project=my-proj \\
      --accelerator-type=v4-32 --config=configs/mae_imagenet.py:L \\
      --workdir=gs://my-bucket/mae_l --data-dir=gs://my-bucket/tfds \\
      create install run -- --config.mesh='(1,-1,1)'
EOF
}

die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

truthy() {
  case "${1:-0}" in 1 | true | yes | on) return 0 ;; *) return 1 ;; esac
}

# One word for a POSIX shell, plain words (and --flag=plain) left readable.
quote() {
  local s=$1 safe='^[-A-Za-z0-9_@%+=:,./]+$'
  if [[ -n $s && $s =~ $safe ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out='' word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# ----------------------------------------------------------------- options

NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}
ACCELERATOR=${TPU_ACCELERATOR:-}
RUNTIME=${TPU_RUNTIME:-}
SPOT=${TPU_SPOT:-0}
PREEMPTIBLE=${TPU_PREEMPTIBLE:-0}
INTERNAL_IP=${TPU_INTERNAL_IP:-0}
CONFIG=${MIMJAX_CONFIG:-}
WORKDIR=${MIMJAX_WORKDIR:-}
DATA_DIR=${TFDS_DATA_DIR:-}
RUN_NAME=${RUN_NAME:-mimjax}
INIT_TIMEOUT=${MIMJAX_INIT_TIMEOUT:-}
DRY=${DRY_RUN:-0}
STEPS=()
EXTRA=()
unset value

while (($#)); do
  arg=$1
  shift
  if [[ $arg == --*=* ]]; then
    value=${arg#*=}
    arg=${arg%%=*}
  fi
  case "$arg" in
    --name | --zone | --project | --accelerator-type | --version | --config | \
      --workdir | --data-dir | --run-name | --init-timeout)
      if [[ -z ${value+set} ]]; then
        (($#)) || die "$arg needs a value"
        value=$1
        shift
      fi ;;
  esac
  case "$arg" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY=1 ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --internal-ip) INTERNAL_IP=1 ;;
    --name) NAME=$value ;;
    --zone) ZONE=$value ;;
    --project) PROJECT=$value ;;
    --accelerator-type) ACCELERATOR=$value ;;
    --version) RUNTIME=$value ;;
    --config) CONFIG=$value ;;
    --workdir) WORKDIR=$value ;;
    --data-dir) DATA_DIR=$value ;;
    --run-name) RUN_NAME=$value ;;
    --init-timeout) INIT_TIMEOUT=$value ;;
    --) EXTRA=("$@"); break ;;
    -*) die "unknown option $arg (see $PROG -h)" ;;
    create | install | copy | run | stop) STEPS+=("$arg") ;;
    *) die "unknown step '$arg' (create, install, copy, run, stop)" ;;
  esac
  unset value
done

((${#STEPS[@]})) || die "no step given (create, install, copy, run, stop; -h for help)"
[[ -n $NAME ]] || die "--name (or TPU_NAME) is required"
[[ -n $ZONE ]] || die "--zone (or TPU_ZONE) is required"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name '$NAME' must be lower-case letters, digits and '-', starting with a letter"
[[ $RUN_NAME =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run-name '$RUN_NAME' may only hold letters, digits, '_', '.', '-'"
[[ -z $INIT_TIMEOUT || $INIT_TIMEOUT =~ ^[0-9]+$ ]] || die "--init-timeout must be a whole number of seconds, got '$INIT_TIMEOUT'"
if truthy "$SPOT" && truthy "$PREEMPTIBLE"; then
  die "--spot and --preemptible exclude each other"
fi

default_runtime() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

# gs://... or an absolute path (a shared mount: Filestore, gcsfuse).
shared() {
  [[ $1 == gs://?* || $1 == /?* ]]
}

# Check every step's inputs before running any of them.
for step in "${STEPS[@]}"; do
  case "$step" in
    create)
      [[ -n $ACCELERATOR ]] || die "create needs --accelerator-type (or TPU_ACCELERATOR), e.g. v4-32"
      [[ -n $RUNTIME ]] || default_runtime "$ACCELERATOR" >/dev/null ||
        die "no default runtime for '$ACCELERATOR'; pass --version (or TPU_RUNTIME)" ;;
    run)
      [[ -n $CONFIG ]] || die "run needs --config (or MIMJAX_CONFIG), e.g. configs/mae_imagenet.py:L"
      [[ -n $WORKDIR ]] || die "run needs --workdir (or MIMJAX_WORKDIR), a gs:// path"
      shared "$WORKDIR" || die "--workdir must be a path every worker sees (gs://..., or an absolute path on a shared mount), got '$WORKDIR'"
      [[ -n $DATA_DIR ]] || die "run needs --data-dir (or TFDS_DATA_DIR), a gs:// path"
      shared "$DATA_DIR" || die "--data-dir must be a path every worker sees (gs://..., or an absolute path on a shared mount), got '$DATA_DIR'" ;;
  esac
done
if ! truthy "$DRY"; then
  command -v gcloud >/dev/null || die "gcloud not found (install the Google Cloud CLI, or use --dry-run)"
fi

# ----------------------------------------------------------------- steps

# Runs a command, or prints it (copy-pastable) under --dry-run.
x() {
  if truthy "$DRY"; then
    quote_all "$@"
    echo
  else
    "$@"
  fi
}

note() {
  if truthy "$DRY"; then echo "# $*"; else echo "$PROG: $*" >&2; fi
}

SCOPE=(--zone="$ZONE")
[[ -n $PROJECT ]] && SCOPE+=(--project="$PROJECT")
SSH=("${SCOPE[@]}")
truthy "$INTERNAL_IP" && SSH+=(--internal-ip)
TARBALL=${TMPDIR:-/tmp}/mimjax-src-$NAME.tgz
REMOTE_TARBALL=/tmp/mimjax-src.tgz
R="\$HOME/mimjax"  # the code directory on a worker, expanded there

on_workers() {  # on_workers COMMAND: ssh to every worker at once
  x gcloud compute tpus tpu-vm ssh "$NAME" "${SSH[@]}" --worker=all \
    --command="$1"
}

step_create() {
  local runtime=${RUNTIME:-$(default_runtime "$ACCELERATOR")}
  note "create: $ACCELERATOR '$NAME' in $ZONE, runtime $runtime"
  local cmd=(gcloud compute tpus tpu-vm create "$NAME" "${SCOPE[@]}"
    --accelerator-type="$ACCELERATOR" --version="$runtime")
  truthy "$SPOT" && cmd+=(--spot)
  truthy "$PREEMPTIBLE" && cmd+=(--preemptible)
  x "${cmd[@]}"
}

step_copy() {
  note "copy: $REPO_ROOT -> ~/mimjax on every worker"
  x tar -czf "$TARBALL" --exclude=./.venv --exclude=./.git \
    --exclude='./workdir*' --exclude=./build --exclude=./dist \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
    --exclude='*.pyc' -C "$REPO_ROOT" .
  x gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:$REMOTE_TARBALL" \
    "${SSH[@]}" --worker=all
  on_workers "mkdir -p $R && tar -xzf $REMOTE_TARBALL -C $R && rm -f $REMOTE_TARBALL"
  truthy "$DRY" || rm -f "$TARBALL"
}

step_install() {
  step_copy
  note "install: a venv (Python 3.11) with pip install -e '.[tpu]' on every worker"
  # uv brings the Python >= 3.11 that the TPU images lack (Ubuntu 22.04: 3.10).
  on_workers "set -e; cd $R; export PATH=\$HOME/.local/bin:\$PATH; command -v uv >/dev/null || python3 -m pip install --user --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh; [ -x .venv/bin/python ] || uv venv --python 3.11 .venv; uv pip install --python .venv/bin/python -e '.[tpu]' --find-links $LIBTPU_INDEX"
}

step_run() {
  local env main log=logs/$RUN_NAME.log pid=logs/$RUN_NAME.pid
  env="MIMJAX_DISTRIBUTED=1 TFDS_DATA_DIR=$(quote "$DATA_DIR")"
  [[ -n $INIT_TIMEOUT ]] && env+=" MIMJAX_INIT_TIMEOUT=$INIT_TIMEOUT"
  main=$(quote_all .venv/bin/python -m mimjax.main --config="$CONFIG" \
    --workdir="$WORKDIR" "${EXTRA[@]}")
  note "run: '$RUN_NAME' on every worker, each logging to ~/mimjax/$log"
  on_workers "cd $R && mkdir -p logs && if [ -f $pid ] && kill -0 \$(cat $pid) 2>/dev/null; then echo \"\$(hostname): $RUN_NAME is already running\" >&2; exit 1; fi; $env nohup $main > $log 2>&1 < /dev/null & echo \$! > $pid"
}

step_stop() {
  local pid=$R/logs/$RUN_NAME.pid
  note "stop: '$RUN_NAME' on every worker"
  on_workers "if [ -f $pid ]; then kill \$(cat $pid) 2>/dev/null || true; rm -f $pid; fi"
}

for step in "${STEPS[@]}"; do
  "step_$step"
done
