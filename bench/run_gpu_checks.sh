#!/usr/bin/env bash
# The GPU figures of the README and the closing notes, in one go: each step under its own time limit, so that one
# stuck step still leaves the others' tables, and all of them within BUDGET seconds (default 560: a lent device
# machine runs one command for at most 600 s, and its start-up comes out of the same 15 minutes); the last step
# gets what the others left:
#   0. bench/cuda_check.py: the detector on CUDA gives the CPU's losses, gradients and detections (float32: plain,
#      fast, fast with the Triton RoIAlign and NMS, and that with its inference replayed from a CUDA graph)
#   1. bench/det_speed.py: R101-C4 and R50-FPN, resdet's plain and fast paths against torchvision (same inputs),
#      the fast path with the Triton RoIAlign and NMS, that with its inference as one CUDA graph (eval.cuda_graphs:
#      the bs-1 inference targets), and R101-C4 in the paper's layout (stride in the 1x1) with each RoIAlign
#   2. bench/trainer_speed.py det: tools/train_det.py on coco128 against the same detector alone and its loader alone
#   3. bench/trainer_speed.py pretrain: tools/pretrain_backbone.py (ResNet-50) on 500x375 JPEGs against the model
#      alone, with the workers decoding and with data.decode=device (nvJPEG)
#   4. bench/det_speed.py, both models' fast path compiled, and compiled with CUDA graphs (mode reduce-overhead:
#      the bs-1 inference targets); compile time is in the first steps, each row is printed when it is done. Last:
#      the longest and least certain step, the one a slow start cuts short
#   OUT=bench_out COCO128=../shared/data/coco128 bash bench/run_gpu_checks.sh
# On the device machine (no omegaconf, pycocotools or albumentations there): carry .whl (from
# ../shared/tools/device_wheels.sh) and .devcarry/coco128 (a copy of ../shared/data/coco128), and run
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site &&
#   OUT=$OUT COCO128=.devcarry/coco128 bash bench/run_gpu_checks.sh
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
COCO128=${COCO128:-../shared/data/coco128}
WORKERS=${WORKERS:-14}
BUDGET=${BUDGET:-560}
DET="--device cuda --batch 8 --height 800 --width 1216 --amp bf16 --iters 10 --warmup 3 --models r101c4,r50fpn"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"
nproc | tee -a "$OUT/gpu.txt"

timeout ${CHECK_TIMEOUT:-60} $PY bench/cuda_check.py 2>&1 | tee "$OUT/cuda_check.txt"
timeout ${DET_TIMEOUT:-215} $PY bench/det_speed.py $DET --variants plain,fast,triton,graph,paper,paper-triton,torchvision \
    2>&1 | tee "$OUT/det_speed.txt"
# fine-tuning's set-up (frozen BN from res2 up) on real COCO images, the C4 config's own sizes and bf16
timeout ${TRAINER_TIMEOUT:-80} $PY bench/trainer_speed.py det --device cuda --iters 80 --workers "$WORKERS" \
    --coco128 "$COCO128" model.backbone.norm=frozen_bn model.backbone.freeze_at=2 2>&1 | tee "$OUT/trainer_det.txt"
timeout ${PRETRAIN_TIMEOUT:-110} $PY bench/trainer_speed.py pretrain --device cuda --images 1900 --epochs 5 \
    --workers "$WORKERS" --decode workers,device 2>&1 | tee "$OUT/trainer_pretrain.txt"
LEFT=$((BUDGET - SECONDS - 10))  # what the steps above left, less the tables' printing
echo "compile step: ${LEFT} s left of ${BUDGET}" | tee "$OUT/budget.txt"
timeout $((LEFT > 30 ? LEFT : 30)) $PY bench/det_speed.py $DET --variants compile-ro,compile 2>&1 \
    | tee "$OUT/det_speed_compile.txt"
echo "== tables"
grep -E "vs CPU|worst" "$OUT/cuda_check.txt"
for f in det_speed trainer_det trainer_pretrain det_speed_compile; do
    echo "-- $f"; grep -E "^\||^device|^det:|^pretrain:|^resdet|^torchvision|failed" "$OUT/$f.txt"
done
