#!/usr/bin/env bash
# All GPU work of the project in one command (about 8 minutes on one H100); see benchmarks/README.md.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--wheels DIR] [--budget SECONDS] [--tests-limit SECONDS]
#                                [--step-limit SECONDS] [--skip-tests] [--skip-step] [--skip-bench]
#                                [--dry-run]
#
# 1. installs the wheels in --wheels (Liger-Kernel, cut-cross-entropy; benchmarks/fetch_wheels.sh) into a
#    private target directory, if there are any;
# 2. CUDA parity: pytest -m "gpu or triton" over every test file with a gpu-marked test and every file
#    marked triton (the Triton kernels' own tests, compiled here), at most --tests-limit seconds;
# 3. a real training step at the 7B width against the memory estimator (benchmarks/gpu_7b_step.py), at
#    most --step-limit seconds;
# 4. the loss benchmark (benchmarks/gpu_bench.py) in the time left of --budget;
# 5. writes RESULTS-cuda.md, results-cuda.json, gpu-tests.log, gpu-7b-step.log, gpu-bench.log,
#    gpu-clocks.csv (clock and power during the benchmark) and nvidia-smi.txt into --out, and
#    RESULTS-cuda.md into benchmarks/ as well.
# Without a CUDA device it prints one line and exits 0. Exit status: non-zero if a test failed, the 7B-width
# step's peak differed from the estimate by more than 10 % (or it failed), or the benchmark could not run.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
OUT="$ROOT/benchmarks"
WHEELS="$ROOT/benchmarks/wheels"
BUDGET=480
TESTS_LIMIT=150
STEP_LIMIT=120
RUN_TESTS=1
RUN_STEP=1
RUN_BENCH=1
DRY_RUN=0

usage() {
    sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

need_value() {
    if [[ $# -lt 2 || "$2" == --* ]]; then
        echo "gpu_check: $1 needs a value" >&2
        exit 2
    fi
}

need_seconds() {
    if ! [[ "$2" =~ ^[0-9]+$ ]] || [[ "$2" -lt 1 ]]; then
        echo "gpu_check: $1 must be a positive number of seconds, got '$2'" >&2
        exit 2
    fi
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) need_value "$@"; OUT="$2"; shift 2 ;;
        --wheels) need_value "$@"; WHEELS="$2"; shift 2 ;;
        --budget) need_value "$@"; need_seconds "$1" "$2"; BUDGET="$2"; shift 2 ;;
        --tests-limit) need_value "$@"; need_seconds "$1" "$2"; TESTS_LIMIT="$2"; shift 2 ;;
        --step-limit) need_value "$@"; need_seconds "$1" "$2"; STEP_LIMIT="$2"; shift 2 ;;
        --skip-tests) RUN_TESTS=0; shift ;;
        --skip-step) RUN_STEP=0; shift ;;
        --skip-bench) RUN_BENCH=0; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
BEFORE_BENCH=$((RUN_TESTS * TESTS_LIMIT + RUN_STEP * STEP_LIMIT))
if [[ "$BEFORE_BENCH" -ge "$BUDGET" && "$RUN_BENCH" == 1 ]]; then
    echo "gpu_check: --tests-limit + --step-limit ($BEFORE_BENCH s) leaves nothing of --budget" \
        "($BUDGET s) for the benchmark" >&2
    exit 2
fi

