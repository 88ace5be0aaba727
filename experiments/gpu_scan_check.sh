#!/usr/bin/env bash
# On one GPU (the `device` tool), inside 9 minutes: the scanned optimizer step against
# one compiled call per microbatch, on the GPU, at two scales, each pair in one process or back to
# back on the same warm machine:
#   1. the sweep's CPU-scale decoder at the paper's batch shape (512 sequences = 2 x 32 x 8),
#      reinforce and proma (experiments/bench_rl_step.py; needs the reverse warm start carried in
#      checkpoints/warm_start);
#   2. one RL step of proma on random-weight Qwen3-0.6B shapes at 8 layers (64 sequences, 2
#      minibatches of 4 microbatches of 8, ~480 + 1024 tokens; experiments/gpu_check.py), scan 0/1.
# Results: $OUT/gpu_scan_check.jsonl.
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-results}
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_extra .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site_extra
timeout 240 python3 experiments/bench_rl_step.py --algorithms reinforce,proma --repeats 3 \
    --out $OUT/gpu_scan_check.jsonl || echo "bench_rl_step: exit $?"
for scan in 1 0; do
  timeout 130 python3 experiments/gpu_check.py --mode step --algorithm proma --layers 8 \
      --scan $scan --out $OUT/gpu_scan_check.jsonl || echo "gpu_check scan=$scan: exit $?"
done
