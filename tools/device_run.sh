#!/bin/bash
# One device call: build, smoke, tests, sanitizers, bench. Logs under $OUT.
# usage (from the repo root copy): bash tools/device_run.sh [steps...]   steps: build smoke test sanitize bench
# (also: tune ncu ncusrc check alltests overhead sass fuzz; NCU_SHAPES="K,N,M ..." for ncu and ncusrc)
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
      FERRUM_CUDA_ARCHS=${FERRUM_CUDA_ARCHS:-90} python3 -m pip install --no-build-isolation --no-deps -v . > $OUT/build.log 2>&1 \
        || { grep -E "error|Error" $OUT/build.log | head -40; tail -20 $OUT/build.log; exit 1; }
      grep "ferrum setup" $OUT/build.log | head -3
      (cd /tmp && python3 -c "import ferrum; print(ferrum.backends()['cuda'])")
      so=$(cd /tmp && python3 -c "import ferrum._cuda as c; print(c.__file__)"); echo "$so: $(ldd $so | grep -c cudart) libcudart.so dependencies (static runtime)"; ldd $so | sed 's/^/    /' ;;
    smoke) (cd /tmp && timeout 300 python3 $ROOT/tools/cuda_smoke.py 2>&1 | tee $OUT/smoke.log | tail -8) ;;
    test) (cd /tmp && timeout 240 python3 -m pytest -q -x -p no:cacheprovider $ROOT/tests/test_cuda.py 2>&1 | tee $OUT/test.log | tail -30) ;;
    sanitize)
      (cd /tmp && timeout ${SAN_TIMEOUT:-150} compute-sanitizer --tool memcheck --error-exitcode 9 python3 $ROOT/tools/cuda_smoke.py ${SMOKE_ARGS} > $OUT/memcheck.log 2>&1; echo "memcheck rc=$?"; tail -4 $OUT/memcheck.log)
      (cd /tmp && timeout ${SAN_TIMEOUT:-200} compute-sanitizer --tool racecheck --error-exitcode 9 python3 $ROOT/tools/cuda_smoke.py ${SMOKE_ARGS} > $OUT/racecheck.log 2>&1; echo "racecheck rc=$?"; tail -4 $OUT/racecheck.log) ;;
    tune) (cd /tmp && timeout ${TUNE_TIMEOUT:-200} python3 $ROOT/tools/tune.py ${TUNE_SHAPES} 2>&1 | tee $OUT/tune.log) ;;
    ncu) for shape in ${NCU_SHAPES}; do f=$OUT/ncu_${shape//,/_}.log; (cd /tmp && timeout 150 ncu --kernel-name regex:marlin_mm --launch-skip 3 --launch-count 1 --section SpeedOfLight --section WarpStateStats --section LaunchStats --section Occupancy --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' python3 $ROOT/tools/ncu_target.py $shape > $f 2>&1; echo "ncu $shape rc=$?"; grep -E "Duration|DRAM Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Grid Size|Dynamic Shared" $f | head -12; grep -E "issue_stalled" $f | awk '{print $NF, $1}' | sort -rn | head -8); done ;;
    check) (cd /tmp && timeout 200 python3 -m ferrum check --backend cuda 2>&1 | tee $OUT/check.log | tail -12) ;;
    alltests) (cd /tmp && timeout 300 python3 -m pytest -q -p no:cacheprovider $ROOT/tests 2>&1 | tee $OUT/alltests.log | tail -8) ;;
    overhead) (cd /tmp && timeout 120 python3 $ROOT/tools/overhead.py 2>&1 | tee $OUT/overhead.log) ;;
    fuzz) (cd /tmp && timeout $(( ${FUZZ_SECONDS:-90} + 60 )) python3 $ROOT/tools/gpu_fuzz.py cuda ${FUZZ_SECONDS:-90} 2>&1 | tee $OUT/fuzz.log | grep -E "BAD|EXC|gpu_fuzz") ;;
    sass) so=$(python3 -c "import ferrum._cuda as c; print(c.__file__)" 2>/dev/null || (cd /tmp && python3 -c "import ferrum._cuda as c; print(c.__file__)"))
      cuobjdump -sass $so > $OUT/sass_all.txt 2>&1
      for fn in ILi1ELi8ELi16ELb1E ILi4ELi8ELi16ELb1E; do
        awk -v f="$fn" '/Function :/{p = index($0, f) > 0} p' $OUT/sass_all.txt | grep -oE '^\s+/\*[0-9a-f]+\*/\s+(@!?U?P[0-9T] )?[A-Z0-9_.]+' | awk '{print $NF}' | sed 's/\..*//' | sort | uniq -c | sort -rn | head -25 | tr '\n' ' '; echo " <- $fn"; done ;;
    ncusrc) for shape in ${NCU_SHAPES}; do f=$OUT/ncusrc_${shape//,/_}; IFS=, read -r k n m <<< "$shape"
        (cd /tmp && timeout 200 ncu --set full --import-source yes --kernel-name regex:marlin_mm --launch-skip 3 --launch-count 1 -o $f python3 $ROOT/tools/ncu_target.py $shape > $f.log 2>&1; echo "ncusrc $shape rc=$?"
         timeout 60 ncu -i $f.ncu-rep --page source --csv --print-source sass > ${f}_sass.csv 2>> $f.log; rm -f $f.ncu-rep
         python3 $ROOT/tools/sass_profile.py ${f}_sass.csv --top 20 --per $((k * n / 8)) | tee ${f}_summary.txt | head -45); done ;;
    bench) (cd /tmp && timeout ${BENCH_TIMEOUT:-300} python3 -m ferrum bench --backend cuda ${BENCH_ARGS} 2>&1 | tee $OUT/bench.log) ;;
  esac
done
