#!/usr/bin/env bash
# Cloud TPU VM / pod slice lifecycle for mimjax: create, install, copy, run,
# logs, stop, delete. One command per step, every parameter a flag or an
# environment variable, and --dry-run to print the exact commands.
set -euo pipefail

PROG=${0##*/}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LIBTPU_INDEX=https://storage.googleapis.com/jax-releases/libtpu_releases.html

usage() {
  cat <<EOF
usage: $PROG [options] STEP [STEP ...] [-- MIMJAX_FLAGS ...]

Steps (run in the order given):
  create    gcloud compute tpus tpu-vm create (needs --accelerator-type)
  install   put the code on every worker (copy, or git clone with --git-url)
            and pip install -e '.[tpu]' into ~/REMOTE_DIR/.venv (Python 3.11)
  copy      tar the local working tree and scp it to every worker
  run       start 'python -m mimjax.main' on every worker (--worker=all) in
            the background with nohup; one log file per worker
  logs      follow the workers' logs (Ctrl-C stops following, not the job)
  stop      kill the run started by 'run' on every worker
  delete    gcloud compute tpus tpu-vm delete

Options (environment variable in brackets):
  --name NAME               TPU name [TPU_NAME] (required)
  --zone ZONE               e.g. us-central2-b [TPU_ZONE] (required)
  --project PROJECT         GCP project [TPU_PROJECT, CLOUDSDK_CORE_PROJECT]
  --accelerator-type TYPE   v4-32, v5p-128, v5litepod-16, v6e-8 [TPU_ACCELERATOR]
  --version VERSION         runtime version [TPU_RUNTIME]; default from the
                            type: v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5,
                            v5e v2-alpha-tpuv5-lite, v2-v4 tpu-ubuntu2204-base
  --spot                    create a spot TPU [TPU_SPOT=1]
  --preemptible             create a preemptible TPU [TPU_PREEMPTIBLE=1]
  --internal-ip             ssh/scp over internal IPs [TPU_INTERNAL_IP=1]
  --config CONFIG           recipe, e.g. configs/mae_imagenet.py:L [MIMJAX_CONFIG]
  --workdir gs://...        run directory every worker sees: gs://, or an
                            absolute path on a shared mount [MIMJAX_WORKDIR]
  --data-dir gs://...       TFDS_DATA_DIR on the workers, likewise [TFDS_DATA_DIR]
  --flags "FLAGS"           extra mimjax flags [MIMJAX_FLAGS]; flags after
                            '--' are appended too
  --run-name NAME           names logs/NAME.log and logs/NAME.pid on each
                            worker [RUN_NAME] (default: mimjax)
  --init-timeout SECONDS    MIMJAX_INIT_TIMEOUT on the workers (default: the
                            library's, 300) [MIMJAX_INIT_TIMEOUT]
  --remote-dir DIR          code directory on the workers, relative to the
                            home directory [REMOTE_DIR] (default: mimjax)
  --git-url URL             install clones URL instead of copying [GIT_URL]
  --git-ref REF             branch, tag or commit to check out [GIT_REF]
  --python VERSION          Python for the workers' venv [PYTHON_VERSION] (3.11)
  --log-worker W            worker(s) 'logs' follows: all, 0, 1-3 [LOG_WORKER]
  --yes                     delete without asking (gcloud --quiet) [TPU_YES=1]
  --dry-run                 print the commands instead of running them [DRY_RUN=1]
  -h, --help                this text

Example (prints every command, runs none):
  $PROG --dry-run --name=mae-l --zone=us-central2-b --project=my-proj \\
      --accelerator-type=v4-32 --config=configs/mae_imagenet.py:L \\
      --workdir=gs://my-bucket/mae_l --data-dir=gs://my-bucket/tfds \\
      create install run logs -- --config.mesh='(1,-1,1)'
EOF
}

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

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
FLAGS=${MIMJAX_FLAGS:-}
RUN_NAME=${RUN_NAME:-mimjax}
INIT_TIMEOUT=${MIMJAX_INIT_TIMEOUT:-}
REMOTE_DIR=${REMOTE_DIR:-mimjax}
GIT_URL=${GIT_URL:-}
GIT_REF=${GIT_REF:-}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
LOG_WORKER=${LOG_WORKER:-all}
YES=${TPU_YES:-0}
DRY=${DRY_RUN:-0}
STEPS=()
EXTRA=()

while (($#)); do
  arg=$1
  has_next=0
  (($# > 1)) && has_next=1
  SHIFT=1
  case "$arg" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY=1 ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --internal-ip) INTERNAL_IP=1 ;;
    --yes) YES=1 ;;
    --name | --name=*) take "$arg" "${2-}" "$has_next"; NAME=$VALUE ;;
    --zone | --zone=*) take "$arg" "${2-}" "$has_next"; ZONE=$VALUE ;;
    --project | --project=*) take "$arg" "${2-}" "$has_next"; PROJECT=$VALUE ;;
    --accelerator-type | --accelerator-type=*)
      take "$arg" "${2-}" "$has_next"; ACCELERATOR=$VALUE ;;
    --version | --version=* | --runtime-version | --runtime-version=*)
      take "$arg" "${2-}" "$has_next"; RUNTIME=$VALUE ;;
    --config | --config=*) take "$arg" "${2-}" "$has_next"; CONFIG=$VALUE ;;
    --workdir | --workdir=*) take "$arg" "${2-}" "$has_next"; WORKDIR=$VALUE ;;
    --data-dir | --data-dir=*) take "$arg" "${2-}" "$has_next"; DATA_DIR=$VALUE ;;
    --flags | --flags=*) take "$arg" "${2-}" "$has_next"; FLAGS=$VALUE ;;
    --run-name | --run-name=*) take "$arg" "${2-}" "$has_next"; RUN_NAME=$VALUE ;;
    --init-timeout | --init-timeout=*)
      take "$arg" "${2-}" "$has_next"; INIT_TIMEOUT=$VALUE ;;
    --remote-dir | --remote-dir=*)
      take "$arg" "${2-}" "$has_next"; REMOTE_DIR=$VALUE ;;
    --git-url | --git-url=*) take "$arg" "${2-}" "$has_next"; GIT_URL=$VALUE ;;
    --git-ref | --git-ref=*) take "$arg" "${2-}" "$has_next"; GIT_REF=$VALUE ;;
    --python | --python=*)
      take "$arg" "${2-}" "$has_next"; PYTHON_VERSION=$VALUE ;;
    --log-worker | --log-worker=*)
      take "$arg" "${2-}" "$has_next"; LOG_WORKER=$VALUE ;;
    --) shift; EXTRA=("$@"); break ;;
    -*) die "unknown option ${arg%%=*} (see $PROG -h)" ;;
    create | install | copy | run | logs | stop | delete) STEPS+=("$arg") ;;
    *) die "unknown step '$arg' (create, install, copy, run, logs, stop, delete)" ;;
  esac
  shift "$SHIFT"
