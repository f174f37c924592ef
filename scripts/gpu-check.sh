#!/usr/bin/env bash
# The prepared GPU check (docs/benchmarks.md): one short run on a GPU machine that has python3 with torch
# 2.11.0+cu130 and its NVIDIA libraries but no GStreamer and no network, from binaries built on a CPU machine.
#
#   scripts/gpu-check.sh --bundle           here, after `make build`: binaries + the shared libraries they need that
#                                           such a machine lacks -> build/gpu-bundle/ (carry that folder)
#   scripts/gpu-check.sh [--out DIR]        there: the checks below, JSON per step + gpu-check.json + gpu-check.log
#   scripts/gpu-check.sh --dry-run          the same steps at the tiny config on the CPU (CI runs this)
#   --baseline 'CMD'                        also run CMD (the upstream reference DiT timed at the same config, its
#                                           code brought in for the run and never committed); CMD prints one JSON
#                                           line with fps and peak_allocated_bytes, kept as baseline.json
#
# Steps: the CUDA tests (kernels vs their references, CUDA graphs vs eager, attention kernels, memory cap); the
# attention kernels timed at the model's shapes; the 14B DiT on one GPU in bf16, FP8 and FP8 + CUDA graphs (FPS, time
# to first block, peak memory beside the planner's prediction); one stage of the 4-stage plan under a 22 GiB cap over
# 20 blocks; the optional baseline. Each step has its own time limit; a failed step is recorded and the rest run.
# Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0 BUNDLE=0 OUT_DIR="${OUT:-gpu-check-out}" BASELINE="" BIN=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --bundle) BUNDLE=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    --bin) BIN="$2"; shift ;;
    --baseline) BASELINE="$2"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

BUILD=${BUILD:-build}
PROGRAMS=("$BUILD/engine/tools/bench/liveavatar-bench" "$BUILD/tests/cuda/cuda-test")

if [ "$BUNDLE" = 1 ]; then
  # The binaries and every shared library they load that is neither LibTorch's (the GPU machine's python3 has it,
  # with the CUDA libraries) nor the C runtime's.
  dest="$BUILD/gpu-bundle"
  rm -rf "$dest" && mkdir -p "$dest/bin" "$dest/lib"
  for p in "${PROGRAMS[@]}"; do
    [ -x "$p" ] || { echo "gpu-check: $p is missing: run make build first" >&2; exit 1; }
    strip --strip-unneeded -o "$dest/bin/$(basename "$p")" "$p"
    ldd "$p" | awk '/=> \// {print $3}' | while read -r lib; do
      case "$(basename "$lib")" in
        libtorch*|libc10*|libcuda*|libcu*|libnv*|libnccl*|libcudnn*|libgomp*|libc.so*|libm.so*|libstdc++*|libgcc_s*|\
        libpthread*|libdl.so*|librt.so*|ld-linux*) ;;
        *) cp -L -n "$lib" "$dest/lib/" ;;
      esac
    done
  done
  cp scripts/gpu-check.sh "$dest/"
  du -sh "$dest" | awk '{print "gpu-check: bundle " $1 " in '"$dest"'"}'
  ls "$dest/lib"
  exit 0
fi

mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu-check.log"
: > "$LOG"
say() { printf '%s\n' "$*" | tee -a "$LOG"; }

# Where the binaries are: --bin, the bundle, or the build folder.
if [ -z "$BIN" ]; then
  if [ "$DRY" = 0 ] && [ -d "$BUILD/gpu-bundle/bin" ]; then BIN="$BUILD/gpu-bundle/bin"; else BIN=""; fi
fi
if [ -n "$BIN" ]; then
  BENCH="$BIN/liveavatar-bench" CUDA_TEST="$BIN/cuda-test"
  [ -d "$BIN/../lib" ] && export LD_LIBRARY_PATH="$(cd "$BIN/../lib" && pwd)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
  BENCH="${PROGRAMS[0]}" CUDA_TEST="${PROGRAMS[1]}"
