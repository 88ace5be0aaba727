"""The microbatch step of a pretrained-size decoder: compiled memory, device peak and step time.

For a model preset (random weights of the checkpoint's shape; `--depth` cuts the layer count) and
each variant of `experiments/bench_step.py` (plain = `optax.MultiSteps` around AdamW; proma_mat,
intra, both_mat = PROMA statistics from ONE forward and backward pass), the jitted microbatch step
(loss, gradients, statistics, transform update, apply_updates; params and optimizer state
donated, as the training loop runs it) is compiled, its `memory_analysis()` read, then run
`--repeats` times on random left-padded sequences after one warm-up call. Reports the median time
per microbatch call and, where the backend has them (GPU), the device's peak bytes in use: run one
variant per process (`--variants X`) for a per-variant device peak.

  .venv/bin/python experiments/bench_llm_step.py --preset qwen3-0.6b --depth 1 --seqs 4 --len 512
  python3 experiments/bench_llm_step.py --preset qwen3-0.6b --seqs 8 --len 1536 --dtype bfloat16 \\
      --param_dtype bfloat16 --remat --logits_chunk 1024 --variants plain     # full depth, on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_memory  # noqa: E402
import bench_step  # noqa: E402
from proma_jax.models import decoder as model_lib, presets  # noqa: E402

VARIANTS = ("plain", "proma_mat", "intra", "both_mat")


def run_variant(variant, cfg, n_seq, seq_len, num_microbatches, repeats):
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: model_lib.make_model(cfg, seed=0)))
  init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(model_lib.make_model(cfg, seed=0))))
  params = init()
  batches = [bench_step.make_batch(cfg, jax.random.PRNGKey(i), n_seq, seq_len)
             for i in range(num_microbatches)]
  num_tokens = float(sum(b["response"].sum() for b in batches))
  tx, microbatch = bench_step.build_step(variant, graphdef, abstract_state, num_tokens,
                                         num_microbatches)
  opt_state = jax.jit(tx.init)(params)
  t0 = time.perf_counter()
  compiled = jax.jit(microbatch, donate_argnums=(0, 1)).lower(params, opt_state,
                                                              batches[0]).compile()
  record = bench_memory._memory(compiled, time.perf_counter() - t0)
  times = []
  for i in range(repeats + 1):
    t0 = time.perf_counter()
    params, opt_state = compiled(params, opt_state, batches[i % num_microbatches])
    jax.block_until_ready((params, opt_state))
    if i:  # the first call is a warm-up
      times.append(time.perf_counter() - t0)
  finite = all(bool(np.isfinite(np.asarray(x, np.float32)).all())
               for x in jax.tree.leaves(params)[:4])
  stats = jax.devices()[0].memory_stats() or {}
  return dict(variant=variant, time_s=statistics.median(times), times_s=times, finite=finite,
              device_peak_bytes=stats.get("peak_bytes_in_use"), **record)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="qwen3-0.6b", choices=sorted(presets.PRESETS))
  parser.add_argument("--depth", type=int, help="layers (default: the preset's own)")
  parser.add_argument("--vocab", type=int, help="vocabulary override (default: the preset's)")
  parser.add_argument("--seqs", type=int, default=8)
  parser.add_argument("--len", type=int, default=1536)
  parser.add_argument("--microbatches", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--param_dtype", default="bfloat16")
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--logits_chunk", type=int, default=1024)
  parser.add_argument("--attention_impl", default=None, choices=(None, "xla", "cudnn"))
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--out", help="append the records to this JSON-lines file")
  args = parser.parse_args()
  overrides = dict(dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat,
                   logits_chunk=args.logits_chunk, attention_impl=args.attention_impl)
  if args.depth:
    overrides["n_layers"] = args.depth
  if args.vocab:
    overrides["vocab_size"] = args.vocab
  cfg = presets.preset(args.preset, **overrides)
  device = (f"{platform.machine()} CPU, {os.cpu_count()} cores" if jax.default_backend() == "cpu"
            else f"{jax.devices()[0].device_kind}")
  meta = dict(vars(args), n_layers=cfg.n_layers, vocab_size=cfg.vocab_size, device=device,
              jax=jax.__version__)
  base = None
  for variant in args.variants:
    r = run_variant(variant, cfg, args.seqs, args.len, args.microbatches, args.repeats)
    base = base or (r if variant == "plain" else None)
    ratio = f" {r['time_s'] / base['time_s']:.2f}x plain" if base else ""
    peak = (f" device peak {r['device_peak_bytes'] / 2**30:.2f} GiB"
            if r["device_peak_bytes"] else "")
    print(f"{args.preset} L={cfg.n_layers} {args.seqs}x{args.len} {variant:10s} "
          f"time {r['time_s']:.3f} s{ratio}  compiled peak {r['peak_bytes'] / 2**30:.2f} GiB"
          f"{peak}  compile {r['compile_s']:.0f} s  finite {r['finite']}", flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(dict(meta=meta, **r)) + "\n")


if __name__ == "__main__":
  main()
