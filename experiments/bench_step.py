"""Step-time and memory benchmark of PROMA against plain accumulation.

One optimizer step = M microbatch calls of one jitted function per variant (loss, gradients,
statistics, transform update and apply_updates, all inside the jit). Variants:
  plain        REINFORCE loss, optax.MultiSteps accumulation (the baseline of every ratio)
  grpo         GRPO-clip loss, optax.MultiSteps
  proma_vmap   proma_accumulation, S_i of every leaf by jax.vmap(jax.grad(f_i))
  proma_mf     proma_accumulation, dense kernels matrix-free (DenseSequenceFactors), other leaves
               unprojected (scope="dense")
  proma_mat    proma_accumulation, dense kernels' S_i materialised from the captured factors by one
               batched matmul (dense_path="materialise", scope="dense")
  intra        proma_intra (rank 10) on the captured factors
  both         proma_both: intra + matrix-free accumulation (scope="dense")
  both_mat     proma_both: intra + accumulation on materialised S_i (scope="dense")
Every factor-based variant (proma_mf, proma_mat, intra, both, both_mat) runs ONE forward and ONE
backward pass (`policy_gradient_and_dense_factors`); proma_mat and both_mat compute the kernel
gradient from the materialised S_i, so the backward's own A^T G matmul is dropped.
All variants run in one process, interleaved, after a warm-up step; time_s is the median over
repeats. Memory is the compiled microbatch executable's memory_analysis():
temp + argument + output bytes (CPU has no device memory_stats).

  .venv/bin/python experiments/bench_step.py            # full grid (~15-25 min on 2 CPU cores)
  .venv/bin/python experiments/bench_step.py --quick    # demo 4 x 128, 1 repeat, no proma_mat
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
import jax.numpy as jnp
import optax
from flax import nnx

import proma_jax
from proma_jax import losses
from proma_jax.models import decoder as model_lib

MODELS = {
    # A small demo-sized decoder.
    "demo": model_lib.ModelConfig(vocab_size=64, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
                                  head_dim=32, mlp_dim=384, max_len=1024),
    # Qwen3-0.6B layer shapes (hidden 1024, MLP 3072, 16 q / 8 kv heads of dim 128); vocab and depth
    # cut so that the whole grid runs on a 2-core, 24 GiB CPU box.
    "qwen3_stack": model_lib.ModelConfig(vocab_size=2048, d_model=1024, n_layers=1, n_heads=16,
                                         n_kv_heads=8, head_dim=128, mlp_dim=3072, max_len=1024),
}
VARIANTS = ("plain", "grpo", "proma_vmap", "proma_mf", "proma_mat", "intra", "both", "both_mat")


def make_batch(cfg, key, n_seq, seq_len):
  """Left-padded prompt (1/4 of the length) then a response of variable length, right-padded."""
  k_tok, k_len, k_adv, k_old = jax.random.split(key, 4)
  tokens = jax.random.randint(k_tok, (n_seq, seq_len), 0, cfg.vocab_size)
  pos = jnp.arange(seq_len)[None]
  prompt = seq_len // 4
  pad_left = jax.random.randint(k_len, (n_seq, 1), 0, prompt // 2)
  end = seq_len - jax.random.randint(jax.random.fold_in(k_len, 1), (n_seq, 1), 0, seq_len // 4)
  valid = (pos >= pad_left) & (pos < end)
  response = (pos[:, 1:] >= prompt) & valid[:, 1:]
  return {
      "tokens": tokens, "valid": valid, "response": response.astype(jnp.float32),
      "advantages": jax.random.normal(k_adv, (n_seq,)),
      "old_logp": -jnp.log(cfg.vocab_size) + 0.05 * jax.random.normal(k_old, (n_seq, seq_len - 1)),
  }


def build_step(variant, graphdef, abstract_state, num_tokens, num_microbatches,
               constrain_seq_grads=None):
  """(tx, microbatch_fn): microbatch_fn(params, opt_state, batch) -> (params, opt_state), pure dicts.

  `constrain_seq_grads` (FSDP benchmarks): applied to the per-sequence gradients before the
  transform, as `trainer.microbatch_update_fn` applies `mesh.constrain_sequence_gradients`."""
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5))
  if variant in ("plain", "grpo"):
    tx = optax.MultiSteps(inner, num_microbatches, use_grad_mean=False)
  elif variant in ("proma_vmap", "proma_mf", "proma_mat"):
    tx = proma_jax.proma_accumulation(inner, num_microbatches)
  elif variant == "intra":
    tx = proma_jax.proma_intra(inner, num_microbatches)
  else:  # both, both_mat
    tx = proma_jax.proma_both(inner, num_microbatches)
  policy_loss = losses.grpo_clip_loss if variant == "grpo" else losses.reinforce_loss

  def model_of(params):
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)

  def logp_of(m, batch):
    return model_lib.token_logprobs(m, batch["tokens"], batch["valid"])[0]

  def loss_fn(m, batch):
    return policy_loss(logp_of(m, batch), batch["old_logp"], batch["advantages"], batch["response"],
                       num_tokens)[0]

  def objectives(m, batch):  # f_i: -sum_i A_i f_i is the REINFORCE loss of `plain`
    return losses.sequence_ratio(logp_of(m, batch), batch["old_logp"], batch["response"],
                                 num_tokens)

  def microbatch(params, opt_state, batch):
    m = model_of(params)
    extra = {}
    if variant in ("plain", "grpo"):
      grads = nnx.to_pure_dict(nnx.grad(loss_fn)(m, batch))
    elif variant == "proma_vmap":
      one = lambda p, seq: objectives(model_of(p), jax.tree.map(lambda x: x[None], seq))[0]
      _, grads, extra["seq_grads"] = proma_jax.policy_gradient_and_sequence_gradients(
          one, params, batch, batch["advantages"])
    elif variant == "intra":
      _, grads, extra["factors"] = proma_jax.policy_gradient_and_dense_factors(
          objectives, m, batch, batch["advantages"])
    else:
      path = "materialise" if variant in ("proma_mat", "both_mat") else "matrix_free"
      _, grads, extra["seq_grads"], factors = proma_jax.policy_gradient_and_sequence_statistics(
          objectives, m, batch, batch["advantages"], scope="dense", dense_path=path)
      if variant.startswith("both"):
        extra["factors"] = factors
    if constrain_seq_grads is not None and "seq_grads" in extra:
      extra["seq_grads"] = constrain_seq_grads(extra["seq_grads"])
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state

  return tx, microbatch


def bench_config(model_name, n_seq, seq_len, num_microbatches, repeats, variants):
  cfg = MODELS[model_name]
  graphdef, abstract_state = nnx.split(model_lib.make_model(cfg, seed=0))
  params = nnx.to_pure_dict(abstract_state)
  keys = jax.random.split(jax.random.PRNGKey(1), num_microbatches)
  batches = [make_batch(cfg, k, n_seq, seq_len) for k in keys]
  num_tokens = float(sum(b["response"].sum() for b in batches))

  runs = {}
  for variant in variants:
    tx, microbatch = build_step(variant, graphdef, abstract_state, num_tokens, num_microbatches)
    opt_state = tx.init(params)
    t0 = time.perf_counter()
    compiled = jax.jit(microbatch).lower(params, opt_state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    runs[variant] = dict(fn=compiled, opt_state=opt_state, compile_s=compile_s, peak=peak, times=[])

  def one_step(run):
    p, st = params, run["opt_state"]
    t0 = time.perf_counter()
    for b in batches:
      p, st = run["fn"](p, st, b)
    jax.block_until_ready((p, st))
    return time.perf_counter() - t0

  for run in runs.values():  # warm-up
    one_step(run)
  for _ in range(repeats):  # interleaved
    for run in runs.values():
      run["times"].append(one_step(run))

  records = []
  base_t = statistics.median(runs["plain"]["times"])
  base_m = runs["plain"]["peak"]
  for variant, run in runs.items():
    t = statistics.median(run["times"])
    records.append(dict(model=model_name, variant=variant, seqs_per_microbatch=n_seq,
                        seq_len=seq_len, num_microbatches=num_microbatches, time_s=t,
                        time_ratio=t / base_t, peak_mem_bytes=int(run["peak"]),
                        mem_ratio=run["peak"] / base_m, compile_s=run["compile_s"],
                        repeats=repeats))
  return records


def print_table(records):
  print(f"{'model':12s} {'seqs':>4s} {'len':>4s} {'variant':10s} {'time_s':>8s} {'x plain':>7s} "
        f"{'peak_MiB':>9s} {'mem x':>6s} {'compile_s':>9s}", flush=True)
  for r in records:
    print(f"{r['model']:12s} {r['seqs_per_microbatch']:4d} {r['seq_len']:4d} {r['variant']:10s} "
          f"{r['time_s']:8.3f} {r['time_ratio']:7.2f} {r['peak_mem_bytes'] / 2**20:9.1f} "
          f"{r['mem_ratio']:6.2f} {r['compile_s']:9.1f}", flush=True)


def markdown_tables(records):
  """The time and memory ratio tables of experiments/README.md, one row per (model, seqs x len)."""
  cells = {}
  for r in records:
    cells.setdefault((r["model"], r["seqs_per_microbatch"], r["seq_len"]), {})[r["variant"]] = r
  variants = [v for v in VARIANTS if any(v in c for c in cells.values())]
  lines = []
  for title, base_key, base_fmt, key in (("Time, x plain", "time_s", "plain s", "time_ratio"),
                                         ("Peak memory, x plain", "peak_mem_bytes", "plain MiB",
                                          "mem_ratio")):
    lines += ["", f"{title}:", "", "| model | seqs x len | " + base_fmt + " | " +
              " | ".join(v for v in variants if v != "plain") + " |",
              "| --- | --- | --- | " + " | ".join("---" for v in variants if v != "plain") + " |"]
    for (model, n_seq, seq_len), c in cells.items():
      base = c["plain"][base_key]
      base = f"{base:.3f}" if base_key == "time_s" else f"{base / 2**20:.0f}"
      ratios = " | ".join(f"{c[v][key]:.2f}x" if v in c else "-" for v in variants if v != "plain")
      lines.append(f"| {model} | {n_seq} x {seq_len} | {base} | {ratios} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="a subset that runs in under 2 minutes")
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  parser.add_argument("--seqs", nargs="+", type=int, default=[4, 8, 16])
  parser.add_argument("--lens", nargs="+", type=int, default=[128, 512])
  parser.add_argument("--microbatches", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--out", help="results JSON (default results/bench_step.json; with --quick "
                      "runs/bench_step_quick.json, so a quick run never overwrites the committed grid)")
  parser.add_argument("--tables", metavar="JSON", help="print the markdown tables of a results file")
  args = parser.parse_args()
  if args.tables:
    with open(args.tables) as f:
      print(markdown_tables(json.load(f)["records"]))
    return
  if "plain" not in args.variants:
    args.variants = ["plain"] + args.variants
  grid = [(m, n, t) for m in args.models for t in args.lens for n in args.seqs]
  if args.quick:
    grid, args.repeats = [("demo", 4, 128)], 1
    args.variants = [v for v in args.variants if v != "proma_mat"]
  if args.out is None:
    args.out = "runs/bench_step_quick.json" if args.quick else "results/bench_step.json"

  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  meta = dict(machine=f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU",
              backend=jax.default_backend(), jax=jax.__version__,
              memory="compiled microbatch executable memory_analysis(): temp+argument+output bytes",
              command=" ".join(["experiments/bench_step.py"] + sys.argv[1:]))
  records = []
  for idx, (model_name, n_seq, seq_len) in enumerate(grid):
    t0 = time.perf_counter()
    new = bench_config(model_name, n_seq, seq_len, args.microbatches, args.repeats, args.variants)
    print(f"# [{idx + 1}/{len(grid)}] {model_name} seqs={n_seq} len={seq_len}: "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    print_table(new)
    records += new
    with open(args.out, "w") as f:  # after every configuration: an interrupted run keeps its cells
      json.dump(dict(meta=meta, records=records, complete=idx + 1 == len(grid)), f, indent=1)
  print("\nall configurations:")
  print_table(records)
  print(markdown_tables(records))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
