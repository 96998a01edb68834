#!/bin/bash
# One device call for the metal backend through the GPU's Vulkan driver, run from the source tree
# (PYTHONPATH=<site with wgpu>:<this checkout>). Logs under $OUT.
# usage: bash tools/metal_device_run.sh [steps...]   steps: info test sweep probe bench
set -o pipefail
export PYTHONUNBUFFERED=1 FERRUM_NO_CUDA=1
export PYTHONPATH=${SITE:-/tmp/site}:$(pwd)
ROOT=$(pwd)
for step in ${*:-test sweep bench}; do
  echo "=== $step $(date +%T)"
  case $step in
    info) python3 -m ferrum info 2>&1 | tee $OUT/info.log ;;
    test) timeout ${TEST_TIMEOUT:-90} python3 -m pytest -q -x -p no:cacheprovider $ROOT/tests/test_metal.py 2>&1 | tee $OUT/test_metal.log | tail -15 ;;
    sweep) timeout ${SWEEP_TIMEOUT:-150} python3 $ROOT/tools/metal_sweep.py kernels --quick 2>&1 | tee $OUT/sweep.log | tail -3 ;;
    probe) timeout ${PROBE_TIMEOUT:-120} python3 $ROOT/tools/metal_probe.py 2>&1 | tee $OUT/probe.log ;;
    bench) timeout ${BENCH_TIMEOUT:-120} python3 -m ferrum bench --backend metal ${BENCH_ARGS} 2>&1 | tee $OUT/bench.log ;;
  esac
done