cd "$ROOT"
GPU_TEST_FILES=$(grep -rlE --include='test_*.py' '^@pytest\.mark\.gpu|pytestmark = pytest\.mark\.(gpu|triton)' tests | sort | tr '\n' ' ')
SITE="${TMPDIR:-/tmp}/wmtp-gpu-check-site"
shopt -s nullglob
WHEEL_FILES=("$WHEELS"/*.whl)
shopt -u nullglob

if [[ "$DRY_RUN" == 1 ]]; then
    echo "gpu_check plan (dry run): out=$OUT budget=${BUDGET}s tests-limit=${TESTS_LIMIT}s"
    echo "wheels (${#WHEEL_FILES[@]}): ${WHEEL_FILES[*]:-none in $WHEELS}"
    [[ "$RUN_TESTS" == 1 ]] && echo "tests: $PYTHON -m pytest -m 'gpu or triton' $GPU_TEST_FILES"
    [[ "$RUN_STEP" == 1 ]] && echo "7B-width step: $PYTHON benchmarks/gpu_7b_step.py (at most ${STEP_LIMIT}s)"
    [[ "$RUN_BENCH" == 1 ]] && echo "bench: $PYTHON benchmarks/gpu_bench.py --out $OUT --budget-s <what is left>"
    exit 0
fi

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: skipped: no CUDA device here (torch.cuda.is_available() is False)"
    exit 0
fi

START=$SECONDS
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || { echo "gpu_check: cannot create --out $OUT" >&2; exit 2; }
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
export PYTHONPATH="$ROOT"
if [[ ${#WHEEL_FILES[@]} -gt 0 ]]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${WHEEL_FILES[@]}" || { echo "gpu_check: installing the wheels failed" >&2; exit 1; }
    export PYTHONPATH="$ROOT:$SITE"
else
    echo "gpu_check: no wheels in $WHEELS: the peers that need them will be listed as skipped"
fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true

STATUS=0
NOTE="pytest -m gpu: not run"
if [[ "$RUN_TESTS" == 1 ]]; then
    # shellcheck disable=SC2086  # the file list is split on purpose
    timeout "$TESTS_LIMIT" "$PYTHON" -m pytest -q -p no:cacheprovider -m "gpu or triton" $GPU_TEST_FILES \
        2>&1 | tee "$OUT/gpu-tests.log"
    TESTS_RC=$?
    SUMMARY=$(grep -E '(passed|failed|error)' "$OUT/gpu-tests.log" | tail -n 1 | tr -d '=' | sed 's/^ *//')
    [[ "$TESTS_RC" == 124 ]] && SUMMARY="stopped after ${TESTS_LIMIT} s; last line: ${SUMMARY:-none}"
    NOTE="CUDA tests (pytest -m 'gpu or triton'): ${SUMMARY:-no summary line} (exit $TESTS_RC)."
    [[ "$TESTS_RC" != 0 ]] && STATUS=1
fi

if [[ "$RUN_STEP" == 1 ]]; then
    timeout "$STEP_LIMIT" "$PYTHON" benchmarks/gpu_7b_step.py 2>&1 | tee "$OUT/gpu-7b-step.log"
    STEP_RC=$?
    NOTE="$NOTE 7B-width step against the estimate: $(tail -n 1 "$OUT/gpu-7b-step.log") (exit $STEP_RC)."
    [[ "$STEP_RC" != 0 ]] && STATUS=1
fi

if [[ "$RUN_BENCH" == 1 ]]; then
    LEFT=$((BUDGET - (SECONDS - START) - 20))
    if [[ "$LEFT" -lt 30 ]]; then
        echo "gpu_check: only ${LEFT}s of the budget left, benchmark not run" | tee "$OUT/gpu-bench.log"
        STATUS=1
    else
        # The SM clock, power and temperature every 200 ms during the benchmark: its rounds alternate with
        # the floor's large GEMMs, after which the clock may be lower (KERNEL_NOTES.md, "Host time on CUDA").
        nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu \
            --format=csv -lms 200 >"$OUT/gpu-clocks.csv" 2>/dev/null &
        SAMPLER=$!
        "$PYTHON" benchmarks/gpu_bench.py --out "$OUT" --budget-s "$LEFT" --note "$NOTE" 2>&1 \
            | tee "$OUT/gpu-bench.log" || STATUS=1
        kill "$SAMPLER" 2>/dev/null
        if [[ -f "$OUT/RESULTS-cuda.md" && "$OUT" != "$ROOT/benchmarks" ]]; then
            cp "$OUT/RESULTS-cuda.md" "$ROOT/benchmarks/RESULTS-cuda.md"
        fi
    fi
fi
echo "gpu_check: $NOTE total $((SECONDS - START)) s, exit $STATUS"
exit "$STATUS"
