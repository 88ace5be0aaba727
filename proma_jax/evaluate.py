"""Score a policy on a task outside training: a base checkpoint, an export, or a run's checkpoint.

    python -m proma_jax.evaluate --config=configs/smollm2_arith.py:proma --out=evals/base
    python -m proma_jax.evaluate --config=configs/smollm2_arith.py:proma \\
        --workdir=runs/smollm2/proma [--step=N] --out=evals/proma
    python -m proma_jax.evaluate --config=configs/qwen3_gsm8k.py:proma \\
        --checkpoint=exports/qwen3 --num_examples=1319 --samples=8 --temperature=1.0 --out=evals/q

The prompts, chat template, sampler, buckets and reward are the config's, exactly as training
uses them: greedy decoding of `--num_examples` examples of `--split` (default: the config's
`eval.num_examples` of the val split, drawn with `eval.seed`) gives the training loop's
`val/accuracy` on the same parameters. The parameters are those of `--checkpoint` (a Hugging Face
directory, a .gguf file or hf:ORG/NAME; it replaces `model.checkpoint`), of the run in
`--workdir` (its latest checkpoint, or `--step`; the run's model must be the config's), or else
the config's own `model.checkpoint` (or its freshly initialised tiny decoder).

Writes OUT/summary.json (greedy accuracy, format rate, mean and maximum response length in
tokens, fraction clipped at max_new_tokens, response tokens per second of sampling, compilation
included; with --samples=K > 1 also pass@k for k = 1, 10, 100 below K and k = K, the unbiased
estimate from the K samples at --temperature of the chance that k samples hold a correct one
(reward >= 1; pass@K is the fraction of examples with a correct sample among the K), and mean@K,
the mean reward of those samples) and OUT/responses.jsonl (per example: prompt, greedy response,
extracted answer, gold answer, reward, format flag, length, and its K samples), and prints a
table. Sampling shows a progress bar with tokens/s; `--batch_size` sets the sequences per
sampling call (default: the config's `rollout.sample_batch`, 0 meaning all at once).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from absl import app, flags, logging
from ml_collections import config_flags

from proma_jax import cli, runs, sampling, tasks
from proma_jax import mesh as mesh_lib
from proma_jax import policy as policy_lib
from proma_jax import trainer as trainer_lib
from proma_jax.models import stacked
from proma_jax.config import validate_config

SPLITS = ("val", "train")
# pass@k reported besides pass@K when K samples exceed k: the customary HumanEval figures.
PASS_KS = (1, 10, 100)


class EvaluateError(ValueError):
  """Options that cannot be evaluated as given (both --checkpoint and --workdir, no examples, a
  non-positive temperature, ...)."""


def load_policy(c: ml_collections.ConfigDict, *, checkpoint: str | None = None,
                workdir: str | None = None, step: int | None = None,
                ) -> tuple[policy_lib.Policy, dict, str]:
  """(policy, params, what the params are) for `c` (see the module docstring)."""
  if checkpoint is not None and workdir is not None:
    raise EvaluateError("give --checkpoint or --workdir, not both")
  c = ml_collections.ConfigDict(c.to_dict())
  if checkpoint is not None:
    c.model.checkpoint = checkpoint
  validate_config(c)
  policy, params = policy_lib.make_policy(c)
  source = c.model.checkpoint or "the config's freshly initialised tiny decoder"
  if workdir is None:
    return policy, params, source
  trained = runs.read_config(workdir).model.get("checkpoint")
  if (trained or None) != (c.model.checkpoint or None):
    raise runs.RunError(f"{workdir}: the run trained model.checkpoint={trained!r} but the config "
                        f"names {c.model.checkpoint!r}; pass --config.model.checkpoint={trained}")
  step, run_params = runs.read_params(workdir, step)
  convert = stacked.stack_layers if stacked.is_stacked(params) else stacked.unstack_layers
  run_params = convert(run_params) if "layers" in run_params else run_params
  expected = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), params)
  found = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), run_params)
  if expected != found:
    raise runs.RunError(f"{workdir}: the checkpoint's parameters do not fit the config's model "
                        "(shapes or dtypes differ); evaluate with the run's own config file")
  shardings = jax.tree.map(lambda x: x.sharding, params)
  return (policy, jax.tree.map(jax.device_put, run_params, shardings),
          f"{workdir} step {step}")


def _sample(policy, params, examples, key, desc: str, *, greedy: bool, temperature: float,
            progress: bool, mesh=None) -> tuple[sampling.Rollout, float]:
  """(rollout, seconds) of one response per example, with a progress bar of sequences and
  tokens/s. With a mesh each sampling call's sequences are split over its devices, the last
  call's filled up with copies of the last example (dropped from the result) so that every call
  has the same, divisible number of rows."""
  n = len(examples)
  size = policy.sample_batch or n
  if mesh is not None:
    devices = mesh.devices.size
    if size % devices:
      raise EvaluateError(f"{size} sequences per sampling call do not split over {devices} "
                          "devices; set --batch_size (or config.rollout.sample_batch) to a "
                          "multiple")
    examples = examples + [examples[-1]] * (-n % size)
  bar = tqdm.tqdm(total=len(examples), desc=desc, unit="seq", disable=not progress,
                  mininterval=1.0)
  tokens, start = 0, time.perf_counter()

  def advance(part: sampling.Rollout) -> None:
    nonlocal tokens
    tokens += int(np.sum(np.asarray(part.response_mask_BxL)))
    bar.update(part.tokens_BxT.shape[0])
    bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.0f}")

  place_rows = None if mesh is None else lambda rows: mesh_lib.shard_sequences(rows, mesh)
  rollout = policy_lib.generate(policy, params, examples, key, greedy=greedy,
                                temperature=temperature, progress=advance, place_rows=place_rows)
  jax.block_until_ready(rollout.tokens_BxT)
  bar.close()
  if len(examples) > n:
    rollout = sampling.Rollout(*(np.asarray(x)[:n] for x in rollout))
  return rollout, time.perf_counter() - start


def _responses(policy, rollout, examples) -> list[dict[str, Any]]:
  """Per response: text, extracted answer, reward, format flag, length (tokens, EOS included)
  and whether it ran out of tokens without EOS."""
  response = policy_lib.response_tokens(rollout)
  mask = np.asarray(rollout.response_mask_BxL)
  scores = policy_lib.score(policy, rollout, examples)
  decoded = tasks.decode_responses(policy.tokenizer, response, mask)
  lengths = mask.sum(axis=1).astype(int)
  ended = np.any((response == policy.tokenizer.eos_id) & (mask > 0), axis=1)
  answer_fn = policy.task.answer_fn or (lambda text: text)
  return [{"response": text, "extracted": answer_fn(text), "reward": float(reward),
           "formatted": bool(formatted), "length": int(length), "clipped": not bool(end)}
          for (text, _), reward, formatted, length, end in zip(
              decoded, scores.rewards_B, scores.formatted_B, lengths, ended)]


def evaluate(policy: policy_lib.Policy, params: dict, examples: list[tasks.Example], *,
             samples: int = 1, temperature: float = 1.0, seed: int = 0, progress: bool = True,
             mesh: jax.sharding.Mesh | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """(summary, one record per example) of greedy decoding and, with `samples` K > 1, K samples
  per example at `temperature` (see the module docstring for the fields); with `mesh` (params
  already placed on it) each sampling call's sequences are split over its devices."""
  if not examples:
    raise EvaluateError("no examples to evaluate (--num_examples must be >= 1)")
  rollout, seconds = _sample(policy, params, examples, jax.random.PRNGKey(0), "greedy",
                             greedy=True, temperature=1.0, progress=progress, mesh=mesh)
  greedy = _responses(policy, rollout, examples)
  lengths = np.asarray([r["length"] for r in greedy])
  summary = {
      "examples": len(examples),
      "accuracy": float(np.mean([r["reward"] for r in greedy])),
      "format_rate": float(np.mean([r["formatted"] for r in greedy])),
      "length_mean": float(lengths.mean()), "length_max": int(lengths.max()),
      "clipped_frac": float(np.mean([r["clipped"] for r in greedy])),
      "tokens_per_s": float(lengths.sum() / seconds),
  }
  records = [{"prompt": ex.prompt, "gold": ex.answer, **r} for ex, r in zip(examples, greedy)]
  if samples > 1:
    repeated = [ex for ex in examples for _ in range(samples)]
    rollout, seconds = _sample(policy, params, repeated, jax.random.PRNGKey(seed),
                               f"{samples} samples", greedy=False, temperature=temperature,
                               progress=progress, mesh=mesh)
    sampled = _responses(policy, rollout, repeated)
    rewards = np.asarray([r["reward"] for r in sampled]).reshape(len(examples), samples)
    correct = np.sum(rewards >= 1.0, axis=1)
    summary.update({
        "samples": samples, "temperature": temperature,
        **{f"pass@{k}": float(np.mean([pass_at_k(samples, c, k) for c in correct]))
           for k in sorted({k for k in PASS_KS if k < samples} | {samples})},
        f"mean@{samples}": float(rewards.mean()),
        "sampled_tokens_per_s": float(sum(r["length"] for r in sampled) / seconds),
    })
    for i, record in enumerate(records):
      record["samples"] = sampled[i * samples:(i + 1) * samples]
  return summary, records


