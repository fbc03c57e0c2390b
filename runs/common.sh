# shellcheck shell=bash
# Sourced by the speedrun scripts: the python to use, and `step`, which runs a stage once; below, the parts
# the two GPU speedruns share.
#
#   step NAME command...   runs the command unless NAME finished in this run already (a marker file in
#                          $RUN_DIR); a failed or killed step has no marker, so rerunning the script
#                          retries it (training steps pass --resume and continue from their checkpoint).
#   DRY_RUN=1              start_run and step read the markers but write nothing: step prints the command
#                          it would run and runs nothing.

if [ -n "${VIRTUAL_ENV:-}" ]; then PY=python; else PY="$PWD/.venv/bin/python"; fi
export PYTHONUNBUFFERED=1

start_run() {  # start_run NAME TAG: set RUN_DIR; a first run resets the report; FRESH=1 starts over
    RUN_DIR="$NANOPIPE_BASE_DIR/runs/$1"
    RUN_START=$(date +%s)
    if [ "${DRY_RUN:-0}" = "1" ]; then return 0; fi
    if [ "${FRESH:-0}" = "1" ]; then
        # the markers, and the model tag's checkpoints and logs (data and tokenizer are kept: rebuilding
        # them gives the same bytes); otherwise --resume would continue the old run
        rm -rf "$RUN_DIR" "$NANOPIPE_BASE_DIR/checkpoints/base/$2" "$NANOPIPE_BASE_DIR/checkpoints/sft/$2" \
               "$NANOPIPE_BASE_DIR/logs/$2.jsonl" "$NANOPIPE_BASE_DIR/logs/sft-$2.jsonl"
    fi
    if [ ! -d "$RUN_DIR" ]; then
        mkdir -p "$RUN_DIR"
        "$PY" -m nanopipe.report reset
    fi
}

step() {
    local name="$1"; shift
    if [ -f "$RUN_DIR/$name.done" ]; then
        echo "== $name: done already (delete $RUN_DIR/$name.done to redo it)"
        return 0
    fi
    echo "== $name: $*"
    if [ "${DRY_RUN:-0}" = "1" ]; then return 0; fi
    "$@"
    touch "$RUN_DIR/$name.done"
}

elapsed() { local s=$(( $(date +%s) - RUN_START )); printf '%dh%02dm%02ds' $((s/3600)) $((s%3600/60)) $((s%60)); }

# ---------------------------------------------------------------------------------------------------------
# The GPU speedruns' shared parts (speedrun_dgx_spark.sh, speedrun_gpu.sh): settings, checks, set-up, the data
# steps and the closing report. Settings are globals, as in the scripts: DEPTH, SEQ_LEN, DEVICE_BATCH_SIZE,
# NUM_SHARDS, MODEL_TAG, DOLLARS_PER_HOUR, DRY_RUN, NANOPIPE_BASE_DIR.

die() { echo "error: $*" >&2; exit 2; }
warn() { echo "warning: $*" >&2; }
is_count() { case "$1" in '' | *[!0-9]* | 0*) return 1 ;; esac; }

settings_from_depth() {  # settings_from_depth DEPTH SEQ_LEN DEVICE_BATCH_SIZE: the defaults of those three;
    # checks them and derives NUM_SHARDS (unless set), MODEL_TAG and the base dir
    local var tokens
    DEPTH=${DEPTH:-$1} SEQ_LEN=${SEQ_LEN:-$2} DEVICE_BATCH_SIZE=${DEVICE_BATCH_SIZE:-$3}
    for var in DEPTH SEQ_LEN DEVICE_BATCH_SIZE; do
        is_count "${!var}" || die "$var=${!var}: must be a positive whole number"
    done
    # data needed: tokens = 12 x scaling params = 12 x (12 L w^2 + w x 32768) with width w = 64 L; at ~5 chars
    # per token and ~250M chars per shard, rounded up, plus the val shard (d12: 28 shards, d20: 106)
    tokens=$(( 12 * (12 * DEPTH * (64 * DEPTH) ** 2 + 64 * DEPTH * 32768) ))
    NUM_SHARDS=${NUM_SHARDS:-$(( tokens * 5 / 250000000 + 2 ))}
    if ! is_count "$NUM_SHARDS" || [ "$NUM_SHARDS" -lt 2 ]; then
        die "NUM_SHARDS=$NUM_SHARDS: need a whole number of at least 2 (train shards + the val shard)"
    fi
    MODEL_TAG="d$DEPTH"
    export NANOPIPE_BASE_DIR="${NANOPIPE_BASE_DIR:-$HOME/.cache/nanopipe}"
    export OMP_NUM_THREADS=1
}

list_gpus() {  # set gpus to nvidia-smi's GPU names, one a line; stop with directions when there is none
    command -v nvidia-smi >/dev/null \
        || die "no nvidia-smi on PATH: this script trains on an NVIDIA GPU and none is visible; install the NVIDIA driver, or run \`bash runs/speedrun_cpu.sh\` for the CPU demo (NANOPIPE_SKIP_GPU_CHECK=1 skips this check)"
    if ! gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>&1) || [ -z "$gpus" ]; then
        local first_line=${gpus%%$'\n'*}
        die "nvidia-smi sees no GPU (${first_line:-it lists none}): check the driver with \`nvidia-smi\`, or run \`bash runs/speedrun_cpu.sh\` for the CPU demo (NANOPIPE_SKIP_GPU_CHECK=1 skips this check)"
    fi
}

