#!/usr/bin/env bash
# One GPU session in one call (H200): install the project, run the GPU correctness tests, then every
# benchmark subcommand at real shapes, writing results JSON to $OUT (and bench/results/), and
# regenerate BENCHMARKS.md. Each step has its own time limit, and every limit is cut to what is left
# of the whole session's budget (LONGCAT_GPU_BUDGET seconds, default 530, with 25 s kept for the
# report), so the script ends in time even when steps hang; a failed or skipped step is reported
# and the next one still runs. Steps run in order of importance: first the kernels (correctness,
# then speed against the peers), then the model step, memory and the pipeline.
#
#   bash bench/gpu_session.sh            # from the repository root, on the GPU machine
#
# Afterwards commit bench/results/*.json and BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT" bench/results
FAILED=""
START=$SECONDS
BUDGET="${LONGCAT_GPU_BUDGET:-530}"
REPORT_RESERVE=25

step() {  # step SECONDS command...
    local limit=$1; shift
    local left=$((BUDGET - REPORT_RESERVE - (SECONDS - START)))
    if [ "$left" -lt 20 ]; then
        echo "== skipped (session budget spent): $*"
        FAILED="$FAILED
  skipped: $*"
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "== [$((SECONDS - START))s, limit ${limit}s] $*"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    [ "$rc" -eq 0 ] || FAILED="$FAILED
  rc=$rc: $*"
    echo "== rc=$rc"
}

python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null | tee "$OUT/nvidia-smi.csv"
python3 -c "import torch, triton, longcat; print('torch', torch.__version__, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name(0))"

# (the real-size pipeline test is the longcat-bench pipeline step below, with its own time limit)
step 75  python3 -m pytest -m gpu -q tests --junitxml="$OUT/pytest-gpu.xml" -k "not test_720p_refine_fits_8gb_on_the_gpu"
step 130 python3 -m longcat.bench kernels --ops attention layer_norm_modulate gated_residual fused_norm rms_norm rope_3d qkv_norm_rope swiglu --json "$OUT/kernels-h200.json"  # prints the BSA targets (bench/targets.py)
# GEMM targets (M = 1024, 37,440, 168,960): 8-bit GEMMs vs bf16 cuBLAS, torch._scaled_mm and the peers; packed vs unpacked FFN
step 110 python3 -m longcat.bench kernels --ops quant_gemm --json "$OUT/gemm-h200.json"
step 30  python3 -m longcat.bench accuracy --json "$OUT/accuracy-h200.json"
step 80  python3 -m longcat.bench model --compare --configs reference accelerated fp8 int8 int8-offload --warmup 1 --repeats 2 --json "$OUT/model-h200.json"
step 80  python3 -m longcat.bench memory --latent 48 88 160 --configs fp8 fp8-chunked int8-offload int8-chunked-offload --json "$OUT/memory-h200.json"
# The whole-pipeline memory check needs transformers and diffusers; the GPU machine has no network,
# so they come as wheels in a git-ignored .whl/ folder when someone carried them there.
if ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --find-links .whl transformers diffusers; then
    # Real-size components; 8 of the 48 latent frames at 720p so three runs fit the time limit.
    step 100 python3 -m longcat.bench pipeline --stage refine --resolution 720p --budget 8GB --also-budgets 16GB \
             --compare-resident --latent-frames 8 --steps 2 --json "$OUT/pipeline-h200.json"
else
    echo "== skipped longcat-bench pipeline: no transformers/diffusers wheels in .whl/" \
         "(on a machine with network: pip download -d .whl transformers diffusers --python-version <GPU python>)"
fi
step 30  env LONGCAT_BENCH_SIZES=480p python3 -m pytest bench/ --benchmark-only -q -k "not compile" \
         --benchmark-json "$OUT/pytest-benchmark-h200.json"

if [ "$(cd "$OUT" && pwd)" != "$(cd bench/results && pwd)" ]; then
    cp "$OUT"/*-h200.json bench/results/ 2>/dev/null
fi
REPORT_RESERVE=0
step 25  python3 -m longcat.bench report
cp BENCHMARKS.md "$OUT/" 2>/dev/null
[ -d bench/results/plots ] && cp -r bench/results/plots "$OUT/" 2>/dev/null

echo "== done in $((SECONDS - START))s"
if [ -n "$FAILED" ]; then
    echo "failed steps:$FAILED"
    exit 1
fi