def pass_at_k(n: int, correct: int, k: int) -> float:
  """The unbiased estimate of pass@k from n samples of which `correct` are correct (Chen et al.,
  2021): 1 - C(n - correct, k) / C(n, k), the chance that k of the n drawn without replacement
  hold a correct one; as a product, so that large n does not overflow."""
  if not 0 <= correct <= n or not 1 <= k <= n:
    raise ValueError(f"pass_at_k needs 0 <= correct <= n and 1 <= k <= n, got n={n}, "
                     f"correct={correct}, k={k}")
  if n - correct < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - correct + 1, n + 1)))


def format_table(summary: dict[str, Any]) -> str:
  width = max(len(k) for k in summary)
  return "\n".join(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                   for k, v in summary.items())


def write_results(out: str, summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
  """OUT/summary.json and OUT/responses.jsonl, each written whole then renamed into place."""
  os.makedirs(out, exist_ok=True)
  for name, text in (("summary.json", json.dumps(summary, indent=1) + "\n"),
                     ("responses.jsonl", "".join(json.dumps(r) + "\n" for r in records))):
    path = os.path.join(out, name)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(path + ".tmp", path)


def run(c: ml_collections.ConfigDict, out: str, *, checkpoint: str | None = None,
        workdir: str | None = None, step: int | None = None, split: str = "val",
        num_examples: int | None = None, samples: int = 1, temperature: float = 1.0,
        batch_size: int | None = None, progress: bool = True) -> dict[str, Any]:
  """Evaluates and writes OUT (see the module docstring); returns the summary."""
  if split not in SPLITS:
    raise EvaluateError(f"--split must be one of {SPLITS}, got {split!r}")
  if num_examples is not None and num_examples < 1:
    raise EvaluateError(f"--num_examples must be >= 1, got {num_examples}")
  if samples < 1 or not np.isfinite(temperature) or temperature <= 0:
    raise EvaluateError(f"--samples must be >= 1 and --temperature > 0, got {samples}, "
                     f"{temperature}")
  policy, params, source = load_policy(c, checkpoint=checkpoint, workdir=workdir, step=step)
  if batch_size is not None:
    policy = policy._replace(sample_batch=batch_size)
  mesh = mesh_lib.make_mesh(c)
  if mesh is not None:
    params = mesh_lib.place(params, mesh, trainer_lib.placement_specs(params, c))
  n = c.eval.num_examples if num_examples is None else num_examples
  examples = policy.task.examples(split, n, seed=c.eval.seed)
  summary, records = evaluate(policy, params, examples, samples=samples,
                              temperature=temperature, seed=c.seed, progress=progress,
                              mesh=mesh)
  summary = {"model": source, "task": c.task, "split": split,
             "devices": 1 if mesh is None else int(mesh.devices.size), **summary}
  write_results(out, summary, records)
  print(format_table(summary))
  print(f"wrote {os.path.join(out, 'summary.json')} and responses.jsonl")
  return summary


def main():
  config = config_flags.DEFINE_config_file("config", None, "Experiment config (task, prompts, "
                                           "sampler, model).")
  out = flags.DEFINE_string("out", None, "Directory for summary.json and responses.jsonl.")
  checkpoint = flags.DEFINE_string("checkpoint", None, "A Hugging Face directory, .gguf file or "
                                   "hf:ORG/NAME to evaluate (replaces model.checkpoint).")
  workdir = flags.DEFINE_string("workdir", None, "A training run whose checkpoint to evaluate.")
  step = flags.DEFINE_integer("step", None, "With --workdir: the checkpoint step (default: the "
                              "latest).")
  split = flags.DEFINE_enum("split", "val", list(SPLITS), "Which split to draw examples from.")
  num_examples = flags.DEFINE_integer("num_examples", None, "Examples to evaluate (default: "
                                      "config.eval.num_examples).")
  samples = flags.DEFINE_integer("samples", 1, "K sampled responses per example (pass@K, "
                                 "mean@K) besides the greedy one.")
  temperature = flags.DEFINE_float("temperature", 1.0, "Sampling temperature for --samples.")
  batch_size = flags.DEFINE_integer("batch_size", None, "Sequences per sampling call (default: "
                                    "config.rollout.sample_batch).")
  flags.mark_flags_as_required(["config", "out"])

  def _main(argv):
    cli.refuse_positional_arguments(argv)
    logging.set_verbosity(logging.WARNING)  # keep absl's backend and orbax INFO lines off
    with cli.expected_errors_as_messages(runs.RunError, EvaluateError):
      run(config.value, out.value, checkpoint=checkpoint.value, workdir=workdir.value,
          step=step.value, split=split.value, num_examples=num_examples.value,
          samples=samples.value, temperature=temperature.value, batch_size=batch_size.value)

  app.run(_main)


if __name__ == "__main__":
  main()
