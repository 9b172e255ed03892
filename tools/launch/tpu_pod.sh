#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one or many hosts) with the same command on every worker.
#
#   tools/launch/tpu_pod.sh --name mllm --zone us-east5-a --type v5p-32 \
#       --config configs/qwen2.5-7b-lora.yaml \
#       --sync gs://my-bucket/mllm --set model.base=/home/$USER/mllm_data/Qwen2.5-7B-Instruct \
#       --set checkpoint.directory=gs://my-bucket/runs/7b/checkpoints all
#
# Steps (run in the order given; "all" = up push install sync train logs):
#   up       create the slice, or reuse it if it exists
#   push     copy this repository (git HEAD) and the config to every worker
#   install  python venv + `pip install -e .[tpu]` on every worker
#   sync     copy --sync (a gs:// prefix: task shards, the base checkpoint) to $HOME/mllm_data
#   generate `mllm-jax generate --gen-args` on every worker, each its own slice of the task
#            range (--process-index = the worker number, --process-count = the workers),
#            into one shared --out (a bucket mount or shared disk); not part of "all"
#   train    start `mllm-jax train` on every worker (jax.distributed detects the slice)
#   logs     follow process 0's log (Ctrl-C stops following, not training)
#   stop     stop the training processes (the pid each worker recorded)
#   down     delete the slice
#
# Every host runs the same command; process 0 writes config.yaml, metrics and exports into
# the run_dir on its own disk, orbax checkpoints must go to a path every host shares
# (checkpoint.directory=gs://...). See docs/multihost.md.
set -euo pipefail

NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
TYPE="${TPU_TYPE:-v5p-8}"
VERSION="${TPU_VERSION:-}"  # default: the usual runtime image of --type (see below)
CONFIG=""
SYNC=""
GEN_ARGS=""
SPOT=0
DRY_RUN=0
OVERRIDES=()
STEPS=()
# Paths on the workers; \$HOME is expanded by the remote shell.
REMOTE_DIR="\$HOME/mllm_jax"
REMOTE_LOG="\$HOME/mllm_jax_train.log"
REMOTE_PID="\$HOME/mllm_jax_train.pid"
REMOTE_DATA="\$HOME/mllm_data"

usage() {
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
    echo "Options: --name --zone --project --type --version --config FILE --set KEY=VALUE"
    echo "         --sync gs://PREFIX --gen-args 'ARGS' --spot --dry-run (print the gcloud commands only)"
    exit "${1:-0}"
}

while (($#)); do
    case "$1" in
        --name) NAME="$2"; shift 2 ;;
        --zone) ZONE="$2"; shift 2 ;;
        --project) PROJECT="$2"; shift 2 ;;
        --type) TYPE="$2"; shift 2 ;;
        --version) VERSION="$2"; shift 2 ;;
        --config) CONFIG="$2"; shift 2 ;;
        --set) OVERRIDES+=("$2"); shift 2 ;;
        --sync) SYNC="$2"; shift 2 ;;
        --gen-args) GEN_ARGS="$2"; shift 2 ;;
        --spot) SPOT=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage 0 ;;
        up | push | install | sync | generate | train | logs | stop | down) STEPS+=("$1"); shift ;;
        all) STEPS+=(up push install sync train logs); shift ;;
        *) echo "error: unknown argument '$1'" >&2; usage 2 ;;
    esac
done

((${#STEPS[@]})) || { echo "error: no step given" >&2; usage 2; }
if [[ -z "$VERSION" ]]; then
    case "$TYPE" in
        v4-*) VERSION=tpu-ubuntu2204-base ;;
        v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
        v5p-*) VERSION=v2-alpha-tpuv5 ;;
        v6e-*) VERSION=v2-alpha-tpuv6e ;;
        *) echo "error: no default runtime for --type $TYPE; pass --version" >&2; exit 2 ;;
    esac
