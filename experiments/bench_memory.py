"""Compiled memory of one microbatch step against depth: PROMA's extra memory over plain accumulation.

For each depth (number of Qwen3-0.6B-shaped layers) and variant, the jitted microbatch step of
`experiments/bench_step.py` (loss, gradients, statistics, transform update, apply_updates) is
compiled with params and optimizer state donated, as the training loop runs it, and its
`memory_analysis()` is read: peak = temp + arguments + outputs - aliased (donated) bytes. Nothing
runs, so depths that would not fit in this machine's memory can be measured too.

The extra memory of a PROMA variant is its peak minus plain's (`optax.MultiSteps` around the same
AdamW). Both hold one float32 parameter-sized accumulator, so what grows with depth beyond plain is
what the transform adds: statistics, and any copies the compiler makes.

  .venv/bin/python experiments/bench_memory.py                      # depths 1 2 4 8, 8 x 128 tokens
  .venv/bin/python experiments/bench_memory.py --depths 1 2 --out runs/bench_memory_quick.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

import jax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step  # noqa: E402  (the same step functions as the step-time benchmark)
from proma_jax.models import decoder as model_lib, presets  # noqa: E402

VARIANTS = ("plain", "proma_mat", "intra", "both_mat")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _memory(compiled, compile_s: float) -> dict:
  """Peak bytes of a compiled step whose donated inputs alias its outputs."""
  mem = compiled.memory_analysis()
  peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
          - mem.alias_size_in_bytes)
  return dict(peak_bytes=int(peak), temp_bytes=int(mem.temp_size_in_bytes),
              argument_bytes=int(mem.argument_size_in_bytes),
              alias_bytes=int(mem.alias_size_in_bytes), compile_s=compile_s)


def compiled_peak(variant, cfg, n_seq, seq_len, num_microbatches):
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: model_lib.make_model(cfg, seed=0)))
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        nnx.to_pure_dict(abstract_state))
  batch = jax.eval_shape(lambda: bench_step.make_batch(cfg, jax.random.PRNGKey(0), n_seq, seq_len))
  tx, microbatch = bench_step.build_step(variant, graphdef, abstract_state, 1000.0, num_microbatches)
  opt_state = jax.eval_shape(tx.init, params)
  t0 = time.perf_counter()
  compiled = jax.jit(microbatch, donate_argnums=(0, 1)).lower(params, opt_state, batch).compile()
  return _memory(compiled, time.perf_counter() - t0)


# --step train: the training loop's algorithms. Its `proma` takes every S_i by jax.vmap (not the
# materialised capture of bench_step's proma_mat); the row keeps the name for the table.
TRAIN_VARIANTS = {"plain": "reinforce", "proma_mat": "proma", "intra": "proma_intra",
                  "both_mat": "proma_both"}


def compiled_peak_train(variant, cfg, n_seq, seq_len, num_microbatches, fused=True,
                        scan_layers=True):
  """The training loop's own jitted microbatch update (`trainer.make_microbatch_update`, which
  donates params and opt_state) on the reverse task's policy with Qwen3-shaped layers, compiled
  for sequences of `seq_len` tokens. Its plain baseline is `microbatch_accumulation`."""
  from proma_jax import policy as policy_lib, tasks, trainer as trainer_lib
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import reverse  # noqa: E402
  c = reverse.get_config(TRAIN_VARIANTS[variant])
  c.model.update(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                 n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, mlp_dim=cfg.mlp_dim,
                 scan_layers=scan_layers, remat=cfg.remat)
  c.rollout.update(prompts_per_step=n_seq * num_microbatches // 2, group_size=2)
  c.train.update(num_minibatches=1, num_microbatches=num_microbatches)
  c.proma.scope = "dense"
  c.proma.fused = fused
  task = tasks.get_task(c.task, **c.task_kwargs.to_dict())
  c.rollout.extra_new_tokens = seq_len - task.prompt_width - task.answer_width
  policy, params = policy_lib.make_policy(c)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  trainer = trainer_lib.Trainer(c, policy, params)
  opt_state = jax.eval_shape(trainer.tx.init, params)
  length = policy.max_new_tokens
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jax.numpy.float32)
  mb = {"tokens": jax.ShapeDtypeStruct((n_seq, policy.prompt_width + length), jax.numpy.int32),
        "valid": f32(n_seq, policy.prompt_width + length), "mask": f32(n_seq, length),
        "old_logp": f32(n_seq, length), "advantages": f32(n_seq)}
  t0 = time.perf_counter()
  compiled = trainer.microbatch_update.lower(params, opt_state, mb, f32()).compile()
  return _memory(compiled, time.perf_counter() - t0)


def markdown(records):
  depths = sorted({r["depth"] for r in records})
  variants = [v for v in VARIANTS if v != "plain" and any(r["variant"] == v for r in records)]
  by = {(r["depth"], r["variant"]): r for r in records}
  lines = ["| depth | plain peak MiB | " + " | ".join(f"{v} extra MiB" for v in variants) + " |",
           "| --- | --- | " + " | ".join("---" for _ in variants) + " |"]
  for d in depths:
    base = by[(d, "plain")]["peak_bytes"]
    cells = [f"{(by[(d, v)]['peak_bytes'] - base) / 2**20:.0f}" if (d, v) in by else "-"
             for v in variants]
    lines.append(f"| {d} | {base / 2**20:.0f} | " + " | ".join(cells) + " |")
  if len(depths) > 1:
    lo, hi = depths[0], depths[-1]
    slopes = [f"{((by[(hi, v)]['peak_bytes'] - by[(hi, 'plain')]['peak_bytes']) - (by[(lo, v)]['peak_bytes'] - by[(lo, 'plain')]['peak_bytes'])) / 2**20 / (hi - lo):.1f}"
              for v in variants]
    lines.append(f"| extra per layer | | " + " | ".join(slopes) + " |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--depths", nargs="+", type=int, default=[1, 2, 4, 8])
  parser.add_argument("--seqs", type=int, default=8)
  parser.add_argument("--len", type=int, default=128)
  parser.add_argument("--microbatches", type=int, default=4)
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--step", choices=("bench", "train"), default="bench",
                      help="bench: experiments/bench_step.py's step (MultiSteps baseline); train: "
                      "the training loop's own microbatch update (reverse task, Qwen3 layers)")
  parser.add_argument("--preset", choices=sorted(presets.PRESETS),
                      help="a checkpoint's full shape (vocabulary included) instead of "
                      "bench_step's qwen3_stack (Qwen3-0.6B layers, vocabulary 2048)")
  parser.add_argument("--dtype", default="float32", help="compute dtype")
  parser.add_argument("--param_dtype", default="float32", help="parameter storage dtype")
  parser.add_argument("--remat", action="store_true", help="rematerialise every decoder block")
  parser.add_argument("--logits_chunk", type=int, default=0,
                      help="token positions per log-softmax chunk (0: the whole (B, T, V))")
  parser.add_argument("--attention_impl", default=None, choices=(None, "xla", "cudnn"))
  parser.add_argument("--unfused", action="store_true",
                      help="--step train: the PROMA variants with proma.fused=False (statistics "
                      "handed to the transform after the backward pass)")
  parser.add_argument("--scan_layers", type=int, choices=(0, 1), default=1,
                      help="--step train: the layers stacked and scanned (1, the default) or a "
                           "list of separate layers (0)")
  parser.add_argument("--out", default="results/bench_memory.json")
  parser.add_argument("--tables", metavar="JSON", help="print the markdown table of a results file")
  args = parser.parse_args()
  if args.tables:
    with open(args.tables) as f:
      print(markdown(json.load(f)["records"]))
    return
  variants = ["plain"] + [v for v in args.variants if v != "plain"]
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU" if jax.default_backend()
             == "cpu" else f"{jax.devices()[0].device_kind} ({jax.default_backend()})")
  meta = dict(machine=machine,
              jax=jax.__version__, commit=commit, seqs=args.seqs, len=args.len,
              microbatches=args.microbatches, step=args.step, preset=args.preset,
              dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat,
              logits_chunk=args.logits_chunk, attention_impl=args.attention_impl,
              fused=None if args.step == "bench" else not args.unfused,
              scan_layers=None if args.step == "bench" else bool(args.scan_layers),
              backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
              memory="compiled microbatch step (params, opt_state donated): temp + arguments + "
                     "outputs - aliased bytes",
              command=" ".join(["experiments/bench_memory.py"] + sys.argv[1:]))
  records = []
  options = dict(dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat,
                 logits_chunk=args.logits_chunk, attention_impl=args.attention_impl)
  if args.preset:
    base_cfg = presets.preset(args.preset, **options)
  else:
    base_cfg = dataclasses.replace(bench_step.MODELS["qwen3_stack"], **options)
  for depth in args.depths:
    cfg = dataclasses.replace(base_cfg, n_layers=depth)
    for variant in variants:
      if args.step == "bench":
        measured = compiled_peak(variant, cfg, args.seqs, args.len, args.microbatches)
      else:
        measured = compiled_peak_train(variant, cfg, args.seqs, args.len, args.microbatches,
                                       fused=not args.unfused,
                                       scan_layers=bool(args.scan_layers))
      r = dict(depth=depth, variant=variant, **measured)
      records.append(r)
      print(f"depth {depth} {variant:10s} peak {r['peak_bytes'] / 2**20:8.1f} MiB  temp "
            f"{r['temp_bytes'] / 2**20:8.1f} MiB  compile {r['compile_s']:.0f} s", flush=True)
      os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
      with open(args.out, "w") as f:
        json.dump(dict(meta=meta, records=records), f, indent=1)
  print(markdown(records))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
