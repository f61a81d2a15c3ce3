#!/usr/bin/env bash
# The GPU checks in one call, from the repository root on a GPU machine whose python3 has jax with
# CUDA, torch and transformers: the attention tests (cuDNN against the reference, for real) and
# the train-step benchmark against PyTorch. Packages that machine lacks travel as wheels in .whl/
# (e.g. `pip download --no-deps -d .whl ml_collections tensorboardX einops`), installed here first.
# Results go to $OUT (or ./gpu_out).
set -uo pipefail
out="${OUT:-gpu_out}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -m pytest tests/test_attention.py -q -p no:cacheprovider 2>&1 | tee "$out/attention_tests.log"
timeout 420 python3 -m scripts.bench_train_gpu --json="$out/bench_train_gpu.json" 2>&1 \
  | tee "$out/bench_train_gpu.log"
