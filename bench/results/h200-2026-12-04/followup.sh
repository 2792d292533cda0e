#!/usr/bin/env bash
# The follow-up device call of 2026-12-04, after the nvJPEG fix: from the repository root, with
# OUT set (the device tool's output folder) and timm's wheel in .whl/.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
unset TRITON_INTERPRET
HERE=bench/results/h200-2026-12-04
timeout 55 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_nvjpeg_loader.py \
    tests/test_gpu.py::test_forward_and_backward_allocate_one_gradient \
    >"$OUT/followup-tests.log" 2>&1
tail -3 "$OUT/followup-tests.log"
timeout 40 python3 "$HERE/memory_probe.py" >"$OUT/memory_probe.log" 2>&1
tail -c 2500 "$OUT/memory_probe.log"
timeout 150 python3 bench/trainer_e2e.py --output "$OUT/e2e" --work /tmp/e2e --seconds 110 \
    --only gpu-decode sigterm hcd 2>&1 | tail -25
