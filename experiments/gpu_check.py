"""One RL step of an algorithm, its microbatch update alone, and the sampler's speed, on
random-weight Qwen3 shapes.

Runs the training loop's own code (`trainer.Trainer.step`: chunked sampling with the KV cache and
`lax.while_loop`, log-prob passes, microbatch updates through the PROMA transforms) on a decoder
of the `qwen3-0.6b` preset's widths and vocabulary with random weights, all-bf16, remat, chunked
log-softmax. Prompts are word-arithmetic questions padded with a repeated instruction to about
`--prompt_tokens` tokens (the tokenizer is the tiny test fixture's, whose ids fit the vocabulary);
random weights almost never emit EOS, so every response runs to `--new_tokens`; the reward is a
hash of the response text mod 2, so advantages (and gradients) are not zero. Prints and writes
(`--out`, JSON lines) the time split of the step and the device's peak memory
(`device.memory_stats()`), which covers the whole process: run one algorithm per process.

  python3 experiments/gpu_check.py --mode sample --out $OUT/check.jsonl
  python3 experiments/gpu_check.py --mode update --algorithm proma --fused 1 --out $OUT/check.jsonl
  python3 experiments/gpu_check.py --mode step --algorithm proma --layers 8 --out $OUT/check.jsonl
  .venv/bin/python experiments/gpu_check.py --mode step --algorithm proma --layers 1 \\
      --vocab_size 512 --prompt_tokens 40 --new_tokens 16 --prompts 2 --group 4  # CPU smoke test

--mode update compiles and runs the training loop's own microbatch update
(`Trainer.microbatch_update`: loss, gradients, PROMA statistics, transform, apply; params and
optimizer state donated) on random microbatches of `--seqs` sequences of `--prompt_tokens` +
`--new_tokens` tokens, `--repeats` times after the first (compiling) call: the update's time per
microbatch, its compile time and the process's device peak, `--fused` 1 or 0 (`proma.fused`).
reinforce is plain accumulation's update.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from proma_jax import policy as policy_lib  # noqa: E402
from proma_jax import sampling, tasks, trainer as trainer_lib  # noqa: E402
from proma_jax.config import ALGORITHMS, base_config  # noqa: E402
from proma_jax.models import decoder, presets  # noqa: E402
from proma_jax.models.tokenizer import from_hf_dir  # noqa: E402
from records import write_record  # noqa: E402

FIXTURE_TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf",
                                 "tiny_qwen3")


def _config(args) -> "ml_collections.ConfigDict":
  c = base_config("word_arith", args.algorithm)
  # Config validation reads this header; the policy itself is built by `_policy` (random weights).
  c.model.checkpoint = FIXTURE_TOKENIZER
  c.rollout.prompts_per_step, c.rollout.group_size = args.prompts, args.group
  c.rollout.max_new_tokens, c.rollout.bucket = args.new_tokens, args.bucket
  c.rollout.max_prompt_tokens, c.rollout.sample_batch = args.prompt_tokens + args.bucket, 0
  c.model.max_len = c.rollout.max_prompt_tokens + args.new_tokens  # the fixture header has 128
  c.train.num_minibatches, c.train.num_microbatches = args.minibatches, args.microbatches
  c.train.scan_microbatches = bool(args.scan)
  c.optim.lr, c.eval.num_examples = 1e-6, 8
  c.proma.relative_bound = 0.5 if args.algorithm.startswith("proma") else None
  c.proma.fused = bool(args.fused)
  if args.mode == "update":  # one minibatch of one microbatch of --seqs sequences
    c.rollout.group_size = 2
    c.rollout.prompts_per_step = args.seqs * args.microbatches // 2
    c.train.num_minibatches, c.train.scan_microbatches = 1, False
  return c


def _policy(args, c):
  depth = {"n_layers": args.layers} if args.layers else {}
  if args.vocab_size:
    depth["vocab_size"] = args.vocab_size
  cfg = presets.preset(args.preset, dtype=args.dtype, param_dtype=args.dtype, remat=True,
                       logits_chunk=args.logits_chunk, **depth)
  tokenizer = from_hf_dir(FIXTURE_TOKENIZER)
  # A long instruction brings the prompt to about --prompt_tokens tokens.
  per_repeat = len(tokenizer.encode("Answer with just the number. "))
  repeats = max(1, (args.prompt_tokens - 40) // per_repeat)
  task = dataclasses.replace(
      tasks.word_arith_task(train_digits=(1, 2), val_digits=(1, 2),
                            instruction="Answer with just the number. " * repeats),
      reward_fn=lambda text, terminated, answer: float(zlib.crc32(text.encode()) % 2))
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(decoder.make_model(cfg, seed=0))))()
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: decoder.make_model(cfg, seed=0)))
  policy = policy_lib.Policy(task, tokenizer, cfg, graphdef, None, args.new_tokens,
                             bucket=args.bucket, max_prompt_tokens=c.rollout.max_prompt_tokens,
                             chat_template=True, sample_batch=0, top_p=1.0)
  return policy, params


def _peak_gib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def check_sampler(args, c, policy, params) -> dict:
  examples = policy.task.train_examples(args.prompts * args.group, seed=0)
  prompts, valid = policy_lib.encode(policy, examples)
  run = lambda key: sampling.sample(  # noqa: E731
      policy.graphdef, params, jnp.asarray(prompts), jnp.asarray(valid), key,
      max_new_tokens=args.new_tokens, eos_id=policy.tokenizer.eos_id,
      pad_id=policy.tokenizer.pad_id)
  t0 = time.perf_counter()
  jax.block_until_ready(run(jax.random.PRNGKey(0)))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  rollout = jax.block_until_ready(run(jax.random.PRNGKey(1)))
  seconds = time.perf_counter() - t0
  generated = float(jnp.sum(rollout.response_mask_BxL))
  return dict(mode="sample", batch=len(examples), prompt_width=int(prompts.shape[1]),
              new_tokens=args.new_tokens, generated_tokens=generated, seconds=seconds,
              tokens_per_s=generated / seconds, first_call_s=compile_s)


def check_step(args, c, policy, params) -> dict:
  trainer = trainer_lib.Trainer(c, policy, params)
  state = trainer.fresh_params()
  opt_state = trainer.init_opt_state(state, c.optim.lr)
  t0 = time.perf_counter()
  state, opt_state, first = trainer.step(state, opt_state, 0, seed=0)  # compiles everything
  first_s = time.perf_counter() - t0
  state, opt_state, metrics = trainer.step(state, opt_state, 1, seed=0)
  keep = ("time/sample_s", "time/logprob_s", "time/update_s", "time/step_s", "kl/step",
          "grad/norm", "response/length")
  return dict(mode="step", algorithm=args.algorithm, scan=bool(args.scan),
              sequences=args.prompts * args.group,
              microbatch=args.prompts * args.group // (args.minibatches * args.microbatches),
              first_step_s=first_s, finite=bool(np.isfinite(metrics["kl/step"])),
              **{k: metrics[k] for k in keep if k in metrics})


def check_update(args, c, policy, params) -> dict:
  trainer = trainer_lib.Trainer(c, policy, params)
  state = trainer.fresh_params()
  opt_state = trainer.init_opt_state(state, c.optim.lr)
  rng = np.random.default_rng(0)
  n, width, length = args.seqs, args.prompt_tokens, args.new_tokens
  valid = np.ones((n, width + length), np.float32)
  for row, pad in enumerate(rng.integers(0, width // 4, n)):
    valid[row, :pad] = 0.0
  microbatch = trainer.shard({
      "tokens": rng.integers(1, policy.model_config.vocab_size, (n, width + length)).astype(np.int32),
      "valid": valid, "mask": np.ones((n, length), np.float32),
      "old_logp": rng.normal(-2.0, 0.5, (n, length)).astype(np.float32),
      "advantages": rng.normal(size=n).astype(np.float32)})
  num_tokens = np.float32(n * length * args.microbatches)
  t0 = time.perf_counter()
  state, opt_state, metrics = jax.block_until_ready(
      trainer.microbatch_update(state, opt_state, microbatch, num_tokens))
  first_s = time.perf_counter() - t0
  seconds = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    state, opt_state, metrics = jax.block_until_ready(
        trainer.microbatch_update(state, opt_state, microbatch, num_tokens))
    seconds.append(time.perf_counter() - t0)
  return dict(mode="update", algorithm=args.algorithm, fused=bool(args.fused), preset=args.preset,
              seqs=n, tokens=width + length, first_call_s=first_s,
              seconds_per_microbatch=float(np.median(seconds)), repeats=args.repeats,
              finite=bool(np.isfinite(float(metrics["loss"]))))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mode", choices=("sample", "step", "update"), default="step")
  parser.add_argument("--preset", choices=sorted(presets.PRESETS), default="qwen3-0.6b")
  parser.add_argument("--fused", type=int, default=1, choices=(0, 1), help="proma.fused")
  parser.add_argument("--seqs", type=int, default=8, help="--mode update: sequences per microbatch")
  parser.add_argument("--repeats", type=int, default=3, help="--mode update: timed calls")
  parser.add_argument("--algorithm", choices=ALGORITHMS, default="proma")
  parser.add_argument("--layers", type=int, default=0, help="0: the preset's 28")
  parser.add_argument("--vocab_size", type=int, default=0, help="0: the preset's 151936")
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--group", type=int, default=8)
  parser.add_argument("--minibatches", type=int, default=2)
  parser.add_argument("--microbatches", type=int, default=4)
  parser.add_argument("--scan", type=int, default=1, choices=(0, 1),
                      help="1: one compiled lax.scan per optimizer step; 0: a call per microbatch")
  parser.add_argument("--prompt_tokens", type=int, default=480)
  parser.add_argument("--new_tokens", type=int, default=1024)
  parser.add_argument("--bucket", type=int, default=64)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--logits_chunk", type=int, default=1024)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  c = _config(args)
  policy, params = _policy(args, c)
  check = {"sample": check_sampler, "step": check_step, "update": check_update}[args.mode]
  record = check(args, c, policy, params)
  record.update(layers=policy.model_config.n_layers, dtype=args.dtype,
                device=str(jax.devices()[0].device_kind), peak_gib=_peak_gib(),
                jax=jax.__version__, host=platform.node())
  write_record(record, args.out)


if __name__ == "__main__":
  main()
