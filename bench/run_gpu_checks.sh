#!/usr/bin/env bash
# The GPU figures of the README and the closing notes, in one go (about 8 minutes on one H100/H200):
# pretraining speed, detection speed (ours vs torchvision, same inputs) and the coco128 overfit.
#   OUT=bench_out bash bench/run_gpu_checks.sh
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
COCO128=${COCO128:-../shared/data/coco128}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"
timeout 120 $PY bench/pretrain_speed.py --device cuda --batch 256 --amp bf16 --channels-last --iters 15 --warmup 5 \
    --pipeline-images 200 2>&1 | tee "$OUT/pretrain_speed.txt"
timeout 180 $PY bench/det_speed.py --device cuda --batch 8 --height 800 --width 1216 --amp bf16 --iters 10 --warmup 3 \
    2>&1 | tee "$OUT/det_speed.txt"
timeout ${COCO128_TIMEOUT:-200} $PY tools/train_det.py configs/frcnn_r50_c4_coco128.yaml \
    data.train_images=$COCO128/train2017 data.val_images=$COCO128/train2017 \
    data.train_annotations=$COCO128/annotations/instances_train2017.json \
    data.val_annotations=$COCO128/annotations/instances_train2017.json \
    output_dir="$OUT/coco128_run" 2>&1 | grep -v "it/s\]$" | tail -40 | tee "$OUT/coco128.txt"
cp "$OUT/coco128_run/summary.json" "$OUT/coco128_summary.json" 2>/dev/null
rm -rf "$OUT/coco128_run"
