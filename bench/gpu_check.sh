#!/usr/bin/env bash
# GPU check: kernels compiled for the real GPU, their bandwidth, end-to-end speed.
#
#   bash bench/gpu_check.sh            # from anywhere; runs from the repo root
#   PYTHON=.venv/bin/python GPU_CHECK_LOG_DIR=/tmp/logs bash bench/gpu_check.sh
#
# Without CUDA it says so, runs the kernel tests under TRITON_INTERPRET=1 and
# exits with their status (0 when they pass). With CUDA it runs, each step
# bounded by `timeout`, the open issues' GPU measurements (about 5 minutes):
#   1. bench/volumes.py: 3-D ResNet18 and DenseNet121 at 96^3, batch 32
#      (speedup vs theory, peak memory vs naive, exactness),
#   2. bench/monai.py: krypton_fx.monai.OcclusionSensitivity vs MONAI's at 96^3
#      (gaussian, mask 16, overlap 0.5, n_batch 32; skipped without monai),
#   3. bench/cold_start.py: one image, cold, in fresh processes, against naive, with
#      tiers and without (KRYPTON_FX_TIERED=0),
#   4. bench/captum.py at the issue's setting (4 images of 224, window 16,
#      stride 8, perturbations_per_eval=128), cold and warm, against Captum
#      (skipped without captum),
#   4b. bench/segmentation.py: MONAI's 3-D UNet (batch norm) at 96^3 with a
#      SegmentationTarget, batch 16, 64 centre positions (speedup vs theory,
#      peak memory vs naive, exactness; skipped without monai),
#   5. with GPU_CHECK_SCALE=1 (about 3 more minutes), bench/highres.py: VGG16 at 896 and
#      ResNet50 at 1024 (patch 32, stride 8) explained in full, and bench/scale.py:
#      explain_many against the per-image loop;
# and with GPU_CHECK_FULL=1 also (about 12 more minutes) the kernel tests
# natively (KRYPTON_TRITON_NATIVE=1), the GPU path's tests, the zoo's
# exactness on CUDA, the kernels' sm_XX code (codegen), their bandwidth and
# bench/speed.py in float32 and float16. It prints a summary; exit status 0
# when every step that ran passed. Step limits in seconds can be overridden:
# VOLUMES_TIMEOUT, MONAI_TIMEOUT, SEGMENTATION_TIMEOUT, COLD_TIMEOUT, CAPTUM_TIMEOUT, HIGHRES_TIMEOUT,
# TESTS_TIMEOUT, GPU_PATH_TIMEOUT, ZOO_TIMEOUT, BANDWIDTH_TIMEOUT, SPEED_TIMEOUT,
# and CPU_TESTS_TIMEOUT for the interpreter run without CUDA.
# Each step's log is kept in GPU_CHECK_LOG_DIR.

set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PYTHON=${PYTHON:-python3}
# Natively every new kernel shape is a compile: the kernel tests took 84 s on an
# H200 with 55 tests; there are 68 now.
TESTS_TIMEOUT=${TESTS_TIMEOUT:-180}
ZOO_TIMEOUT=${ZOO_TIMEOUT:-120}
GPU_PATH_TIMEOUT=${GPU_PATH_TIMEOUT:-60}
# 5 cases x 8 swept launch configs, each a compile and a CUDA-graph timing.
BANDWIDTH_TIMEOUT=${BANDWIDTH_TIMEOUT:-150}
SPEED_TIMEOUT=${SPEED_TIMEOUT:-80}
# 2 models x 2 rounds x (Captum, krypton_fx), each a fresh process (import, CUDA
# start, model build) doing a cold and a warm call; round 1 also compiles the
# Triton kernels into Triton's cache.
CAPTUM_TIMEOUT=${CAPTUM_TIMEOUT:-90}
VOLUMES_TIMEOUT=${VOLUMES_TIMEOUT:-70}
MONAI_TIMEOUT=${MONAI_TIMEOUT:-80}
# 3 rounds (one warm-up) of 64 positions of a 96^3 UNet, naive and incremental.
SEGMENTATION_TIMEOUT=${SEGMENTATION_TIMEOUT:-120}
# 3 models x 3 fresh processes (krypton_fx with tiers, naive, krypton_fx without tiers); it
# timed out at 100 s on an H200 with 3 processes a model.
COLD_TIMEOUT=${COLD_TIMEOUT:-150}
HIGHRES_TIMEOUT=${HIGHRES_TIMEOUT:-60}
# The interpreter runs many small row-tile programs: about 135 s on 2 cores.
CPU_TESTS_TIMEOUT=${CPU_TESTS_TIMEOUT:-300}
LOG_DIR=${GPU_CHECK_LOG_DIR:-bench/results/gpu_check}
mkdir -p "$LOG_DIR"

