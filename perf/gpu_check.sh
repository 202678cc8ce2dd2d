#!/usr/bin/env bash
# One-shot GPU check, in this order: the kernels at the target shape (perf/gpu_kernels.py: v1 and
# v2, untuned then tuned, against cuBLAS and dense, per-example, the layer, host time, a bf16
# check; its first 4 minutes), the test suite compiled (no interpreter), a reduced sweep, charts.
#
#   perf/gpu_check.sh OUTDIR
#
# Needs a CUDA GPU and only the packages of the machine's image (torch, triton, pytest,
# hypothesis, numpy, matplotlib): nothing is installed; the checkout goes on PYTHONPATH.
# Leaves in OUTDIR: gpu_check.log, gpu-kernels.csv, pytest.xml, sweep-DEVICE.csv, charts/*.png,
# and all of them in one OUTDIR/gpu-check.tar.gz (rewritten after each phase, so a run cut short
# still leaves one). Each phase runs under its own timeout, shortened to what is left of
# GPU_CHECK_BUDGET seconds (default 480: the whole check ends inside a 10-minute device command);
# a phase with under 20 s left is skipped. Bring back OUTDIR/gpu-check.tar.gz and gpu_check.log.
# Without a GPU it stops at once with exit status 2. GPU_CHECK_REHEARSE=1 runs the same plumbing on
# the CPU (a small test subset under the interpreter, a tiny sweep) to rehearse the script.
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 64
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1" || { echo "gpu_check: cannot create $1" >&2; exit 2; }
OUTDIR=$(cd "$1" && pwd)
PY=${PYTHON:-python3}
[[ "$PY" == */* ]] && PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # the check runs from OUTDIR
REHEARSE=${GPU_CHECK_REHEARSE:-0}
BUDGET=${GPU_CHECK_BUDGET:-480}
LOG="$OUTDIR/gpu_check.log"
started=$(date +%s)
say() { echo "gpu_check [$(( $(date +%s) - started ))s]: $*"; }
# Seconds a phase may run: its own cap, or what is left of the budget (15 s kept for the end).
limit() {
    local left=$(( BUDGET - ($(date +%s) - started) - 15 ))
    (( left < $1 )) && echo "$left" || echo "$1"
}
bundle() {
    local tmp
    tmp=$(mktemp) && tar -czf "$tmp" -C "$OUTDIR" --exclude=gpu-check.tar.gz . \
        && mv "$tmp" "$OUTDIR/gpu-check.tar.gz"
}

run_check() {
say "repository $ROOT, python $PY, output $OUTDIR"
unset TRITON_INTERPRET TRITON_MEBP_BACKEND
if [[ "$REHEARSE" != 1 ]]; then
    if ! timeout 45 "$PY" -c '
import sys, torch
if not torch.cuda.is_available():
    sys.exit("PyTorch " + torch.__version__ + " sees no CUDA GPU")
print("gpu_check: GPU", torch.cuda.get_device_name(0), "torch", torch.__version__)
'; then
        say "FAILED: this check needs PyTorch with a CUDA GPU (see the line above); nothing was run"
        return 2
    fi
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
else
    say "REHEARSAL on the CPU: test subset under the interpreter, tiny sweep"
    export TRITON_INTERPRET=1
fi

# The package straight from the checkout, without installing: triton_mebp finds kernels/ beside it.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$OUTDIR"
if ! "$PY" -c '
import sys, triton, triton_mebp, triton_mebp.kernels.selection as s
print("gpu_check: triton", triton.__version__, "| triton_mebp from", triton_mebp.__file__,
      "| kernels from", s.__file__)
assert s.__file__.startswith(sys.argv[1]), "the kernels do not come from the checkout"
' "$ROOT"; then
    say "FAILED: the package does not import from the checkout"
    return 3
fi

status=0
t=$(limit 240)
say "kernels at the target shape (perf/gpu_kernels.py, at most $t s)"
rehearse_flag=()
[[ "$REHEARSE" == 1 ]] && rehearse_flag=(--rehearse)
timeout "$t" "$PY" "$ROOT/perf/gpu_kernels.py" "${rehearse_flag[@]}" --out "$OUTDIR/gpu-kernels.csv"
rc=$?
[[ $rc -eq 124 ]] && say "gpu_kernels.py ran past its $t s limit (its CSV keeps the rows done)"
[[ $rc -ne 0 ]] && { say "gpu_kernels.py FAILED (exit $rc)"; status=1; }
bundle

if [[ "$REHEARSE" == 1 ]]; then
    tests=("$ROOT/tests/test_sweep.py" "$ROOT/tests/test_estimate.py")
else
    tests=("$ROOT/tests")
fi
# Compiling each kernel specialization dominates the suite on a GPU: spread it over processes.
parallel=()
if [[ "$REHEARSE" != 1 ]] && "$PY" -c "import xdist" 2>/dev/null; then
    parallel=(-n 8)
fi
# A test that hangs on the GPU stops after 120 s instead of taking the suite with it.
"$PY" -c "import pytest_timeout" 2>/dev/null && parallel+=(--timeout=120)
t=$(limit 230)
if (( t < 20 )); then
    say "pytest skipped: the budget is spent"; status=1
else
    say "pytest ${tests[*]} ${parallel[*]} (compiled kernels, TRITON_MEBP_AUTOTUNE=0, at most $t s)"
    # SIGINT at the limit: pytest stops like on Ctrl-C and still writes its report.
    TRITON_MEBP_AUTOTUNE=0 timeout -s INT -k 20 "$t" "$PY" -m pytest "${tests[@]}" "${parallel[@]}" \
        -q -p no:cacheprovider --rootdir="$ROOT" --junitxml="$OUTDIR/pytest.xml" -o addopts="-ra"
    rc=$?
    [[ $rc -eq 124 || $rc -eq 2 ]] && say "pytest stopped at its $t s limit or was interrupted"
    [[ $rc -ne 0 ]] && { say "pytest FAILED (exit $rc)"; status=1; }
fi
bundle

if [[ "$REHEARSE" != 1 ]]; then
    say "inference benchmark (fused MLP against PyTorch on the compacted weights)"
    t=$(limit 40)
    if (( t < 20 )); then
        say "inference benchmark skipped: the budget is spent"; status=1
    else
        timeout "$t" "$PY" "$ROOT/perf/bench_inference.py" --device cuda \
            --out "$OUTDIR/inference.csv" || { say "inference benchmark FAILED"; status=1; }
    fi
fi

t=$(limit 120)
if (( t < 60 )); then
    say "sweep skipped: the budget is spent"; status=1
else
    say "reduced sweep (autotuning on, time budget $(( t - 40 )) s)"
    # The PyTorch path is what CPU tensors use; on the GPU the check times cuBLAS against the kernels.
    device=cuda providers=dense,mebp-triton
    [[ "$REHEARSE" == 1 ]] && device=cpu providers=dense,mebp-torch
    slug=$("$PY" -c 'import sys, torch; from triton_mebp.bench.sweep import device_slug
print(device_slug(torch.device(sys.argv[1])))' "$device") || slug=$device
    timeout "$t" "$PY" -m triton_mebp.bench.sweep --preset check --device "$device" \
        --time-budget $(( t - 40 )) --providers "$providers" \
        --out "$OUTDIR/sweep-$slug.csv" --no-progress
    rc=$?
    [[ $rc -ne 0 ]] && { say "sweep FAILED (exit $rc)"; status=1; }
fi
bundle

t=$(limit 40)
if ! ls "$OUTDIR"/sweep-*.csv >/dev/null 2>&1; then
    say "no sweep CSV to plot"; status=1
elif (( t < 20 )); then
    say "charts skipped: the budget is spent"; status=1
else
    say "charts"
    timeout "$t" "$PY" -m triton_mebp.bench.plot "$OUTDIR"/sweep-*.csv --out "$OUTDIR/charts" || status=1
fi

say "done, status $status; files in $OUTDIR:"
ls -la "$OUTDIR" "$OUTDIR/charts" 2>/dev/null
return $status
}

# Everything the check prints also goes to the log; the pipe ends when the check does.
run_check 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
# One file to bring back from the GPU machine.
bundle && echo "gpu_check: everything in $OUTDIR/gpu-check.tar.gz"
exit "$status"
