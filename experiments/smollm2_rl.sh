#!/usr/bin/env bash
# The real-model CPU run: SmolLM2-135M-Instruct on word arithmetic (configs/smollm2_arith.py),
# REINFORCE, GRPO, PROMA and intra with the same seed and budget, one after another.
# Resumable: rerunning continues each run from its last checkpoint (runs/ is not committed);
# each finished run's metrics.jsonl and run.json are copied to results/smollm2_arith/.
#   nohup bash experiments/smollm2_rl.sh > runs/smollm2_rl.log 2>&1 &
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-15}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-runs/jax_cache}
mkdir -p results/smollm2_arith
for alg in ${ALGORITHMS:-reinforce grpo proma proma_intra}; do
  workdir=runs/smollm2_arith/$alg
  echo "=== $alg $(date -u +%FT%TZ)"
  $PY -m proma_jax.train --config=configs/smollm2_arith.py:$alg --workdir=$workdir \
      --config.steps=$STEPS "$@" || echo "=== $alg exited with $?"
  cp "$workdir/metrics.jsonl" "results/smollm2_arith/$alg.metrics.jsonl" 2>/dev/null
  cp "$workdir/run.json" "results/smollm2_arith/$alg.run.json" 2>/dev/null
done
echo "=== done $(date -u +%FT%TZ)"