SUMMARY=()
FAILED=0

# run_step NAME LIMIT CMD...: run CMD under `timeout`, log it, record the outcome.
run_step() {
    local name=$1 limit=$2
    shift 2
    local log="$LOG_DIR/$name.log" start rc status
    echo
    echo "=== $name (limit ${limit}s): $*"
    start=$(date +%s)
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status="PASS" ;;
        124 | 137) status="TIMEOUT after ${limit}s"; FAILED=1 ;;
        *) status="FAIL (exit $rc)"; FAILED=1 ;;
    esac
    SUMMARY+=("$(printf '%-16s %-22s %4ss  log: %s' "$name" "$status" "$(( $(date +%s) - start ))" "$log")")
    return "$rc"
}

print_summary() {
    echo
    echo "=== gpu_check summary"
    printf '%s\n' "${SUMMARY[@]}"
}

if ! "$PYTHON" -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
    echo "############################################################"
    echo "# No CUDA device (or torch missing): GPU part SKIPPED.     #"
    echo "# Running the kernel tests under TRITON_INTERPRET=1 only.  #"
    echo "############################################################"
    run_step kernel-tests-cpu "$CPU_TESTS_TIMEOUT" \
        env TRITON_INTERPRET=1 "$PYTHON" -m pytest tests/test_kernels.py tests/test_gpu_path.py -q
    SUMMARY+=("GPU steps        SKIPPED (no CUDA device)")
    print_summary
    exit "$FAILED"
fi

"$PYTHON" -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__)"

# --- the open issues' GPU goals (the default: about 5 minutes) ---------------------------------
# 3-D: ResNet18 and DenseNet121 at 96^3, batch 32 (goal: ResNet18 >= 80 % of theory, peak <= 50 %).
run_step volumes "$VOLUMES_TIMEOUT" \
    env -u TRITON_INTERPRET "$PYTHON" bench/volumes.py --device cuda --cases resnet18@96,densenet121@96 \
    --batch-size 32 --positions 256 --rounds 2 || echo "bench/volumes.py failed (see above); continuing"
# MONAI's OcclusionSensitivity vs ours at 96^3, gaussian, mask 16, overlap 0.5, n_batch 32.
if "$PYTHON" -c "import monai" >/dev/null 2>&1; then
    run_step monai "$MONAI_TIMEOUT" \
        env -u TRITON_INTERPRET "$PYTHON" bench/monai.py --device cuda --size 96 --n-batch 32 \
        --modes gaussian || echo "bench/monai.py failed (see above); continuing"
else
    SUMMARY+=("monai            SKIPPED (monai not installed)")
fi
# One image, cold, in fresh processes: compile + map against the naive map.
if "$PYTHON" -c "import monai" >/dev/null 2>&1; then
    run_step segmentation "$SEGMENTATION_TIMEOUT" \
        env -u TRITON_INTERPRET "$PYTHON" bench/segmentation.py --device cuda --cases unet3d@96 \
        --batch-size-3d 16 --positions-3d 64 --rounds 2 || echo "bench/segmentation.py failed (see above); continuing"
fi

run_step cold-start "$COLD_TIMEOUT" \
    env -u TRITON_INTERPRET "$PYTHON" bench/cold_start.py --device cuda --no-second \
    || echo "bench/cold_start.py failed (see above); continuing"