fi
if [ "$DRY" = 0 ]; then
  # LibTorch and the NVIDIA libraries of the machine's python3 (its torch wheel and the nvidia-* wheels beside it).
  TORCH_LIB=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)
  if [ -n "$TORCH_LIB" ]; then
    NV=$(ls -d "$TORCH_LIB"/../../nvidia/*/lib 2>/dev/null | tr '\n' ':')
    export LD_LIBRARY_PATH="$TORCH_LIB:${NV}${LD_LIBRARY_PATH:-}"
  fi
fi

FAILED=0 PASSED=0
# run NAME LIMIT_S CMD...: runs the step, keeps its stdout (JSON) as NAME.json and its stderr in the log.
run() {
  local name=$1 limit=$2
  shift 2
  say "== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT_DIR/$name.out" 2> "$OUT_DIR/$name.err"
  local rc=$?
  tail -n 20 "$OUT_DIR/$name.err" >> "$LOG"
  if [ $rc = 0 ]; then
    PASSED=$((PASSED + 1))
    say "   ok in $((SECONDS - t0)) s"
  else
    FAILED=$((FAILED + 1))
    say "   FAILED (exit $rc$([ $rc = 124 ] && echo ', time limit') ) after $((SECONDS - t0)) s"
  fi
  return $rc
}
# The last JSON line of a step's output, as NAME.json.
keep_json() { grep '^{' "$OUT_DIR/$1.out" | tail -n 1 > "$OUT_DIR/$1.json" || true; }

say "gpu-check $(date -u +%Y-%m-%dT%H:%MZ) $([ "$DRY" = 1 ] && echo '(dry run: tiny config on the CPU)')"
if command -v nvidia-smi > /dev/null; then nvidia-smi -L 2>&1 | tee -a "$LOG"; fi
python3 -c 'import torch; print("python3 torch", torch.__version__, "cuda", torch.version.cuda)' 2>/dev/null | tee -a "$LOG"

if [ "$DRY" = 1 ]; then
  CFG=tiny DEV=cpu SIZE=64x128 BLOCKS=6 CAP_BLOCKS=6 CAP=""
  SIM=1/2
else
  CFG=14b DEV=cuda:0 SIZE=704x384 BLOCKS=12 CAP_BLOCKS=20 CAP="--memory-cap 22"
  SIM=1/4
fi

run cuda-tests 240 "$CUDA_TEST" --gtest_brief=1 --gtest_output="json:$OUT_DIR/cuda-tests.json"
run attention 120 "$BENCH" --config $CFG --attention-sweep --devices $DEV --size $SIZE && keep_json attention
run single-bf16 150 "$BENCH" --config $CFG --random-weights --devices $DEV --size $SIZE --precision bf16 \
  --blocks $BLOCKS --plot "$OUT_DIR/single-bf16.png" && keep_json single-bf16
run single-fp8 150 "$BENCH" --config $CFG --random-weights --devices $DEV --size $SIZE --precision fp8 \
  $([ "$DRY" = 1 ] && echo --fp8-compute scaled-mm) --blocks $BLOCKS && keep_json single-fp8
run single-fp8-graphs 150 "$BENCH" --config $CFG --random-weights --devices $DEV --size $SIZE --precision fp8 \
  $([ "$DRY" = 1 ] && echo --fp8-compute scaled-mm) --cuda-graphs --blocks $BLOCKS && keep_json single-fp8-graphs
run stage-of-4-capped 150 "$BENCH" --config $CFG --random-weights --devices $DEV --size $SIZE --precision bf16 \
  --simulate-stage $SIM $CAP --blocks $CAP_BLOCKS --plot "$OUT_DIR/stage-capped.png" && keep_json stage-of-4-capped
if [ -n "$BASELINE" ]; then
  run baseline 240 bash -c "$BASELINE" && keep_json baseline
fi

# One summary: every step's JSON, and a short table last.
python3 - "$OUT_DIR" "$PASSED" "$FAILED" "$DRY" <<'EOF' | tee -a "$LOG"
import json, os, sys
out, passed, failed, dry = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
steps = {}
for name in ["attention", "single-bf16", "single-fp8", "single-fp8-graphs", "stage-of-4-capped", "baseline"]:
    p = os.path.join(out, name + ".json")
    if os.path.exists(p) and os.path.getsize(p) > 0:
        try:
            steps[name] = json.load(open(p))
        except ValueError as e:
            steps[name] = {"error": "unreadable JSON: %s" % e}
summary = {"dry_run": dry, "passed": passed, "failed": failed, "steps": steps}
json.dump(summary, open(os.path.join(out, "gpu-check.json"), "w"), indent=2)
gib = 1 << 30
print("%-20s %8s %8s %10s %12s %12s %8s" % ("step", "fps", "block_s", "first_s", "peak_GiB", "planned_GiB", "TFLOP/s"))
for name, s in steps.items():
    if "fps" not in s:
        continue
    d = s["devices"][0]
    planned = d.get("predicted", {}).get("dit_bytes", 0) / gib
    print("%-20s %8.2f %8.3f %10.3f %12.2f %12.2f %8.1f" % (name, s["fps"], s["block_median_s"],
          s["time_to_first_block_s"], d["peak_allocated_bytes"] / gib, planned, s["achieved_tflops"]))
if "attention" in steps:
    for case in steps["attention"].get("cases", []):
        row = ", ".join("%s %s" % (k, ("%.2f ms" % v["median_ms"]) if "median_ms" in v else "refused")
                        for k, v in case.items() if isinstance(v, dict))
        print("attention %d x %d keys: %s" % (case["queries"], case["keys"], row))
if "baseline" in steps and "single-bf16" in steps:
    b, o = steps["baseline"], steps["single-bf16"]
    if b.get("fps") and b.get("peak_allocated_bytes"):
        print("vs baseline: %.2fx throughput, %.2fx peak memory" % (o["fps"] / b["fps"],
              o["devices"][0]["peak_allocated_bytes"] / b["peak_allocated_bytes"]))
print("%d passed, %d failed" % (passed, failed))
EOF
[ "$FAILED" = 0 ]
