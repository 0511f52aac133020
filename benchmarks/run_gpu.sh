#!/usr/bin/env bash
# The whole GPU benchmark as one prepared call, about 6 minutes on one H100:
#
#   bash benchmarks/run_gpu.sh              # on the GPU machine (python3 with jax[cuda], flax,
#                                           # optax, torch; nothing to install)
#   QUICK=1 bash benchmarks/run_gpu.sh      # the same commands at tiny sizes on a CPU:
#                                           # ResNet-18, ImageNet stem, batch 8, members 1
#                                           # and 2, 1 step (92 s on 2 idle cores);
#   QUICK=1 QUICK_MODEL=tiny bash ...       # the same with the `tiny` model (53 s)
#
# JSON goes to $OUT/<run>/ if OUT is set, else benchmarks/results/<run>/, where <run> is
# gpu-<UTC time> (quick-<UTC time> with QUICK=1); each section writes its own file and
# throughput.py rewrites it after every row, so a cut-off run keeps what it measured.
#
# Sections, in order of importance (the first four are the targets in benchmarks/README.md):
#   1. targets_r18_imagenet_fp32  5 ResNet-18s, ImageNet stem, fp32, vmap/map/hybrid:5,
#                                 plus the PyTorch reference (members one after another)
#   2. pipeline_r18_cifar_bf16    5 ResNet-18s, CIFAR stem, bf16: real step (gather +
#                                 augmentation) vs resident float32 batch; PyTorch reference
#   3. memory_r18_m20             20 ResNet-18s per stem, map (peak device memory per row)
#   4. unlearn_latency            unlearn call + replace retraining, 5 ResNet-18s
#   5. retrain_cost               seconds to retrain k = 1..5 of 5 ResNet-18s for one epoch:
#                                 sub-stacks (pow2) against the whole masked stack (full)
#   6. grid_r18                   the rest of the grid: ResNet-18, both stems, M = 5 10 20 1,
#                                 auto/vmap/map/unroll/hybrid:5, fp32 and bf16, in the time left
#   7. resnet152                  ResNet-152 (one member): CIFAR stem bf16, ImageNet stem
#                                 fp32, with the PyTorch reference; last, as it compiles longest
#
# Time: each section has a soft budget (throughput.py starts no row past it; rows not started
# are recorded as "skipped: budget") and a hard `timeout`; TOTAL_S (default 360) bounds the
# soft budgets. Every row runs in its own process, so its peak device memory is its own.
# To run only some sections, skipping cells that earlier JSON files measured ok:
#   SECTIONS=grid_r18 TOTAL_S=540 SKIP_DONE="benchmarks/results/gpu-*/*.json" \
#       bash benchmarks/run_gpu.sh

set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Let one row use (nearly) the whole card: the 20-member rows test whether they fit in 80 GB.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
PY="${PYTHON:-python3}"

if [[ "${QUICK:-0}" == 1 ]]; then  # CPU smoke run: every command, tiny sizes
    RUN="quick-$(date -u +%Y%m%dT%H%M%SZ)"
    QM="${QUICK_MODEL:-resnet18}"
    R18I=$QM:imagenet; R18C=$QM:imagenet  # the CIFAR stem is 16x the work on a CPU
    R152C=$QM:imagenet:fp32; R152I=$QM:imagenet:fp32; UNLEARN_MODEL=$QM
    BATCH=8; STEPS=1; N_DATA=256; M5=2; M20=2; MGRID="1"
    # hybrid:5 is skipped at 2 members; most quick rows repeat earlier ones and are skipped
    # as done (--skip-done), which keeps the run under 2 minutes on 2 idle CPU cores.
    STRATS="map hybrid:5"; PIPE_STRATS="map"; MEM_STRATS="map"; UNLEARN_STRATS="map"
    UNLEARN_SIZES=(--members 2 --batch 8 --samples 16 --epochs 1 --steps 1 --repeats 1)
    RETRAIN_SIZES=(--members 2 --batch 8 --samples 16 --repeats 1)
    MEM_C_PRECISION=fp32
    ROW_S=300; R152_ROW_S=300; TOTAL_S="${TOTAL_S:-100000}"
else
    RUN="gpu-$(date -u +%Y%m%dT%H%M%SZ)"
    R18I=resnet18:imagenet; R18C=resnet18:cifar
    R152C=resnet152:cifar:bf16; R152I=resnet152:imagenet:fp32; UNLEARN_MODEL=resnet18
    BATCH=512; STEPS=5; N_DATA=50000; M5=5; M20=20; MGRID="5 10 20 1"
    # 20 members: map first (the GPU default); grid_r18 adds hybrid:5 and vmap if time allows.
    STRATS="auto map hybrid:5 vmap unroll"; PIPE_STRATS="map hybrid:5 vmap"; MEM_STRATS="map"
    UNLEARN_STRATS="map vmap"
    UNLEARN_SIZES=(--members 5 --batch 512 --samples 10000 --epochs 10 --steps 5 --repeats 5)
    RETRAIN_SIZES=(--members 5 --batch 512 --samples 4096 --repeats 3)
    MEM_C_PRECISION=bf16
    ROW_S=150; R152_ROW_S=240; TOTAL_S="${TOTAL_S:-360}"
