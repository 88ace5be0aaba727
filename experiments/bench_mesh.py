"""Data-parallel PROMA: time per optimizer step and bytes communicated, exact vs local, 1/2/4 devices.

  .venv/bin/python experiments/bench_mesh.py            # demo model, proma and proma_intra
  .venv/bin/python experiments/bench_mesh.py --quick    # tiny model, proma only

Forces 4 host CPU devices (XLA_FLAGS) before JAX starts. For each algorithm, number of devices D
and mode, it builds the training code's jitted microbatch update (`trainer.make_microbatch_update`
on a ("data",) mesh, exactly what `python -m proma_jax.train --config.mesh.data=D` runs) and times
one optimizer step = `num_microbatches` calls on a synthetic microbatch (median of the repeats
after a warm-up step). D=1 is the single-device path (no mesh), the baseline of both modes.

Bytes: every collective instruction (all-reduce, all-gather, reduce-scatter, all-to-all,
collective-permute) of the compiled, partitioned HLO, with the size of its result, summed and
multiplied by the calls per step. That is the payload each device contributes or receives per
collective, not the wire traffic of a particular algorithm (a ring all-reduce of B bytes sends
about 2 (D-1)/D B per device); each instruction is counted once, as it runs once per call here
(none sits inside a loop).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

NUM_DEVICES = 4
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={NUM_DEVICES}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from proma_jax import mesh as mesh_lib  # noqa: E402
from proma_jax import policy as policy_lib  # noqa: E402
from proma_jax import trainer as trainer_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import reverse  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_INSTRUCTION = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """{collective kind: summed result bytes} over the instructions of an optimized HLO module."""
  totals = {kind: 0 for kind in COLLECTIVES}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.search(line)
    if not match:
      continue
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
      size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
      totals[match.group(2)] += size * _DTYPE_BYTES[dtype]
  return totals


def bench_config(algorithm: str, quick: bool, microbatch: int, num_microbatches: int):
  c = reverse.get_config(algorithm)
  if quick:
    c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64)
  c.rollout.update(prompts_per_step=microbatch * num_microbatches // 2, group_size=2)
  c.train.update(num_minibatches=1, num_microbatches=num_microbatches)
  return c


def synthetic_microbatches(policy, params, num_microbatches: int, microbatch: int, seed: int = 0):
  """Microbatches shaped like the trainer's: a prompt, a random response of random length."""
  rng = np.random.default_rng(seed)
  width, length = policy.prompt_width, policy.max_new_tokens
  n = num_microbatches * microbatch
  tokens = rng.integers(3, policy.tokenizer.vocab_size, size=(n, width + length)).astype(np.int32)
  lengths = rng.integers(1, length + 1, size=n)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float32)
  valid = np.concatenate([np.ones((n, width), np.float32), mask], axis=1)
  old_logp, _ = jax.jit(lambda p, t, v: policy_lib.response_logprobs(policy, policy_lib.bind(policy, p), t, v))(
      params, tokens, valid)
  batch = {"tokens": tokens, "valid": valid, "mask": mask, "old_logp": np.asarray(old_logp) * mask,
           "advantages": rng.standard_normal(n).astype(np.float32)}
  num_tokens = jnp.asarray(mask.sum(), jnp.float32)
  return [{k: v[j * microbatch:(j + 1) * microbatch] for k, v in batch.items()}
          for j in range(num_microbatches)], num_tokens


def run_one(algorithm: str, devices: int, mode: str, args) -> dict:
  c = bench_config(algorithm, args.quick, args.microbatch, args.num_microbatches)
  c.mesh.update(data=devices, mode=mode)
  policy, params = policy_lib.make_policy(c)
  trainer = trainer_lib.Trainer(c, policy, params)
  params = trainer.fresh_params()
  opt_state = trainer.init_opt_state(params, c.optim.lr)
  microbatches, num_tokens = synthetic_microbatches(policy, params, args.num_microbatches,
                                                    args.microbatch)
  microbatches = [trainer.shard(mb) for mb in microbatches]
  num_tokens = trainer.place(num_tokens)

  t0 = time.perf_counter()
  compiled = trainer.microbatch_update.lower(params, opt_state, microbatches[0], num_tokens).compile()
  compile_s = time.perf_counter() - t0
  per_call = collective_bytes(compiled.as_text())

  def step(params, opt_state):
    for mb in microbatches:
      params, opt_state, _ = trainer.microbatch_update(params, opt_state, mb, num_tokens)
    return jax.block_until_ready((params, opt_state))

  params, opt_state = step(params, opt_state)  # warm-up (and the jit's own compilation)
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    params, opt_state = step(params, opt_state)
    times.append(time.perf_counter() - t0)
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  return {"algorithm": algorithm, "devices": devices, "mode": mode if devices > 1 else "-",
          "step_s": float(np.median(times)), "step_s_all": times, "compile_s": compile_s,
          "bytes_per_step": args.num_microbatches * sum(per_call.values()),
          "bytes_per_step_by_kind": {k: args.num_microbatches * v for k, v in per_call.items() if v},
          "param_bytes": int(param_bytes), "microbatch": args.microbatch,
          "num_microbatches": args.num_microbatches, "tokens_per_sequence":
          int(microbatches[0]["tokens"].shape[1])}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny model, proma only")
  parser.add_argument("--algorithms", nargs="+", default=None)
  parser.add_argument("--devices", nargs="+", type=int, default=[1, 2, 4])
  parser.add_argument("--microbatch", type=int, default=16, help="sequences per microbatch")
  parser.add_argument("--num_microbatches", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=os.path.join(REPO, "results", "bench_mesh.json"))
  args = parser.parse_args()
  algorithms = args.algorithms or (["proma"] if args.quick else ["proma", "proma_intra"])
  rows = []
  for algorithm in algorithms:
    for devices in args.devices:
      for mode in (("exact",) if devices == 1 else mesh_lib.MODES):
        row = run_one(algorithm, devices, mode, args)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "step_s_all"}), flush=True)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"machine": f"{os.cpu_count()} CPU cores, JAX {jax.__version__} CPU backend, "
                          f"{NUM_DEVICES} forced host devices", "rows": rows}, f, indent=1)
  print("\n| algorithm | devices | mode | step_s | x 1 device | KiB / step | by kind (KiB) |")
  print("|---|---:|---|---:|---:|---:|---|")
  base = {}
  for row in rows:
    key = row["algorithm"]
    base.setdefault(key, row["step_s"])
    kinds = ", ".join(f"{k} {v / 1024:.1f}" for k, v in row["bytes_per_step_by_kind"].items())
    print(f"| {row['algorithm']} | {row['devices']} | {row['mode']} | {row['step_s']:.3f} | "
          f"{row['step_s'] / base[key]:.2f} | {row['bytes_per_step'] / 1024:.1f} | {kinds or '-'} |")


if __name__ == "__main__":
  main()
