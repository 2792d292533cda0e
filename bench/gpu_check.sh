#!/usr/bin/env bash
# One-command GPU check: bench/gpu_check.sh [--dry-run] [--only trainer|kernels|cache] OUTDIR
#
# For a CUDA machine with no internet and no DALI, one 10-minute command per part. Three parts:
# - trainer: a 100-step AMP training throughput run per distiller (train_throughput.py), then the
#   real trainer end to end under torchrun (trainer_e2e.py: GPU and CPU JPEG decoding, synthetic
#   data, SIGTERM and resume, fp16, HCD, --torchcompile);
# - kernels: the GPU-marked tests (CUDA graphs, compiled steps, kernels against the references),
#   the loss benchmarks at the targets' shapes (bench/harness.py's "targets" matrix: 256 x 1000
#   and 1024 x 21843, fp32 and bf16, forward + backward, every provider), the launch-setting
#   sweep (tune_kernels.py) and the fused-loss targets read off them (targets.py);
# - cache: the teacher-output cache on the GPU (issue 25): trainer_e2e.py's gpu-decode run with
#   the live teacher and its twin fed by a cache built (torchrun, AMP, nvJPEG) and verified first,
#   then bench_teacher_cache.py (a CE, cached-KD and live-KD step and the teacher's forward, bf16,
#   channels-last, batch 256).
# All run by default, in that order; --only runs one. Everything lands in OUTDIR
# (gpu_check.log, throughput.json/.md, trainer_e2e.json/.md and trainer_logs/, gpu-tests.xml,
# bench-*.json, tune_kernels.json, targets.md, report.md), ready to commit under bench/results/.
#
# The sections run in order, each within its own time cap and the whole within
# GPU_CHECK_SECONDS (default 540). A benchmark section that reaches its cap skips its remaining
# cases (FASTKD_BENCH_DEADLINE) and still saves what it measured; the log records each section's
# exit status and time. The full benchmark matrix (--bench-matrix full) does not fit; its last
# full run is in results/h200-2026-11-26.
#
# Exit status: 0 when every section ran and exited 0, 1 when any failed or hit its cap, 2 for
# bad options or (without --dry-run) no CUDA GPU.
#
# --dry-run (no GPU): the trainer section's setup (a small JPEG tree, the teacher checkpoint,
# every run's command line checked by the trainer's parser) and the GPU tests' and benchmarks'
# collection (pytest: the [dev] extra).
set -u
DRY_RUN=0
FAILED=0
PARTS="trainer kernels cache"
USAGE="usage: bench/gpu_check.sh [--dry-run] [--only trainer|kernels|cache] OUTDIR"
OUTDIR=
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY_RUN=1; shift ;;
        --only)
            case ${2:-} in
                trainer|kernels|cache) PARTS=$2; shift 2 ;;
                *) echo "--only takes trainer, kernels or cache, got '${2:-}'; $USAGE" >&2
                   exit 2 ;;
            esac ;;
        -*) echo "unknown option '$1'; $USAGE" >&2; exit 2 ;;
        *)
            if [ -n "$OUTDIR" ]; then
                echo "one OUTDIR expected, got '$OUTDIR' and '$1'; $USAGE" >&2
                exit 2
            fi
            OUTDIR=$1; shift ;;
    esac
done
if [ -z "$OUTDIR" ]; then
    echo "$USAGE" >&2
    exit 2
fi
PYTHON=${PYTHON:-python3}
# Everything but the dry run measures a GPU; the dry run collects tests (pytest: the [dev] extra).
if [ "$DRY_RUN" = 0 ] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
        2>/dev/null; then
    echo "no CUDA GPU here ($PYTHON: torch.cuda.is_available() is not True); bench/gpu_check.sh" \
        "--dry-run OUTDIR checks the setup without one" >&2
    exit 2
fi
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
LOG="$OUTDIR/gpu_check.log"
END=$((SECONDS + ${GPU_CHECK_SECONDS:-540}))
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
unset TRITON_INTERPRET
# Short rounds, many of them: the timer waits for the GPU, so each round holds many calls.
BENCH_OPTIONS=(--benchmark-min-time=0.002 --benchmark-max-time=0.05 --benchmark-min-rounds=5
               -p no:cacheprovider -q)

