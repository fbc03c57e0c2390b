#!/usr/bin/env bash
# What a lent GPU should show in at most 8 minutes, as one summary table: versions (torch, CUDA, Triton, ptxas),
# the compile probe, the SDPA kernel chosen, a one-process NCCL group through every collective the stages use,
# base_train --dry-run at d12 (seq 1024, batch 64) eager and compiled (tok/s, MFU, measured vs predicted peak
# memory), 20 compiled SFT steps at d12, engine cache-vs-no-cache logits in bf16, host syncs per step.
# No network and no download: the data is the synthetic world, built in a temp dir.
#
#   bash runs/gpu_check.sh            # on the GPU machine (after runs/setup.sh)
#   bash runs/gpu_check.sh --cpu      # smoke mode (or GPU_CHECK_DEVICE=cpu): tiny sizes on CPU, gloo for NCCL
#
# Each part has its own timeout; a failing part is marked FAILED in the table and the others still run. Exit 1
# when any part failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
# shellcheck source=runs/common.sh
source runs/common.sh  # PY, find_cuda_toolkit
if [ "${1:-}" = "--cpu" ]; then export GPU_CHECK_DEVICE=cpu; fi
export GPU_CHECK_DEVICE=${GPU_CHECK_DEVICE:-cuda} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$GPU_CHECK_DEVICE" = "cpu" ]; then
    export NANOPIPE_DEVICE=cpu
    model=(--depth 2 --max-seq-len 64 --device-batch-size 2 --total-batch-size 256 --head-dim 32)
    sft=(--num-iterations 3 --device-batch-size 2)
    t_short=300 t_long=600
else
    model=(--depth 12 --max-seq-len 1024 --device-batch-size 64)
    sft=(--num-iterations 20 --device-batch-size 16 --compile)
    t_short=60 t_long=150
fi
part() {  # part NAME SECONDS command...: run it under its timeout; its `| ... |` lines go to the table
    local name=$1 seconds=$2 out last rc=0; shift 2
    echo "== $name (timeout ${seconds}s): $*" >&2
    out=$(timeout "$seconds" "$@" 2>"$work/$name.err") || rc=$?
    if [ "$rc" = "0" ]; then
        while IFS= read -r line; do
            case "$line" in
                '| '*) rows+=("$line") ;;
                'compile probe: '*) rows+=("| $name | ${line#compile probe: } |") ;;
            esac
        done <<< "$out"
    else
        failed=1
        last=$(grep -v '^\s*$' "$work/$name.err" | tail -n 1 | cut -c1-200)
        rows+=("| $name | FAILED (exit $rc$([ "$rc" = 124 ] && echo ", timed out")): $last |")
    fi
}

# shellcheck disable=SC2329  # called through --part
dry_run_row() {  # dry_run_row LABEL [--compile]: base_train --dry-run --json, one row
    local label=$1 json; shift
    json=$("$PY" -m scripts.base_train "${model[@]}" --dry-run --json "$@") || return $?
    printf '%s\n' "$json" | "$PY" runs/gpu_check.py dry_run "$label"
}

# shellcheck disable=SC2329  # called through --part
sft_row() {  # synthetic data, a tokenizer, a one-step base model, then the SFT steps, timed
    local t0
    "$PY" -m scripts.dataset synthetic >&2 && "$PY" -m scripts.tok_train --vocab-size 2048 >&2 \
        && "$PY" -m scripts.base_train "${model[@]}" --num-iterations 1 --eval-every -1 --core-metric-every -1 \
               --sample-every -1 >&2 || return $?
    t0=$(date +%s)
    "$PY" -m scripts.chat_sft "${sft[@]}" --eval-every -1 >&2 || return $?
    echo "| chat_sft ${sft[*]} | ok in $(( $(date +%s) - t0 ))s (incl. start-up and compile) |"
}

if [ "${1:-}" = "--part" ]; then "$2" "${@:3}"; exit; fi  # one part, in its own process (for its timeout)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export NANOPIPE_BASE_DIR="$work/base" NANOPIPE_REPORT_DIR="$work/report" NANOPIPE_DATA=synthetic
find_cuda_toolkit >"$work/toolkit.txt"
rows=("| toolkit | $(cat "$work/toolkit.txt") |")
failed=0
part versions "$t_short" "$PY" runs/gpu_check.py versions
part compile_probe "$t_long" "$PY" runs/compile_probe.py
part sdpa "$t_short" "$PY" runs/gpu_check.py sdpa
part collectives "$t_short" "$PY" runs/gpu_check.py collectives
part dry_run_eager "$t_long" bash runs/gpu_check.sh --part dry_run_row eager
part dry_run_compiled "$t_long" bash runs/gpu_check.sh --part dry_run_row compiled --compile
part sft "$t_long" bash runs/gpu_check.sh --part sft_row
part engine "$t_short" "$PY" runs/gpu_check.py engine
part syncs "$t_short" "$PY" runs/gpu_check.py syncs

echo
echo "| part | result |"
echo "|---|---|"
for line in "${rows[@]}"; do [ -n "$line" ] && echo "$line"; done
exit "$failed"
