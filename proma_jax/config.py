"""The experiment config: its schema and defaults (`base_config`; `configs/<task>.py` override what
differs) and the checks of every field (`validate_config`), run before anything is compiled."""

from __future__ import annotations

import json
import math
import numbers
from typing import Any, Callable

import jax
import ml_collections

from proma_jax import capture, projection, tasks
from proma_jax import mesh as mesh_lib

ALGORITHMS = ("reinforce", "grpo", "proma", "proma_intra", "proma_both")


class ConfigError(ValueError):
  """An invalid config field; the message starts with `config.<field>:` (`validate_config`)."""


def base_config(task: str, algorithm: str) -> ml_collections.ConfigDict:
  """The full set of fields; every one can be overridden on the command line (--config.x.y=...)."""
  if algorithm not in ALGORITHMS:
    raise ValueError(f"config algorithm {algorithm!r} is unknown; expected one of {ALGORITHMS}")
  c = ml_collections.ConfigDict()
  c.task = task
  c.task_kwargs = ml_collections.ConfigDict()
  c.algorithm = algorithm
  c.seed = 0
  c.steps = 40                         # RL steps; each = one rollout batch
  c.model = _model_section()
  c.rollout = _rollout_section()
  c.train = _train_section()
  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-4, b1=0.9, b2=0.99, weight_decay=0.0, max_grad_norm=1.0))
  c.grpo = ml_collections.ConfigDict(dict(eps_low=0.2, eps_high=0.2, dual_clip=3.0))
  c.proma = _proma_section()
  c.mesh = _mesh_section()
  c.distributed = _distributed_section()
  c.eval = _eval_section()
  c.logging = _logging_section()
  c.checkpoint = ml_collections.ConfigDict(dict(every=10, max_to_keep=3))
  c.sft = _sft_section()
  return c


def _model_section() -> ml_collections.ConfigDict:
  """config.model: the tiny decoder trained from scratch (its architecture fields), or with
  `checkpoint` set, a pretrained one.

  checkpoint: a Hugging Face directory, a .gguf file, package:<module>/<file>, or a hub name
  hf:ORG/NAME[@REVISION] that huggingface_hub fetches into its cache (HF_HUB_OFFLINE=1: the cache
  only); see `proma_jax.models.resolve_checkpoint`. A checkpoint brings its own architecture and
  tokenizer, and skips the supervised warm start; of the fields below only dtype, param_dtype,
  remat, logits_chunk, attention_impl, scan_layers and max_len apply to it. scan_layers: the
  layers' parameters stacked and run by one lax.scan (compiled once, whatever the depth).
  max_len: the longest prompt + response allowed (None: the checkpoint's
  max_position_embeddings; the tiny decoder's is the task's longest prompt + max_new_tokens).
  """
  return ml_collections.ConfigDict(dict(
      checkpoint=ml_collections.FieldReference(None, str),
      d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=192,
      tie_embeddings=True, dtype="float32", param_dtype="float32", seed=0,
      remat=False, logits_chunk=0, attention_impl=ml_collections.FieldReference(None, str),
      scan_layers=True,
      max_len=ml_collections.FieldReference(None, int)))


def _rollout_section() -> ml_collections.ConfigDict:
  """config.rollout: sampling.

  max_new_tokens: response tokens (EOS included); None for the character tasks means their
  longest answer + extra_new_tokens. Pretrained policies: prompts are rendered with the
  tokenizer's chat template (chat_template=True and the tokenizer has one), left-padded to a
  multiple of `bucket` tokens (at most max_prompt_tokens), and sampled sample_batch sequences per
  call (0: all at once). top_p < 1 is nucleus sampling.
  """
  return ml_collections.ConfigDict(dict(
      prompts_per_step=16, group_size=4, temperature=1.0, extra_new_tokens=2,
      max_new_tokens=ml_collections.FieldReference(None, int), max_prompt_tokens=512, bucket=64,
      top_p=1.0, chat_template=True, sample_batch=0))


