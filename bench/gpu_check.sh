#!/usr/bin/env bash
# One call on a lent GPU machine (see ../shared/TOOLCHAIN.md): build the extension against the machine's torch,
# run the GPU test tier, compute-sanitizer, and the benchmark. Everything lands under $OUT.
#   STAGES="build test sanitize bench tune profile" SUITES="attention lstm" FAMILIES="attention lstm_layer" bash bench/gpu_check.sh
# (defaults: every suite, every sanitizer family)
# SUITES default: every suite registered in bench/__init__.py (full presets: several minutes; BENCH_ARGS=--quick)
# The default STAGES take far longer than one 600-s device call: split them over calls, e.g. first
#   STAGES="build test" TEST_TIMEOUT=420, then STAGES="sanitize", then STAGES="bench" BENCH_ARGS=--quick
# (a warm machine keeps the built extension between calls; a fresh one needs "build" again). The GPU tier had 551
# tests when it last ran (549 in 360 s at -n 8) and 851 on 2026-12-07: split it over calls with TESTS, e.g.
#   TESTS="tests/test_attention.py tests/test_attention_fuzz.py tests/test_attention_cuda.py", then the rest.
set -uo pipefail
OUT=${OUT:-/tmp/pykernels_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
STAGES=${STAGES:-"build test sanitize bench"}
SUITES=${SUITES:-$(python3 -c "import bench; print(' '.join(bench.SUITES))")}
FAMILIES=${FAMILIES:-"cross_entropy lstm_cell lstm_layer attention attention_mma_sync linear_cross_entropy"}  # tests/gpu/sanitize.py
TESTS=${TESTS:-tests}
BENCH_ARGS=${BENCH_ARGS:-}
t0=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - t0 )) s"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'python', sys.version.split()[0])"
} 2>&1 | tee "$OUT/env.txt"
status=0
for stage in $STAGES; do
  stamp "$stage"
  case $stage in
    build)
      # Only this GPU's arch (sm_90a on Hopper: every kernel runs from it, and the build is one compile per file
      # instead of three: about half the wall time on 16 cores); the CPU tier checks the sm_80/sm_90 builds.
      cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
      [ "$cap" = "9.0" ] && cap=9.0a
      export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${cap:-8.0;9.0}}
      echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
      # nvcc --threads: a file's arches in parallel when several are asked for
      MAX_JOBS=${MAX_JOBS:-16} NVCC_THREADS=${NVCC_THREADS:-3} python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
        || { tail -40 "$OUT/build.log"; exit 1; }
      python3 -c "import pykernels; print(pykernels.build_info()); print(pykernels.available_backends('cuda'))" ;;
    test)
      xdist=""; python3 -c "import xdist" 2>/dev/null && xdist="-n ${XDIST:-8}"
      # -v streams one line per finished test, so a run cut short by the timeout still names its failures;
      # pytest-timeout (where installed) stops one hung test instead of the whole stage
      ptimeout=""; python3 -c "import pytest_timeout" 2>/dev/null && ptimeout="--timeout=${PER_TEST_TIMEOUT:-120}"
      # TEST_ARGS: more pytest arguments, e.g. TEST_ARGS="-k lstm" to rerun one family within a short lease
      timeout ${TEST_TIMEOUT:-360} python3 -m pytest -m gpu $TESTS -v -rfE -p no:cacheprovider --durations=15 $xdist \
        $ptimeout ${TEST_ARGS:-} > "$OUT/gpu_tests.log" 2>&1 || status=1
      grep -cE " PASSED " "$OUT/gpu_tests.log" | sed 's/^/passed lines: /'
      grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -2
      grep -E "(FAILED|ERROR) tests" "$OUT/gpu_tests.log" | sed 's/^\[gw[0-9]*\] \[ *[0-9]*%\] //' | sort -u | head -40 ;;
    sanitize)
      for tool in ${SAN_TOOLS:-memcheck racecheck}; do
        timeout ${SAN_TIMEOUT:-240} compute-sanitizer --tool $tool --error-exitcode 9 \
          python3 tests/gpu/sanitize.py $FAMILIES > "$OUT/sanitize_$tool.log" 2>&1; rc=$?
        echo "compute-sanitizer $tool: rc=$rc"; tail -4 "$OUT/sanitize_$tool.log"
        [ $rc -ne 0 ] && status=1
      done ;;
    bench)
      timeout ${BENCH_TIMEOUT:-540} python3 -m bench --suite $SUITES --device cuda --out "$OUT/bench" --no-plots $BENCH_ARGS \
        > "$OUT/bench.log" 2>&1 || status=1
      tail -40 "$OUT/bench.log"
      # the device tool returns only names of letters, digits, '.', '_' and '-': the suites' '+' becomes '_'
      for f in "$OUT"/bench/*.json; do [ -e "$f" ] && cp "$f" "$OUT/$(basename "$f" | tr + _)"; done
      rm -rf "$OUT/bench" ;;
    tune)
      # the Triton attention tiles on this GPU: winners into pykernels/triton/attention_tiles.json (returned under
      # $OUT for committing) and every candidate's time (bench/tune_attention.py)
      timeout ${TUNE_TIMEOUT:-300} python3 -m bench.tune_attention --out "$OUT" --write ${TUNE_ARGS:-} \
        > "$OUT/tune.log" 2>&1 || status=1
      grep -vE "^\s*$" "$OUT/tune.log" | tail -16
      cp pykernels/triton/attention_tiles.json "$OUT/" 2>/dev/null ;;
    profile)
      # where the time goes in the kernels that missed their model (docs: attention's CUDA forward at 3.5% of the
      # matmul rate, linear CE's CUDA kernels at half the Triton ones): the kernel table of each provider, then
      # Nsight Compute on one step of each CUDA provider (PROFILE="suite:providers:modes ...")
      for item in ${PROFILE:-"attention:pykernels-cuda,pykernels-triton,torch:fwd linear_cross_entropy:pykernels-cuda,pykernels-triton:fwd"}; do
        IFS=: read -r suite provs modes <<< "$item"
        timeout ${PROFILE_TIMEOUT:-120} python3 -m bench.profile --suite "$suite" --providers "$provs" --modes "$modes" \
          > "$OUT/profile_$suite.log" 2>&1 || status=1
        grep -E "^===|Self CUDA time" "$OUT/profile_$suite.log"
        timeout ${NCU_TIMEOUT:-180} ncu --profile-from-start off --clock-control none --launch-count ${NCU_KERNELS:-4} \
          --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
          --section SchedulerStats --section MemoryWorkloadAnalysis \
          python3 -m bench.profile --suite "$suite" --providers pykernels-cuda --modes "$modes" --ncu \
          > "$OUT/ncu_$suite.log" 2>&1 || status=1
        grep -E "^  [a-z_].*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Block Limit|Waves Per SM|Stall" "$OUT/ncu_$suite.log" | head -40
      done ;;
  esac
done
stamp done
exit $status
