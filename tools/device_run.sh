#!/bin/bash
# One device call: build, smoke, tests, sanitizers, bench. Logs under $OUT.
# usage (from the repo root copy): bash tools/device_run.sh [steps...]   steps: build smoke test sanitize bench
set -o pipefail
export PYTHONUNBUFFERED=1
ROOT=$(pwd)
STEPS=${*:-build smoke test sanitize bench}
export FERRUM_GOLDEN=$ROOT/golden/marlin_golden.npz
nvidia-smi -L
for step in $STEPS; do
  echo "=== $step $(date +%T)"
  case $step in
    build)
      FERRUM_CUDA_ARCHS=${FERRUM_CUDA_ARCHS:-90} pip install --no-build-isolation --no-deps -v . > $OUT/build.log 2>&1 \
        || { grep -E "error|Error" $OUT/build.log | head -40; tail -20 $OUT/build.log; exit 1; }
      grep -E "registers|spill" $OUT/build.log | head -0
      (cd /tmp && python3 -c "import ferrum; print(ferrum.backends()['cuda'])") ;;
    smoke) (cd /tmp && timeout 300 python3 $ROOT/tools/cuda_smoke.py 2>&1 | tee $OUT/smoke.log | tail -8) ;;
    test) (cd /tmp && timeout 500 python3 -m pytest -q -x -p no:cacheprovider $ROOT/tests/test_cuda.py 2>&1 | tee $OUT/test.log | tail -30) ;;
    sanitize)
      (cd /tmp && timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 python3 $ROOT/tools/cuda_smoke.py > $OUT/memcheck.log 2>&1; echo "memcheck rc=$?"; tail -4 $OUT/memcheck.log)
      (cd /tmp && timeout 400 compute-sanitizer --tool racecheck --error-exitcode 9 python3 $ROOT/tools/cuda_smoke.py > $OUT/racecheck.log 2>&1; echo "racecheck rc=$?"; tail -4 $OUT/racecheck.log) ;;
    bench) (cd /tmp && timeout 500 python3 -m ferrum bench --backend cuda ${BENCH_ARGS} 2>&1 | tee $OUT/bench.log) ;;
  esac
done