fi
[[ -n "$NAME" ]] || { echo "error: --name (or TPU_NAME) is required" >&2; exit 2; }
[[ -n "$ZONE" ]] || { echo "error: --zone (or TPU_ZONE) is required" >&2; exit 2; }

GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project="$PROJECT")

run() {
    # Prints the command; runs it unless --dry-run.
    printf '+'; printf ' %q' "$@"; printf '\n'
    ((DRY_RUN)) || "$@"
}

on_all() { run "${GCLOUD[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command="$1"; }

step_up() {
    if ((!DRY_RUN)) && "${GCLOUD[@]}" describe "$NAME" "${COMMON[@]}" >/dev/null 2>&1; then
        echo "reusing TPU VM $NAME in $ZONE"
        return
    fi
    local extra=()
    ((SPOT)) && extra+=(--spot)
    run "${GCLOUD[@]}" create "$NAME" "${COMMON[@]}" --accelerator-type="$TYPE" \
        --version="$VERSION" "${extra[@]}"
}

step_push() {
    local repo archive
    repo="$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
    archive="$(mktemp -d)/mllm_jax.tar.gz"
    run git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
    run "${GCLOUD[@]}" scp "$archive" "$NAME:mllm_jax.tar.gz" "${COMMON[@]}" --worker=all
    rm -rf "$(dirname "$archive")"
    on_all "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf \$HOME/mllm_jax.tar.gz -C $REMOTE_DIR"
    if [[ -n "$CONFIG" ]]; then
        [[ -f "$CONFIG" ]] || { echo "error: config $CONFIG not found" >&2; exit 2; }
        run "${GCLOUD[@]}" scp "$CONFIG" "$NAME:mllm_jax/run.yaml" "${COMMON[@]}" --worker=all
    fi
}

step_install() {
    on_all "cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -U pip \
&& .venv/bin/pip install -q -e '.[tpu]'"
}

step_sync() {
    [[ -n "$SYNC" ]] || { echo "sync: no --sync given, skipped"; return; }
    on_all "mkdir -p $REMOTE_DATA && gcloud storage rsync --recursive $(printf '%q' "$SYNC") $REMOTE_DATA"
}

step_generate() {
    [[ -n "$GEN_ARGS" ]] || { echo "error: generate needs --gen-args '--out DIR --count N ...'" >&2; exit 2; }
    # The worker's number and the slice's workers come from the TPU VM metadata (what
    # jax's own TPU cluster detection reads); `generate` does not join jax.distributed.
    local metadata="http://metadata.google.internal/computeMetadata/v1/instance/attributes"
    local get="curl -sf -H Metadata-Flavor:Google $metadata"
    on_all "cd $REMOTE_DIR && W=\$($get/agent-worker-number) \
&& N=\$($get/worker-network-endpoints | tr ',' '\\n' | grep -c .) \
&& .venv/bin/mllm-jax generate $GEN_ARGS --process-index \$W --process-count \$N --no-progress \
> \$HOME/mllm_jax_generate.log 2>&1"
}

step_train() {
    local command=(.venv/bin/mllm-jax train --config run.yaml)
    local override
    for override in "${OVERRIDES[@]}"; do command+=(--set "$override"); done
    # Detached, so that the ssh returns; every worker records its pid for `stop`.
    on_all "cd $REMOTE_DIR && nohup $(printf '%q ' "${command[@]}")> $REMOTE_LOG 2>&1 \
< /dev/null & echo \$! > $REMOTE_PID"
}

step_logs() {
    run "${GCLOUD[@]}" ssh "$NAME" "${COMMON[@]}" --worker=0 --command="tail -n 200 -F $REMOTE_LOG"
}

step_stop() {
    on_all "[ -f $REMOTE_PID ] && kill \$(cat $REMOTE_PID) 2>/dev/null; rm -f $REMOTE_PID; true"
}

step_down() {
    run "${GCLOUD[@]}" delete "$NAME" "${COMMON[@]}" --quiet
}

for step in "${STEPS[@]}"; do
    "step_$step"
done
