#!/usr/bin/env bash
# The fixed GPU check, sized for one NVIDIA H200: under 9 minutes in all, because every case runs
# in its own process under its own timeout (the timeouts below sum to 530 s).
#   1. DenseNet-121, 224x224, batch 256, bf16: JAX plain and memory-efficient (the shared-buffer
#      dense blocks, the default) fed uint8 batches with the device's ImageNet augmentation (as
#      train.py); torchvision's densenet121 eager with AMP (bf16) + channels_last, plain and
#      memory_efficient, and torch.compile plain if it is done in time
#   2. DenseNet-BC-190 (k=40), batch 64, float32: plain and memory-efficient, JAX and torch eager
#      (peak memory)
#   3. DenseNet-BC-100 (k=12), batch 64, bf16: images/s and the paper's 300-epoch C10+ time
#   4. tests/test_convert.py (torchvision weights give torchvision's logits), if present
# Prints the Markdown table and the JAX/torch ratios; writes gpu_check.json (and gpu_check.md)
# to $OUT if set. Usage: bash experiments/gpu_check.sh   (PYTHON=... picks the interpreter)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
BENCH=("$PY" experiments/benchmark.py --steps 10 --warmup 3)

run() {  # run NAME TIMEOUT_S ARGS...: one benchmark case group
  local name=$1 timeout=$2
  shift 2
  echo "== $name (timeout ${timeout} s per case)" >&2
  "${BENCH[@]}" --timeout "$timeout" --json "$WORK/$name.json" "$@" > /dev/null
}

run d121_jax 60 --model densenet121 --batch-size 256 --dtypes bfloat16 \
  --modes plain,memory_efficient --inputs uint8
run d121_torch_eager 35 --model densenet121 --batch-size 256 --dtypes bfloat16 \
  --modes plain,memory_efficient --torch-only --torch-runtimes eager
run d121_torch_compile 60 --model densenet121 --batch-size 256 --dtypes bfloat16 --modes plain \
  --torch-only --torch-runtimes compile
run bc190 75 --model densenet_bc190_k40 --batch-size 64 --dtypes float32 \
  --modes plain,memory_efficient
run bc190_torch 40 --model densenet_bc190_k40 --batch-size 64 --dtypes float32 \
  --modes plain,memory_efficient --torch-only --torch-runtimes eager
run bc100 50 --model densenet_bc100_k12 --batch-size 64 --dtypes bfloat16 --modes plain

"$PY" experiments/benchmark.py --report "$WORK"/*.json --json "$WORK/gpu_check.json" \
  | tee "$WORK/gpu_check.md"

if [ -f tests/test_convert.py ]; then
  echo "== tests/test_convert.py (float32 at highest matmul precision)" | tee -a "$WORK/gpu_check.md"
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout 30 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_convert.py 2>&1 | tail -n 5 | tee -a "$WORK/gpu_check.md"
fi

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT" && cp "$WORK/gpu_check.json" "$WORK/gpu_check.md" "$OUT"/
fi