def _train_section() -> ml_collections.ConfigDict:
  """config.train: one RL step.

  The rollout batch is split into `num_minibatches` optimizer steps (later ones are off-policy),
  each made of `num_microbatches` microbatches accumulated by the same code path; num_epochs > 1
  passes over the batch again in a fresh order (PPO epochs). scan_microbatches: each optimizer
  step's microbatches run in one compiled call (a lax.scan); False calls the compiled microbatch
  update once per microbatch (same result, more dispatch).
  """
  return ml_collections.ConfigDict(dict(num_minibatches=2, num_microbatches=4, num_epochs=1,
                                        scan_microbatches=True))


def _proma_section() -> ml_collections.ConfigDict:
  """config.proma: the projections' knobs (docs/algorithm.md).

  fused: every dense kernel's PROMA statistics are computed and used inside that layer's backward
  pass (one layer's S_i alive at a time; docs/algorithm.md#fused-statistics); False: the stacked
  statistics of every layer are handed to the transform after the backward pass.
  """
  return ml_collections.ConfigDict(dict(
      shrinkage=1.0, ridge=1e-2, relative_bound=ml_collections.FieldReference(None, float),
      skip_fraction=0.0, solver="exact", scope="all",
      rank=10, intra_shrinkage=1.0, power_iters=1, range_finder_seed=0, fused=True))


def _mesh_section() -> ml_collections.ConfigDict:
  """config.mesh: data parallelism (proma_jax.mesh).

  `data` devices on a ("data",) mesh, each microbatch's sequences sharded over them, params
  replicated. mode "exact": the single-device projection, collectives inserted by the compiler;
  "local": each device projects against its own sequences, one psum per microbatch (an
  approximation for accumulation-PROMA; the paper's data-parallel intra variant). data=1 is the
  single-device path.

  fsdp > 1: a ("data", "fsdp") mesh of data x fsdp devices; params, optimizer state and the PROMA
  accumulator sharded over "fsdp" ZeRO-3 style (each leaf of >= fsdp_min_size elements along its
  largest divisible dimension; `proma_jax.mesh.param_specs`), each microbatch's sequences over
  "data" and "fsdp" together where they divide (else over "data") for every algorithm; proma and
  proma_both then reshard their per-sequence gradients like the params
  (`proma_jax.mesh.constrain_sequence_gradients`, an all-to-all over "fsdp"); exact mode, one
  process or several.
  """
  return ml_collections.ConfigDict(dict(data=1, mode="exact", fsdp=1, fsdp_min_size=2**14))


def _distributed_section() -> ml_collections.ConfigDict:
  """config.distributed: multi-process runs. The same command is started once per process with
  its process_id; process 0 writes metrics; checkpoints are written collectively (orbax: each
  process its shards)."""
  return ml_collections.ConfigDict(dict(
      num_processes=1, process_id=0, coordinator="127.0.0.1:12355"))


def _eval_section() -> ml_collections.ConfigDict:
  """config.eval: greedy accuracy on num_examples val prompts ("val/accuracy") and, with
  in_distribution, on as many held-out draws of the train split ("val_id/accuracy")."""
  return ml_collections.ConfigDict(dict(every=5, num_examples=128, seed=12345,
                                        in_distribution=True))


def _logging_section() -> ml_collections.ConfigDict:
  """config.logging: experiment logging besides <workdir>/metrics.jsonl. TensorBoard event files
  under <workdir>/tensorboard, and Weights & Biases when wandb_project is set (`pip install
  wandb`; wandb_mode "offline" needs no network, "disabled" turns it off)."""
  return ml_collections.ConfigDict(dict(
      tensorboard=True, wandb_project=ml_collections.FieldReference(None, str),
      wandb_entity=ml_collections.FieldReference(None, str), wandb_mode="online"))


def _sft_section() -> ml_collections.ConfigDict:
  """config.sft: the supervised warm start, shared by every RL run of the same task and model
  (cached on disk)."""
  return ml_collections.ConfigDict(dict(
      steps=300, batch_size=64, lr=3e-3, seed=0, checkpoint_dir="checkpoints/warm_start"))