done

((${#STEPS[@]})) || die "no step given (create, install, copy, run, logs, stop, delete; -h for help)"
[[ -n $NAME ]] || die "--name (or TPU_NAME) is required"
[[ -n $ZONE ]] || die "--zone (or TPU_ZONE) is required"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name '$NAME' must be lower-case letters, digits and '-', starting with a letter"
[[ $RUN_NAME =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run-name '$RUN_NAME' may only hold letters, digits, '_', '.', '-'"
[[ $REMOTE_DIR =~ ^[A-Za-z0-9_./-]+$ ]] || die "--remote-dir '$REMOTE_DIR' may only hold letters, digits, '_', '.', '/', '-'"
[[ -z $INIT_TIMEOUT || $INIT_TIMEOUT =~ ^[0-9]+$ ]] || die "--init-timeout must be a whole number of seconds, got '$INIT_TIMEOUT'"
if truthy "$SPOT" && truthy "$PREEMPTIBLE"; then
  die "--spot and --preemptible exclude each other"
fi

# Extra mimjax flags: --flags (split on whitespace) then everything after --.
FLAG_ARGS=()
if [[ -n $FLAGS ]]; then
  read -r -a FLAG_ARGS <<<"$FLAGS"
fi
FLAG_ARGS+=("${EXTRA[@]}")

# ----------------------------------------------------------------- helpers

# Quotes one word for a POSIX shell, leaving plain words readable.
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
SSH_OPTS=()
truthy "$INTERNAL_IP" && SSH_OPTS+=(--internal-ip)

ssh_workers() {  # ssh_workers WORKERS COMMAND
  x gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" "${SSH_OPTS[@]}" \
    --worker="$1" --command="$2"
}

default_runtime() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

TARBALL=${TMPDIR:-/tmp}/mimjax-src-$NAME.tgz
REMOTE_TARBALL=/tmp/mimjax-src.tgz
# The code directory on a worker, expanded there.
R="\$HOME/$REMOTE_DIR"

# ----------------------------------------------------------------- steps

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
  note "copy: $REPO_ROOT -> ~/$REMOTE_DIR on every worker"
  x tar -czf "$TARBALL" --exclude=./.venv --exclude=./.git \
    --exclude='./workdir*' --exclude=./build --exclude=./dist \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
    --exclude='*.pyc' -C "$REPO_ROOT" .
  x gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:$REMOTE_TARBALL" \
    "${SCOPE[@]}" "${SSH_OPTS[@]}" --worker=all
  ssh_workers all "mkdir -p $R && tar -xzf $REMOTE_TARBALL -C $R && rm -f $REMOTE_TARBALL"
  truthy "$DRY" || rm -f "$TARBALL"
}

step_install() {
  note "install: code, then a venv (Python $PYTHON_VERSION) with pip install -e '.[tpu]', on every worker"
  if [[ -n $GIT_URL ]]; then
    local update="git -C $R pull --ff-only" checkout=''
    if [[ -n $GIT_REF ]]; then
      update="git -C $R fetch origin"
      checkout=" && git -C $R fetch --tags origin $(quote "$GIT_REF") && git -C $R checkout --detach FETCH_HEAD"
    fi
    note "install: git clone $GIT_URL into ~/$REMOTE_DIR on every worker"
    ssh_workers all "if [ -d $R/.git ]; then $update; else git clone $(quote "$GIT_URL") $R; fi$checkout"
  else
    step_copy
  fi
  # uv brings the Python >= 3.11 that the TPU images lack (Ubuntu 22.04: 3.10).
  ssh_workers all "set -e; cd $R; export PATH=\$HOME/.local/bin:\$PATH; command -v uv >/dev/null || python3 -m pip install --user --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh; [ -x .venv/bin/python ] || uv venv --python $(quote "$PYTHON_VERSION") .venv; uv pip install --python .venv/bin/python -e '.[tpu]' --find-links $LIBTPU_INDEX"
}

step_run() {
  local env main
  env="MIMJAX_DISTRIBUTED=1 TFDS_DATA_DIR=$(quote "$DATA_DIR")"
  [[ -n $INIT_TIMEOUT ]] && env+=" MIMJAX_INIT_TIMEOUT=$INIT_TIMEOUT"
  main=$(quote_all .venv/bin/python -m mimjax.main --config="$CONFIG" \
    --workdir="$WORKDIR" "${FLAG_ARGS[@]}")
  local log=logs/$RUN_NAME.log pid=logs/$RUN_NAME.pid
  note "run: '$RUN_NAME' on every worker, each logging to ~/$REMOTE_DIR/$log"
  ssh_workers all "cd $R && mkdir -p logs && if [ -f $pid ] && kill -0 \$(cat $pid) 2>/dev/null; then echo \"\$(hostname): $RUN_NAME is already running\" >&2; exit 1; fi; $env nohup $main > $log 2>&1 < /dev/null & echo \$! > $pid"
}

step_logs() {
  note "logs: following ~/$REMOTE_DIR/logs/$RUN_NAME.log on worker(s) $LOG_WORKER (Ctrl-C stops following, not the run)"
  ssh_workers "$LOG_WORKER" "tail -n 100 -F $R/logs/$RUN_NAME.log | sed -u \"s/^/[\$(hostname)] /\""
}

step_stop() {
  local pid=$R/logs/$RUN_NAME.pid
  note "stop: '$RUN_NAME' on every worker"
  ssh_workers all "if [ -f $pid ]; then kill \$(cat $pid) 2>/dev/null || true; rm -f $pid; fi"
}

step_delete() {
  note "delete: '$NAME' in $ZONE"
  local cmd=(gcloud compute tpus tpu-vm delete "$NAME" "${SCOPE[@]}")
  truthy "$YES" && cmd+=(--quiet)
  x "${cmd[@]}"
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

for step in "${STEPS[@]}"; do
  "step_$step"
done