section() {  # section NAME CAP_SECONDS COMMAND...: run within min(cap, time left), log output
    local name=$1 cap=$2 start=$SECONDS
    shift 2
    local limit=$((END - SECONDS < cap ? END - SECONDS : cap))
    if [ "$limit" -le 5 ]; then
        echo "=== $name: not run, out of time" | tee -a "$LOG"
        return
    fi
    echo "=== $name" >>"$LOG"
    # Benchmarks stop starting new cases 20 s before the cap, to leave time to save.
    FASTKD_BENCH_DEADLINE=$(($(date +%s) + limit - 20)) timeout "$limit" "$@" >>"$LOG" 2>&1
    local status=$?
    [ "$status" = 0 ] || FAILED=1
    echo "=== $name: exit $status after $((SECONDS - start)) s" | tee -a "$LOG"
}

environment() {
    [ "$DRY_RUN" = 1 ] || nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
        --format=csv
    # fastkd without its dependencies (the machine has torch, triton and timm, and no internet).
    # Found, not imported: the report below imports it (with torch) once.
    if ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(not u.find_spec('fastkd.kernels'))" \
            2>/dev/null &&
        ! "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e .; then
        # No installer at hand: import from the checkout, with kernels/ where it installs.
        ln -sfn ../kernels fastkd/kernels
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    "$PYTHON" - <<'PY'
import os, platform, timm, torch, torchvision, triton
import fastkd, fastkd.kernels
gpu = (f"{torch.cuda.get_device_name()} "
       f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs"
       if torch.cuda.is_available() else "no GPU")
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA",
      torch.version.cuda, "| triton", triton.__version__, "| torchvision",
      torchvision.__version__, "| timm", timm.__version__, "|", gpu, "|", os.cpu_count(), "CPUs")
print("fastkd from", fastkd.__file__)
PY
}

bench() {  # bench NAME CAP_SECONDS FILE [PYTEST ARGS]: one benchmark file's matrix, as JSON
    local name=$1 cap=$2 file=$3
    shift 3
    section "bench-$name" "$cap" "$PYTHON" -m pytest "bench/$file" "${BENCH_OPTIONS[@]}" "$@" \
        --benchmark-json="$OUTDIR/bench-$name.json"
}

: >"$LOG"
echo "=== environment" >>"$LOG"
environment >>"$LOG" 2>&1
if [ "$DRY_RUN" = 1 ]; then
    section trainer-e2e 120 "$PYTHON" bench/trainer_e2e.py --dry-run --output "$OUTDIR"
    # The GPU tests' and the benchmarks' collection, in one pytest (each costs its imports).
    section collect 60 "$PYTHON" -m pytest tests/ bench/ --bench-matrix targets -n 0 \
        -p no:cacheprovider -q --collect-only
    grep "^=== .*\(exit\|not run\)" "$LOG"
    exit $FAILED
fi
runs() { [[ " $PARTS " == *" $1 "* ]]; }  # runs PART: whether this check includes PART
if runs trainer; then
    # The throughput script first: the trainer section compares its synthetic runs with it.
    section throughput 100 "$PYTHON" bench/train_throughput.py --output "$OUTDIR"
    section trainer-e2e 240 "$PYTHON" bench/trainer_e2e.py --output "$OUTDIR" --seconds 200 \
        --work /tmp/fastkd-e2e
fi
if runs kernels; then
    section gpu-tests 150 "$PYTHON" -m pytest -m gpu tests/ -n 0 -p no:cacheprovider -q \
        --junitxml="$OUTDIR/gpu-tests.xml"
    bench ldrld 50 bench_ldrld.py --bench-matrix targets
    bench hcd 40 bench_hcd.py --bench-matrix targets
    bench kd 60 bench_kd.py --bench-matrix targets
    section tune-kernels 80 "$PYTHON" bench/tune_kernels.py --output "$OUTDIR"
    "$PYTHON" bench/targets.py "$OUTDIR" >>"$LOG" 2>&1
fi
if runs cache; then
    # A work folder of its own: a warm machine's trainer part left its runs in /tmp/fastkd-e2e.
    section cache-e2e 300 "$PYTHON" bench/trainer_e2e.py --output "$OUTDIR" --seconds 240 \
        --work /tmp/fastkd-e2e-cache --only gpu-decode cached
    bench teacher-cache 150 bench_teacher_cache.py
fi
: >"$OUTDIR/report.md"
if compgen -G "$OUTDIR/bench-*.json" >/dev/null; then
    "$PYTHON" bench/report.py "$OUTDIR"/bench-*.json --output "$OUTDIR/report.md" >>"$LOG" 2>&1
fi
for part in throughput trainer_e2e targets; do
    [ -f "$OUTDIR/$part.md" ] && cat "$OUTDIR/$part.md" >>"$OUTDIR/report.md"
done
grep "^=== .*\(exit\|not run\)" "$LOG"
exit $FAILED  # 1 if any section failed