def to_json(c: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON values (what run.json records and resumed runs are compared by)."""
  return json.loads(c.to_json_best_effort())


# ---------------------------------------------------------------------------------------------
# Config validation: before anything is compiled, naming the field.


def is_int(value) -> bool:
  """An integer, not a bool (True would pass for 1)."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
  """A real number, not a bool, neither NaN nor infinite."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _non_finite_fields(node, prefix: str = "") -> list[tuple[str, Any]]:
  """(dotted field, value) of every float that is NaN or infinite, anywhere in a config."""
  if isinstance(node, (dict, ml_collections.ConfigDict)):
    return [bad for key, value in node.items()
            for bad in _non_finite_fields(value, f"{prefix}{key}.")]
  if isinstance(node, (list, tuple)):
    return [bad for i, value in enumerate(node)
            for bad in _non_finite_fields(value, f"{prefix[:-1]}[{i}].")]
  if isinstance(node, float) and not math.isfinite(node):
    return [(prefix[:-1], node)]
  return []


def _one_of(options) -> str:
  """`options` as prose: "None, 'xla' or 'cudnn'"."""
  names = [repr(option) for option in options]
  return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


class _Checks:
  """The field checks of one config; each raises ConfigError naming the dotted field."""

  def __init__(self, c: ml_collections.ConfigDict):
    self.c = c

  def need(self, ok: bool, field: str, message: str):
    if not ok:
      raise ConfigError(f"config.{field}: {message}")

  def get(self, field: str):
    node = self.c
    for part in field.split("."):
      node = node[part]
    return node

  def integer(self, field: str, minimum: int):
    value = self.get(field)
    self.need(is_int(value) and value >= minimum, field,
              f"must be an integer >= {minimum}, got {value!r}")

  def number(self, field: str, ok: Callable[[Any], bool], expected: str, optional: bool = False):
    value = self.get(field)
    if optional and value is None:
      return
    self.need(is_finite_number(value) and ok(value), field,
              f"must be a finite number {expected}{' or None' if optional else ''}, got {value!r}")

  def boolean(self, field: str):
    value = self.get(field)
    self.need(isinstance(value, bool), field, f"must be True or False, got {value!r}")

  def choice(self, field: str, options):
    value = self.get(field)
    self.need(value in options, field, f"unknown {value!r}; expected one of {options}")


def validate_config(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (a ValueError) naming the first invalid field of an RL config
  (`config.<field>: ...`).

  Every numeric field is checked against its valid range (integers where the field counts or
  seeds something), and no float anywhere in the config, task_kwargs included, may be NaN or
  infinite.
  """
  check = _Checks(c)
  check.choice("algorithm", ALGORITHMS)
  check.integer("seed", 0)
  check.integer("steps", 0)
  _check_model(check, c)
  _check_rollout_and_batches(check, c)
  _check_mesh(check, c)
  _check_optimizer(check)
  _check_evaluation_and_records(check, c)
  for field, value in _non_finite_fields(c):  # task_kwargs and any field added later
    check.need(False, field, f"must be finite, got {value}")


def _check_model(check: _Checks, c: ml_collections.ConfigDict) -> None:
  """model.*: the tiny decoder's shape, dtypes and flags; a checkpoint's header and positions."""
  # The models and writers are imported where used, not at the top: they need the `models` and
  # `logging` extras, while `import proma_jax.config` needs the core alone.
  from proma_jax.models.decoder import (  # pylint: disable=import-outside-toplevel
      ATTENTION_IMPLS, DTYPES)
  for field in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim"):
    check.integer(f"model.{field}", 1)
  mo = c.model
  check.need(mo.n_heads % mo.n_kv_heads == 0, "model.n_kv_heads",
             f"{mo.n_kv_heads} does not divide model.n_heads={mo.n_heads} "
             "(grouped-query attention)")
  check.need(mo.head_dim % 2 == 0, "model.head_dim",
             f"must be even (rotary embedding), got {mo.head_dim}")
  for field in ("dtype", "param_dtype"):
    check.choice(f"model.{field}", sorted(DTYPES))
  check.boolean("model.tie_embeddings")
  check.integer("model.seed", 0)
  check.boolean("model.remat")
  check.boolean("model.scan_layers")
  check.integer("model.logits_chunk", 0)
  if mo.max_len is not None:
    check.integer("model.max_len", 1)
  check.need(mo.attention_impl in ATTENTION_IMPLS, "model.attention_impl",
             f"must be {_one_of(ATTENTION_IMPLS)}, got {mo.attention_impl!r}")
  check.need(mo.checkpoint is not None or c.task not in tasks.TEXT_TASKS, "model.checkpoint",
             f"task {c.task!r} is a text task for pretrained tokenizers; set a checkpoint (a "
             "Hugging Face directory or a .gguf file)")
  if mo.checkpoint is None:
    return
  check.need(isinstance(mo.checkpoint, str) and bool(mo.checkpoint), "model.checkpoint",
             f"must be a path or None, got {mo.checkpoint!r}")
  try:  # the header only: a missing file or unsupported model fails here, before any compile
    from proma_jax.models.loading import checkpoint_config  # pylint: disable=import-outside-toplevel
    max_len = checkpoint_config(mo.checkpoint).max_len
    max_len = mo.max_len or max_len
  except ValueError as e:  # CheckpointError
    check.need(False, "model.checkpoint", str(e))
  r = c.rollout
  if r.max_new_tokens is not None:
    check.need(r.max_prompt_tokens + r.max_new_tokens <= max_len, "rollout.max_prompt_tokens",
               f"{r.max_prompt_tokens} + rollout.max_new_tokens {r.max_new_tokens} exceeds the "
               f"model's {max_len} positions (model.max_len, else the checkpoint's "
               "max_position_embeddings); a batch of long prompts would fail mid-run")


def _check_rollout_and_batches(check: _Checks, c: ml_collections.ConfigDict) -> None:
  """rollout.* and train.*: sampling, and a rollout batch that splits into whole minibatches and
  microbatches."""
  r, t = c.rollout, c.train
  check.integer("rollout.prompts_per_step", 1)
  check.need(is_int(r.group_size) and r.group_size >= 2, "rollout.group_size",
             f"must be >= 2 for group advantages, got {r.group_size!r}")
  check.number("rollout.temperature", lambda v: v > 0, "> 0")
  check.integer("rollout.extra_new_tokens", 0)
  if r.max_new_tokens is not None:
    check.integer("rollout.max_new_tokens", 1)
  check.integer("rollout.max_prompt_tokens", 1)
  check.integer("rollout.bucket", 1)
  check.number("rollout.top_p", lambda v: 0 < v <= 1, "in (0, 1]")
  check.boolean("rollout.chat_template")
  check.integer("rollout.sample_batch", 0)
  check.integer("train.num_minibatches", 1)
  check.integer("train.num_microbatches", 1)
  check.integer("train.num_epochs", 1)
  check.boolean("train.scan_microbatches")
  batch = r.prompts_per_step * r.group_size
  check.need(batch % t.num_minibatches == 0, "train.num_minibatches",
             f"{t.num_minibatches} does not divide the rollout batch of {batch} sequences "
             f"(rollout.prompts_per_step * rollout.group_size)")
  minibatch = batch // t.num_minibatches
  check.need(minibatch % t.num_microbatches == 0, "train.num_microbatches",
             f"{t.num_microbatches} does not divide the minibatch of {minibatch} sequences")


def _check_mesh(check: _Checks, c: ml_collections.ConfigDict) -> None:
  """mesh.* and distributed.*: a mesh whose devices exist and divide the microbatch's sequences
  (after `_check_rollout_and_batches`, which makes the microbatch whole)."""
  m, d = c.mesh, c.distributed
  microbatch = (c.rollout.prompts_per_step * c.rollout.group_size // c.train.num_minibatches
                // c.train.num_microbatches)
  check.integer("mesh.data", 1)
  check.integer("mesh.fsdp", 1)
  check.integer("mesh.fsdp_min_size", 0)
  check.need(m.fsdp == 1 or m.mode == "exact", "mesh.mode",
             f"an FSDP mesh (mesh.fsdp={m.fsdp}) runs in exact mode only, got {m.mode!r}")
  check.need(microbatch % m.data == 0, "mesh.data",
             f"{m.data} does not divide the microbatch of {microbatch} sequences, which are "
             "sharded over the mesh.data devices")
  check.choice("mesh.mode", mesh_lib.MODES)
  check.integer("distributed.num_processes", 1)
  # One process sees every device now (with several, only after jax.distributed starts, later):
  # refuse before a warm start trains, not when the mesh is built.
  if d.num_processes == 1:  # (jax.device_count() would start the backend before distributed)
    check.need(m.data * m.fsdp <= jax.device_count(), "mesh.data",
               f"mesh.data x mesh.fsdp = {m.data * m.fsdp} devices requested but "
               f"{jax.device_count()} are available (on CPU, set "
               "XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts)")
  check.need(is_int(d.process_id) and 0 <= d.process_id < d.num_processes,
             "distributed.process_id", f"must be in [0, {d.num_processes}), got {d.process_id!r}")
  check.need(d.num_processes == 1 or (m.data * m.fsdp) % d.num_processes == 0, "mesh.data",
             f"a {d.num_processes}-process run shards over all devices of all processes; "
             f"mesh.data x mesh.fsdp = {m.data * m.fsdp} is not a multiple of "
             "distributed.num_processes")
  host, _, port = str(d.coordinator).rpartition(":")
  check.need(bool(host) and port.isdigit() and 0 < int(port) < 65536, "distributed.coordinator",
             f"must be host:port, got {d.coordinator!r}")


def _check_optimizer(check: _Checks) -> None:
  """optim.* (AdamW), grpo.* (its clipping) and proma.* (the projections' knobs)."""
  check.number("optim.lr", lambda v: v > 0, "> 0")
  check.number("optim.b1", lambda v: 0 <= v < 1, "in [0, 1)")
  check.number("optim.b2", lambda v: 0 <= v < 1, "in [0, 1)")
  check.number("optim.weight_decay", lambda v: v >= 0, ">= 0")
  check.number("optim.max_grad_norm", lambda v: v > 0, "> 0")

  check.number("grpo.eps_low", lambda v: 0 <= v <= 1, "in [0, 1]")
  check.number("grpo.eps_high", lambda v: v >= 0, ">= 0")
  check.number("grpo.dual_clip", lambda v: v > 1, "> 1", optional=True)

  check.choice("proma.solver", projection.SOLVERS)
  check.choice("proma.scope", capture.SEQUENCE_SCOPES)
  check.boolean("proma.fused")
  check.number("proma.shrinkage", lambda v: v >= 0, ">= 0")
  check.number("proma.ridge", lambda v: v >= 0, ">= 0")
  check.number("proma.relative_bound", lambda v: v >= 0, ">= 0", optional=True)
  check.number("proma.skip_fraction", lambda v: 0 <= v <= 1, "in [0, 1]")
  check.integer("proma.rank", 1)
  check.number("proma.intra_shrinkage", lambda v: v >= 0, ">= 0")
  check.integer("proma.power_iters", 0)
  check.integer("proma.range_finder_seed", 0)


def _check_evaluation_and_records(check: _Checks, c: ml_collections.ConfigDict) -> None:
  """logging.*, eval.*, checkpoint.* and sft.* (the warm start)."""
  from proma_jax import writers  # pylint: disable=import-outside-toplevel
  writers.validate_logging_config(c.logging)
  check.integer("eval.every", 1)
  check.integer("eval.num_examples", 1)
  check.integer("eval.seed", 0)
  check.boolean("eval.in_distribution")
  check.integer("checkpoint.every", 1)
  check.integer("checkpoint.max_to_keep", 1)

  check.integer("sft.steps", 0)
  check.integer("sft.batch_size", 1)
  check.number("sft.lr", lambda v: v > 0, "> 0")
  check.integer("sft.seed", 0)
  check.need(isinstance(c.sft.checkpoint_dir, str) and bool(c.sft.checkpoint_dir),
             "sft.checkpoint_dir", f"must be a non-empty path, got {c.sft.checkpoint_dir!r}")