if "$PYTHON" -c "import captum" >/dev/null 2>&1; then
    run_step captum "$CAPTUM_TIMEOUT" \
        env -u TRITON_INTERPRET "$PYTHON" bench/captum.py --device cuda --models resnet18,vgg16 \
        --size 224 --images 4 --window 16 --stride 8 --perturbations-per-eval 128 --target 3 \
        --rounds "${CAPTUM_ROUNDS:-1}" || echo "bench/captum.py failed (see above); continuing"
else
    echo "captum is not installed: captum step not run (pip install captum)"
    SUMMARY+=("captum           SKIPPED (captum not installed)")
fi
if [[ -n ${GPU_CHECK_SCALE:-} ]]; then  # the scale issue: VGG16 at 896, ResNet50 at 1024 in full, many images
    run_step highres "$HIGHRES_TIMEOUT" \
        env -u TRITON_INTERPRET "$PYTHON" bench/highres.py --device cuda --models vgg16 --sizes 896 \
        --positions 256 --batch-size 64 --rounds 1 || echo "bench/highres.py failed; continuing"
    run_step highres-full "$HIGHRES_TIMEOUT" \
        env -u TRITON_INTERPRET "$PYTHON" bench/highres.py --device cuda --models resnet50 --sizes 1024 \
        --patch 32 --stride 8 --positions 64 --batch-size 64 --rounds 1 --full \
        || echo "bench/highres.py --full failed; continuing"
    run_step scale-many "$HIGHRES_TIMEOUT" \
        env -u TRITON_INTERPRET "$PYTHON" bench/scale.py --device cuda --rounds 2 --no-naive \
        || echo "bench/scale.py failed; continuing"
fi

if [[ -z ${GPU_CHECK_FULL:-} ]]; then
    print_summary
    exit "$FAILED"
fi

# --- GPU_CHECK_FULL=1: the kernels and the 2-D engine as well (about 12 more minutes) -----------

if [[ -z ${SKIP_KERNEL_TESTS:-} ]]; then
    run_step kernel-tests-gpu "$TESTS_TIMEOUT" \
        env -u TRITON_INTERPRET KRYPTON_TRITON_NATIVE=1 "$PYTHON" -m pytest tests/test_kernels.py -q -x
fi

run_step gpu-path "$GPU_PATH_TIMEOUT" \
    env -u TRITON_INTERPRET KRYPTON_TRITON_NATIVE=1 "$PYTHON" -m pytest tests/test_gpu_path.py -q

run_step zoo-exact-gpu "$ZOO_TIMEOUT" \
    env -u TRITON_INTERPRET KRYPTON_TRITON_NATIVE=1 KRYPTON_TEST_DEVICE=cuda "$PYTHON" -m pytest tests/test_models.py -q -x \
    -k "resnet18 or inception_v3 or mobilenet_v3_large or vgg11_bn or densenet121 or efficientnet_b0"

ARCH=$("$PYTHON" -c "import torch; major, minor = torch.cuda.get_device_capability(); print(10 * major + minor)")
run_step codegen 60 \
    env -u TRITON_INTERPRET "$PYTHON" -m krypton_fx.triton_kernels.codegen --arch "$ARCH"

run_step bandwidth "$BANDWIDTH_TIMEOUT" \
    env -u TRITON_INTERPRET "$PYTHON" bench/kernel_bandwidth.py --sweep

if [[ -f bench/speed.py ]]; then
    run_step speed "$SPEED_TIMEOUT" \
        env -u TRITON_INTERPRET "$PYTHON" bench/speed.py --device cuda \
        --models vgg16,resnet18,inception_v3 --batch-size 128 \
        || echo "speed.py failed (see above); continuing"
    run_step speed-fp16 "$SPEED_TIMEOUT" \
        env -u TRITON_INTERPRET "$PYTHON" bench/speed.py --device cuda \
        --models vgg16,resnet18,inception_v3 --batch-size 128 --dtype float16 \
        || echo "speed.py (float16) failed (see above); continuing"
else
    echo "bench/speed.py not found: speed step not run"
    SUMMARY+=("speed            MISSING (bench/speed.py not written yet)")
    FAILED=1
fi


print_summary
exit "$FAILED"