check_disk() {  # check_disk GB: room for the missing FineWeb-Edu shards (~100 MB each) plus GB for the rest
    local f shards_present=0 need_gb disk_dir free_gb
    for f in "$NANOPIPE_BASE_DIR/data/fineweb-edu"/shard_*.parquet; do
        if [ -e "$f" ]; then shards_present=$((shards_present + 1)); fi
    done
    need_gb=$(( ( (NUM_SHARDS > shards_present ? NUM_SHARDS - shards_present : 0) * 100 + 999) / 1000 + $1 ))
    disk_dir="$NANOPIPE_BASE_DIR"
    while [ ! -d "$disk_dir" ]; do disk_dir=$(dirname "$disk_dir"); done
    free_gb=$(( $(df -Pk "$disk_dir" | awk 'NR == 2 {print $4}') / 1024 / 1024 ))
    [ "$free_gb" -ge "$need_gb" ] \
        || die "not enough disk: $NUM_SHARDS FineWeb-Edu shards ($shards_present present) and checkpoints need ~$need_gb GB in $NANOPIPE_BASE_DIR, $disk_dir has $free_gb GB free; free some space, point NANOPIPE_BASE_DIR at a bigger disk, or lower NUM_SHARDS"
}

setup_python() {  # setup_python WHEEL_INDEX: runs/setup.sh, then check that $PY's torch sees the GPU
    if [ "${SKIP_SETUP:-0}" = "1" ]; then
        echo "== setup: skipped (SKIP_SETUP=1)"
    elif [ "${DRY_RUN:-0}" = "1" ]; then
        echo "== setup: ${NANOPIPE_TORCH_INDEX:+NANOPIPE_TORCH_INDEX=$NANOPIPE_TORCH_INDEX }bash runs/setup.sh"
    else
        bash runs/setup.sh
    fi
    if [ "${DRY_RUN:-0}" = "1" ]; then return 0; fi
    command -v "$PY" >/dev/null || die "no python at $PY: run \`bash runs/setup.sh\` (or activate your virtualenv) first"
    if [ "${NANOPIPE_SKIP_GPU_CHECK:-0}" != "1" ]; then
        "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
            || die "the torch in $PY cannot use the GPU ($("$PY" -c 'import torch; print("torch", torch.__version__, "built for CUDA", torch.version.cuda)')): reinstall it with \`$PY -m pip install --force-reinstall torch --index-url $1\`"
    fi
}

lock_base_dir() {  # one run per base dir at a time (nothing to lock in a dry run)
    if [ "${DRY_RUN:-0}" = "1" ]; then return 0; fi
    mkdir -p "$NANOPIPE_BASE_DIR/runs"
    # the lock is inherited by the background download, so a rerun cannot start a second download of the
    # same shards while an orphaned one is still going
    exec 9>"$NANOPIPE_BASE_DIR/runs/.lock"
    flock -n 9 || die "another speedrun (or its background download) is using $NANOPIPE_BASE_DIR: wait for it or stop it"
}

data_and_tokenizer_steps() {  # FineWeb-Edu, the tokenizer, the CORE bundle, the chat data: data_head ... chat_data
    # the first shards now (the tokenizer trains on them), the rest in the background meanwhile
    data_pid=
    trap stop_download EXIT
    trap 'exit 130' INT TERM
    step data_head "$PY" -m scripts.dataset download fineweb-edu --num-shards $((NUM_SHARDS < 8 ? NUM_SHARDS : 8))
    if [ "$NUM_SHARDS" -gt 8 ] && [ ! -f "$RUN_DIR/data.done" ]; then
        step data "$PY" -m scripts.dataset download fineweb-edu --num-shards "$NUM_SHARDS" &
        data_pid=$!
    fi
    step tok_train "$PY" -m scripts.tok_train
    step tok_eval "$PY" -m scripts.tok_eval
    # the small downloads too, so that a network problem shows in the first hour rather than after pretraining
    step eval_bundle "$PY" -m scripts.dataset eval-bundle
    step chat_data "$PY" -m scripts.dataset chat-data
    if [ -n "$data_pid" ]; then
        echo "== waiting for the FineWeb-Edu download ($NUM_SHARDS shards)"
        wait "$data_pid" || die "the FineWeb-Edu download failed (messages above): rerun this script to resume it"
        data_pid=
    fi
}

stop_download() { if [ -n "${data_pid:-}" ]; then pkill -P "$data_pid" 2>/dev/null || true; kill "$data_pid" 2>/dev/null || true; fi; }

finish_run() {  # the report (rebuilt on every run, so it always shows the sections present), then where things are
    local report_cmd=("$PY" -m nanopipe.report generate --dollars-per-hour "$DOLLARS_PER_HOUR") outcome
    echo "== report: ${report_cmd[*]}"
    if [ "${DRY_RUN:-0}" = "1" ]; then
        outcome="dry run over: nothing was run or written"
    else
        "${report_cmd[@]}"
        outcome="finished in $(elapsed) (this invocation)"
    fi
    cat <<END

== $outcome
   report:  ${NANOPIPE_REPORT_DIR:-$PWD/report}/report.md
   model:   $NANOPIPE_BASE_DIR/checkpoints/sft/$MODEL_TAG (base model: $NANOPIPE_BASE_DIR/checkpoints/base/$MODEL_TAG)
   chat:    $PY -m scripts.chat_cli --model-tag $MODEL_TAG      (or -p "Why is the sky blue?" for one answer)
END
}
