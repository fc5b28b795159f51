#!/usr/bin/env bash
# The GPU checks: a bf16 training smoke test with resume (train_bf16), a kernel profile (profile), the
# inference and training benchmarks against SegFormer (inference, training). All four take ~12
# minutes on an H200 (the inference step compiles twice, ~2.5 minutes); name steps to run fewer.
# Logs and the updated RESULTS.md go to $OUT (the device tool's folder) or runs/gpu-checks.
#   METASEG_REFERENCE_DIR=path/to/reference bash benchmarks/run_gpu_checks.sh [train_bf16] [profile] [inference] [training]
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT="${OUT:-runs/gpu-checks}"
export OUT
mkdir -p "$OUT"
REFERENCE="${METASEG_REFERENCE_DIR:-../shared/reference}"
status=0

STEPS=" ${*:-train_bf16 profile inference training} "

step() {  # step NAME SECONDS COMMAND...: runs with a time limit, keeps the log, shows its end
    local name=$1 limit=$2
    shift 2
    case "$STEPS" in *" $name "*) ;; *) return 0 ;; esac
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 30 "$OUT/$name.log"
    if [ "$rc" -ne 0 ]; then echo "=== $name FAILED (exit $rc)"; status=1; fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"

TRAIN=(accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no examples/train.py
       --output_dir runs/gpu-bf16 --per_device_train_batch_size 16 --max_train_steps 40)
step train_bf16 150 bash -c "rm -rf runs/gpu-bf16 && ${TRAIN[*]} --eval_steps 20 --checkpointing_steps 20 --with_tracking \
  && ${TRAIN[*]} --resume_from_checkpoint latest \
  && python3 -c \"import json; r = json.load(open('runs/gpu-bf16/all_results.json')); print({k: r[k] for k in ('device', 'mixed_precision', 'train_steps', 'eval_mean_iou')}); assert r['device'] == 'cuda' and r['mixed_precision'] == 'bf16' and r['train_steps'] == 40\""
step profile 90 python3 benchmarks/profile_forward.py --device cuda
step inference 330 python3 benchmarks/bench_inference.py --device cuda --reference-dir "$REFERENCE" --write-results
# compiled training steps are left out: their compilation alone ran past this step's limit
step training 150 python3 benchmarks/bench_training.py --device cuda --compile-models '' --write-results
exit $status
