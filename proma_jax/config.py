"""The experiment config schema and defaults; `configs/<task>.py` override what differs."""

import ml_collections

ALGORITHMS = ("reinforce", "grpo", "proma", "proma_intra", "proma_both")


class ConfigError(ValueError):
  """An invalid config field; the message starts with `config.<field>:` (`train.validate_config`)."""


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

  # The tiny decoder trained from scratch (architecture fields below), or with `checkpoint` set,
  # a pretrained one: a Hugging Face directory, a .gguf file, package:<module>/<file>, or a hub
  # name hf:ORG/NAME[@REVISION] that huggingface_hub fetches into its cache (HF_HUB_OFFLINE=1:
  # the cache only); see `proma_jax.models.resolve_checkpoint`. A checkpoint
  # brings its own architecture and
  # tokenizer, and skips the supervised warm start; of the fields below only dtype, param_dtype,
  # remat, logits_chunk, attention_impl, scan_layers and max_len apply to it. scan_layers: the
  # layers' parameters stacked and run by one lax.scan (compiled once, whatever the depth). max_len: the longest prompt +
  # response allowed (None: the checkpoint's max_position_embeddings; the tiny decoder's is the
  # task's longest prompt + max_new_tokens).
  c.model = ml_collections.ConfigDict(dict(
      checkpoint=ml_collections.FieldReference(None, str),
      d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=192,
      tie_embeddings=True, dtype="float32", param_dtype="float32", seed=0,
      remat=False, logits_chunk=0, attention_impl=ml_collections.FieldReference(None, str),
      scan_layers=True,
      max_len=ml_collections.FieldReference(None, int)))

  # Sampling. max_new_tokens: response tokens (EOS included); None for the character tasks means
  # their longest answer + extra_new_tokens. Pretrained policies: prompts are rendered with the
  # tokenizer's chat template (chat_template=True and the tokenizer has one), left-padded to a
  # multiple of `bucket` tokens (at most max_prompt_tokens), and sampled sample_batch sequences
  # per call (0: all at once). top_p < 1 is nucleus sampling.
  c.rollout = ml_collections.ConfigDict(dict(
      prompts_per_step=16, group_size=4, temperature=1.0, extra_new_tokens=2,
      max_new_tokens=ml_collections.FieldReference(None, int), max_prompt_tokens=512, bucket=64,
      top_p=1.0, chat_template=True, sample_batch=0))

  # One RL step: the rollout batch is split into `num_minibatches` optimizer steps (later ones are
  # off-policy), each made of `num_microbatches` microbatches accumulated by the same code path;
  # num_epochs > 1 passes over the batch again in a fresh order (PPO epochs).
  # scan_microbatches: each optimizer step's microbatches run in one compiled call (a lax.scan);
  # False calls the compiled microbatch update once per microbatch (same result, more dispatch).
  c.train = ml_collections.ConfigDict(dict(num_minibatches=2, num_microbatches=4, num_epochs=1,
                                           scan_microbatches=True))

  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-4, b1=0.9, b2=0.99, weight_decay=0.0, max_grad_norm=1.0))

  c.grpo = ml_collections.ConfigDict(dict(eps_low=0.2, eps_high=0.2, dual_clip=3.0))

  # fused: every dense kernel's PROMA statistics are computed and used inside that layer's
  # backward pass (one layer's S_i alive at a time; docs/algorithm.md#fused-statistics); False:
  # the stacked statistics of every layer are handed to the transform after the backward pass.
  c.proma = ml_collections.ConfigDict(dict(
      shrinkage=1.0, ridge=1e-2, relative_bound=ml_collections.FieldReference(None, float),
      skip_fraction=0.0, solver="exact", scope="all",
      rank=10, intra_shrinkage=1.0, power_iters=1, range_finder_seed=0, fused=True))

  # Data parallelism (proma_jax.mesh): `data` devices on a ("data",) mesh, each microbatch's
  # sequences sharded over them, params replicated. mode "exact": the single-device projection,
  # collectives inserted by the compiler; "local": each device projects against its own sequences,
  # one psum per microbatch (an approximation for accumulation-PROMA; the paper's data-parallel
  # intra variant). data=1 is the single-device path.
  # fsdp > 1: a ("data", "fsdp") mesh of data x fsdp devices; params, optimizer state and the
  # PROMA accumulator sharded over "fsdp" ZeRO-3 style (each leaf of >= fsdp_min_size elements
  # along its largest divisible dimension; `proma_jax.mesh.param_specs`), each microbatch's
  # sequences over "data" and "fsdp" together where they divide (else over "data") for every
  # algorithm; proma and proma_both then reshard their per-sequence gradients like the params
  # (`proma_jax.mesh.constrain_sequence_gradients`, an all-to-all over "fsdp"); exact mode, one
  # process or several.
  c.mesh = ml_collections.ConfigDict(dict(data=1, mode="exact", fsdp=1, fsdp_min_size=2**14))
  # Multi-process runs: the same command started once per process with its process_id; process 0
  # writes metrics; checkpoints are written collectively (orbax: each process its shards).
  c.distributed = ml_collections.ConfigDict(dict(
      num_processes=1, process_id=0, coordinator="127.0.0.1:12355"))

  # Greedy accuracy on num_examples val prompts ("val/accuracy") and, with in_distribution, on as
  # many held-out draws of the train split ("val_id/accuracy").
  c.eval = ml_collections.ConfigDict(dict(every=5, num_examples=128, seed=12345,
                                          in_distribution=True))
  # Experiment logging besides <workdir>/metrics.jsonl: TensorBoard event files under
  # <workdir>/tensorboard, and Weights & Biases when wandb_project is set (`pip install wandb`;
  # wandb_mode "offline" needs no network, "disabled" turns it off).
  c.logging = ml_collections.ConfigDict(dict(
      tensorboard=True, wandb_project=ml_collections.FieldReference(None, str),
      wandb_entity=ml_collections.FieldReference(None, str), wandb_mode="online"))
  c.checkpoint = ml_collections.ConfigDict(dict(every=10, max_to_keep=3))

  # Supervised warm start, shared by every RL run of the same task and model (cached on disk).
  c.sft = ml_collections.ConfigDict(dict(
      steps=300, batch_size=64, lr=3e-3, seed=0, checkpoint_dir="checkpoints/warm_start"))
  return c