fi
ALL_SECTIONS="targets_r18_imagenet_fp32 pipeline_r18_cifar_bf16 memory_r18_m20 unlearn_latency"
ALL_SECTIONS+=" retrain_cost"
ALL_SECTIONS+=" grid_r18 resnet152"
SECTIONS="${SECTIONS:-$ALL_SECTIONS}"
R152_S=90  # soft budget of the ResNet-152 section, kept free by the sections before it
[[ " $SECTIONS " == *" resnet152 "* ]] && RESERVE=$R152_S || RESERVE=0
DEST="${OUT:-benchmarks/results}/$RUN"
mkdir -p "$DEST"
START=$SECONDS

left() {  # seconds of TOTAL_S left, less $1 kept for later sections
    echo $(( TOTAL_S - (SECONDS - START) - ${1:-0} ))
}

min() { echo $(( $1 < $2 ? $1 : $2 )); }

throughput() {  # NAME SOFT_BUDGET_S ROW_TIMEOUT_S ARGS...
    local name=$1 budget=$2 row_s=$3
    shift 3
    if (( budget <= 0 )); then
        echo "== $name: no time left (TOTAL_S=$TOTAL_S), skipped"
        return
    fi
    echo "== $name (soft budget ${budget}s, $(( SECONDS - START ))s elapsed)"
    timeout --kill-after=15 $(( budget + row_s + 30 )) \
        "$PY" benchmarks/throughput.py "$@" --batch "$BATCH" --steps "$STEPS" \
        --n-data "$N_DATA" --row-timeout "$row_s" --budget-s "$budget" \
        --skip-done "$DEST"/*.json ${SKIP_DONE:-} --out "$DEST/$name.json" \
        || echo "== $name exited with status $?"
}

targets_r18_imagenet_fp32() {
    throughput targets_r18_imagenet_fp32 "$(min 60 "$(left "$RESERVE")")" "$ROW_S" \
        --models "$R18I" --members "$M5" --strategies $STRATS --precisions fp32 \
        --no-augment --torch
}

pipeline_r18_cifar_bf16() {
    throughput pipeline_r18_cifar_bf16 "$(min 90 "$(left "$RESERVE")")" "$ROW_S" \
        --models "$R18C" --members "$M5" --strategies $PIPE_STRATS --precisions bf16 \
        --pipeline --torch
}

memory_r18_m20() {
    throughput memory_r18_m20 "$(min 60 "$(left "$RESERVE")")" "$ROW_S" \
        --models "$R18I:fp32" "$R18C:$MEM_C_PRECISION" --members "$M20" \
        --strategies $MEM_STRATS --no-augment
}

limited() {  # NAME SCRIPT ARGS...: one script within 60 s of the time left, plus a margin
    local name=$1 script=$2 budget
    shift 2
    budget=$(min 60 "$(left "$RESERVE")")
    if (( budget <= 0 )); then echo "== $name: no time left, skipped"; return; fi
    echo "== $name (hard limit $(( budget + 60 ))s, $(( SECONDS - START ))s elapsed)"
    timeout --kill-after=15 $(( budget + 60 )) "$PY" "benchmarks/$script" "$@" \
        --out "$DEST/$name.json" || echo "== $name exited with status $?"
}

unlearn_latency() {
    limited unlearn_latency unlearn_latency.py --model "$UNLEARN_MODEL" --stem imagenet \
        --precision fp32 --strategies $UNLEARN_STRATS "${UNLEARN_SIZES[@]}" --n-data "$N_DATA"
}

retrain_cost() {
    limited retrain_cost retrain_cost.py --model "$UNLEARN_MODEL" --stem imagenet \
        --policies pow2 full "${RETRAIN_SIZES[@]}"
}

grid_r18() {
    throughput grid_r18 "$(left "$RESERVE")" "$ROW_S" \
        --models "$R18I" "$R18C" --members $MGRID --strategies $STRATS \
        --precisions fp32 bf16 --no-augment
}

resnet152() {
    throughput resnet152 "$(min "$R152_S" "$(left)")" "$R152_ROW_S" \
        --models --single-models "$R152C" "$R152I" --strategies vmap --torch
}

echo "== results: $DEST"
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tail -1
if [[ "${QUICK:-0}" != 1 ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
fi
for section in $SECTIONS; do
    "$section"
done
echo "== done in $(( SECONDS - START ))s; JSON files:"
ls -1 "$DEST"
