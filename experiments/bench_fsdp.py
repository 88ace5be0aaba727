"""FSDP: per-device memory and collectives of the microbatch step against the fsdp shard count.

Compile only: for each model preset (random-weight shapes, cut to `--depths` layers), fsdp shard
count F (a ("data", "fsdp") mesh of shape (1, F), `mesh.fsdp_mesh(1, F)`) and variant of
`experiments/bench_step.py` (plain = `optax.MultiSteps` around AdamW; proma_mat, intra, both_mat =
PROMA from one forward and backward pass), the jitted microbatch step (params and optimizer state
donated, their FSDP placement kept on the outputs as `trainer._compile` does) is lowered and compiled
on ABSTRACT inputs: `jax.ShapeDtypeStruct`s carrying NamedShardings (params and optimizer state by
`mesh.param_specs(..., min_size=mesh.FSDP_MIN_SIZE)`, the microbatch by `mesh.sequence_sharded`
over both axes as the training loop places it; `--layout data` keeps the sequences of the
variants with per-sequence gradients over "data" alone, the training loop's layout until
2026-11-26: LAYOUTS).
Nothing of model size is allocated, so Qwen3-8B compiles on a 24 GiB CPU box. 8 host CPU devices
are forced (XLA_FLAGS) before JAX starts.

Per (preset, depth, fsdp, variant) it records:
  memory       `compiled.memory_analysis()` of the partitioned program, i.e. PER DEVICE: argument,
               output, temp, alias and generated-code bytes, and peak = argument + output + temp -
               alias (`bench_memory._memory`: donated params/state alias their outputs, so they
               count once). These are the CPU compiler's buffer assignments; a GPU compile fuses
               and schedules differently (and attention kernels differ), so read them as the
               layout's memory, not a GPU's measured peak.
  collectives  from `compiled.as_text()`: result bytes and instruction counts per kind
               (`bench_mesh.collective_bytes`), each instruction counted ONCE, per microbatch call.
               The parse is static: a collective inside a while loop (the `lax.map` over logits
               chunks with `logits_chunk` > 0, any scan) runs once per iteration but is counted
               once, so that per-call figure undercounts it. The loop share is recorded apart
               (`loop_bytes`) and `executed_bytes` weighs every instruction by the trip counts of
               its enclosing loops (XLA's `known_trip_count`; unknown counts are flagged).
               Remat adds no loop: its recomputation is straight-line code, counted as it stands.
               Also the CPU partitioner's choices: on this backend bf16 params were seen converted
               to f32 BEFORE their all-gather (twice a bf16 gather's bytes); a GPU compile may
               gather in bf16, use reduce-scatters, and partition differently.
  time         compile_s: abstract shapes + lower + compile; lower_s: lowering alone.

Derived (printed, from every record of `--out` with this run's shapes and options):
  full depth   per-device peak at the preset's own depth L, linear in depth from depths 1 and 2:
               m(L) = m1 + (L - 1) (m2 - m1), and whether it fits 80 GB (80e9 bytes) per device.
  PROMA bytes  a variant's collective bytes (`executed_bytes`, all kinds) minus plain's at the
               same (preset, depth, fsdp), per optimizer step of `--microbatches` M calls:
               per-call bytes x M is the per-step figure (each call runs the same program).
               Extrapolated to full depth the same way.

  .venv/bin/python experiments/bench_fsdp.py --quick          # qwen3-0.6b L=1, 2 x 64, fsdp 1 2
  .venv/bin/python experiments/bench_fsdp.py                  # qwen3-1.7b, 8b; L=1,2; fsdp 1-8
Resumable: configurations already in `--out` (same preset, depth, fsdp, variant, seqs, len and
model options) are skipped, so an interrupted grid reruns with the same command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

NUM_DEVICES = 8
_FLAGS = (os.environ.get("XLA_FLAGS", "") +
          f" --xla_force_host_platform_device_count={NUM_DEVICES}")
os.environ["XLA_FLAGS"] = _FLAGS

import jax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_llm_step  # noqa: E402
import bench_memory  # noqa: E402
import bench_mesh  # noqa: E402  (sets its own 4-device XLA_FLAGS on import: restored below)
import bench_step  # noqa: E402
import records  # noqa: E402
from proma_jax import mesh as mesh_lib  # noqa: E402
from proma_jax.models import decoder as model_lib, presets  # noqa: E402

os.environ["XLA_FLAGS"] = _FLAGS  # read when the CPU backend starts, i.e. after these imports

VARIANTS = bench_llm_step.VARIANTS
FIT_BYTES = 80 * 10**9
KEY = ("preset", "depth", "fsdp", "variant", "layout", "seqs", "len", "dtype", "param_dtype",
       "remat", "logits_chunk")
# Sequence layouts of the variants with per-sequence gradients S_i (the others always shard
# sequences over both axes, "both"):
#   both   sequences over ("data", "fsdp"), S_i resharded like the params before the statistics
#          (`mesh.constrain_sequence_gradients`), as the training loop does;
#   data   sequences over "data" only, S_i unconstrained (the training loop's layout until
#          2026-11-26; the first records of results/bench_fsdp_cpu.jsonl, which have no "layout").
LAYOUTS = ("both", "data")


def abstract(tree, mesh: jax.sharding.Mesh, fsdp: int):
  """(ShapeDtypeStructs of `tree` placed by the FSDP rule, their NamedShardings)."""
  specs = mesh_lib.param_specs(tree, fsdp, min_size=mesh_lib.FSDP_MIN_SIZE)
  shards = mesh_lib.shardings(mesh, specs)
  structs = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         tree, shards)
  return structs, shards


PER_SEQUENCE = ("proma_mat", "both_mat")  # variants with per-sequence gradients S_i


def variant_layout(variant: str, layout: str) -> str:
  """The layout `--layout` gives `variant` (only the per-sequence variants have a choice)."""
  return layout if variant in PER_SEQUENCE else "both"


def layout_of(record: dict) -> str:
  """A record's layout; records without one predate `--layout` and used "data"."""
  return record.get("layout") or variant_layout(record["variant"], "data")


def compile_step(cfg, variant: str, fsdp: int, n_seq: int, seq_len: int, num_microbatches: int,
                 layout: str = "both"):
  """The compiled microbatch step of `variant` on a (1, fsdp) mesh, and its lower seconds."""
  mesh = mesh_lib.fsdp_mesh(1, fsdp)
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: model_lib.make_model(cfg, seed=0)))
  params, param_shards = abstract(nnx.to_pure_dict(abstract_state), mesh, fsdp)
  num_tokens = n_seq * seq_len * num_microbatches / 2  # a loss scale only: no shape depends on it
  constrain = None
  if layout == "both":  # as trainer.microbatch_update_fn
    constrain = lambda s: mesh_lib.constrain_sequence_gradients(s, param_shards)
  tx, microbatch = bench_step.build_step(variant, graphdef, abstract_state, num_tokens,
                                         num_microbatches, constrain)
  opt_state, state_shards = abstract(jax.eval_shape(tx.init, params), mesh, fsdp)
  batch = jax.eval_shape(lambda: bench_step.make_batch(cfg, jax.random.PRNGKey(0), n_seq, seq_len))
  # `layout` (LAYOUTS): "both" is the training loop's (trainer.Trainer.shard).
  rows = mesh_lib.sequence_sharded(mesh, 0, n_seq if layout == "both" else None)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows), batch)
  step = jax.jit(microbatch, out_shardings=(param_shards, state_shards), donate_argnums=(0, 1))
  t0 = time.perf_counter()
  lowered = step.lower(params, opt_state, batch)
  lower_s = time.perf_counter() - t0
  return lowered.compile(), lower_s


# ---------------------------------------------------------------------------------------------
# Collectives of the optimized HLO, with the loops that enclose them.

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"\b(condition|body|to_apply|calls|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
  """({computation name: its instruction lines}, the entry computation's name)."""
  comps, entry, name = {}, None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and name is None:
      name = header.group(2)
      entry = name if header.group(1) else entry
      comps[name] = []
    elif line.strip() == "}":
      name = None
    elif name is not None:
      comps[name].append(line)
  return comps, entry


def _executions(comps: dict[str, list[str]], entry: str) -> tuple[dict[str, int], dict[str, bool]]:
  """How many times each computation runs per call of `entry` (while bodies and conditions times
  their known trip count), and whether it sits inside any while loop. An unknown trip count
  counts 1 and is reported by `collectives`."""
  runs, in_loop = {}, {}

  def visit(name, times, looped):
    runs[name] = runs.get(name, 0) + times
    in_loop[name] = in_loop.get(name, False) or looped
    for line in comps.get(name, ()):
      trips = _TRIPS.search(line)
      for role, callees in _CALLS.findall(line):
        loop = role in ("body", "condition")
        factor = int(trips.group(1)) if loop and trips else 1
        for callee in re.findall(r"[\w.\-]+", callees):
          if callee in comps:
            visit(callee, times * factor, looped or loop)

  visit(entry, 1, False)
  return runs, in_loop


def collectives(hlo_text: str) -> dict:
  """Per kind: `bytes` (each instruction once, `bench_mesh.collective_bytes`), `counts`,
  `loop_bytes` (the part of `bytes` inside while loops) and `executed_bytes` (each instruction
  times its loops' trip counts); `unknown_trips`: while loops without a known trip count."""
  comps, entry = _computations(hlo_text)
  runs, in_loop = _executions(comps, entry)
  kinds = bench_mesh.COLLECTIVES
  out = {"bytes": bench_mesh.collective_bytes(hlo_text), "counts": dict.fromkeys(kinds, 0),
         "loop_bytes": dict.fromkeys(kinds, 0), "executed_bytes": dict.fromkeys(kinds, 0),
         "unknown_trips": sum(1 for lines in comps.values() for line in lines
                              if " while(" in line and not _TRIPS.search(line))}
  for name, lines in comps.items():
    for kind, size in bench_mesh.collective_bytes("\n".join(lines)).items():
      out["executed_bytes"][kind] += size * runs.get(name, 0)
      out["loop_bytes"][kind] += size if in_loop.get(name) else 0
    for match in filter(None, map(bench_mesh._INSTRUCTION.search, lines)):
      out["counts"][match.group(2)] += 1
  return out


# ---------------------------------------------------------------------------------------------


def run_one(cfg, preset: str, depth: int, fsdp: int, variant: str, args) -> dict:
  """The record of one configuration: its options, per-device memory, times and collectives."""
  t0 = time.perf_counter()
  layout = variant_layout(variant, args.layout)
  compiled, lower_s = compile_step(cfg, variant, fsdp, args.seqs, args.len, args.microbatches,
                                   layout)
  mem = compiled.memory_analysis()
  return dict(
      preset=preset, depth=depth, full_depth=presets.PRESETS[preset]["n_layers"], fsdp=fsdp,
      variant=variant, layout=layout, seqs=args.seqs, len=args.len, dtype=args.dtype,
      param_dtype=args.param_dtype, remat=args.remat, logits_chunk=args.logits_chunk,
      microbatches=args.microbatches,
      **bench_memory._memory(compiled, time.perf_counter() - t0),
      output_bytes=int(mem.output_size_in_bytes),
      code_bytes=int(mem.generated_code_size_in_bytes), lower_s=lower_s,
      collectives=collectives(compiled.as_text()))


def derive(rows: list[dict], microbatches: int) -> list[dict]:
  """Per (preset, fsdp, variant) with depths 1 and 2: full-depth peak and PROMA-specific bytes."""
  by = {(r["preset"], r["depth"], r["fsdp"], r["variant"]): r for r in rows}
  out = []
  for (preset, depth, fsdp, variant), r1 in sorted(by.items()):
    r2 = by.get((preset, 2, fsdp, variant))
    if depth != 1 or r2 is None:
      continue
    full = r1["full_depth"]
    linear = lambda m1, m2: m1 + (full - 1) * (m2 - m1)
    peak = linear(r1["peak_bytes"], r2["peak_bytes"])
    row = dict(preset=preset, fsdp=fsdp, variant=variant, full_depth=full, full_peak_bytes=peak,
               fits_80gb=peak <= FIT_BYTES)
    base1, base2 = by.get((preset, 1, fsdp, "plain")), by.get((preset, 2, fsdp, "plain"))
    if variant != "plain" and base1 and base2:
      extra = [sum(r["collectives"]["executed_bytes"].values()) -
               sum(b["collectives"]["executed_bytes"].values())
               for r, b in ((r1, base1), (r2, base2))]
      row.update(proma_bytes_per_step_l1=extra[0] * microbatches,
                 proma_bytes_per_step_l2=extra[1] * microbatches,
                 proma_bytes_per_step_full=linear(*extra) * microbatches)
    out.append(row)
  return out


def _gib(x):
  return f"{x / 2**30:.2f}"


def markdown(rows: list[dict], derived: list[dict], microbatches: int) -> str:
  kinds = [k for k in bench_mesh.COLLECTIVES if any(r["collectives"]["counts"][k] for r in rows)]
  lines = ["Per device, per microbatch call (GiB; collectives: MiB executed / instructions):", "",
           "| preset | L | fsdp | variant | peak | arg | out | temp | alias | compile s | " +
           " | ".join(kinds) + " | in loops MiB |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | " +
           " | ".join("---" for _ in kinds) + " | --- |"]
  for r in sorted(rows, key=lambda r: (r["preset"], r["depth"], r["fsdp"],
                                       VARIANTS.index(r["variant"]))):
    c = r["collectives"]
    cells = [f"{c['executed_bytes'][k] / 2**20:.1f} / {c['counts'][k]}" for k in kinds]
    lines.append(f"| {r['preset']} | {r['depth']} | {r['fsdp']} | {r['variant']} | "
                 f"{_gib(r['peak_bytes'])} | {_gib(r['argument_bytes'])} | "
                 f"{_gib(r['output_bytes'])} | {_gib(r['temp_bytes'])} | "
                 f"{_gib(r['alias_bytes'])} | {r['compile_s']:.0f} | " + " | ".join(cells) +
                 f" | {sum(c['loop_bytes'].values()) / 2**20:.1f} |")
  lines += ["", f"Full depth (linear from L=1, 2), per device; PROMA bytes = variant - plain, per "
            f"optimizer step of {microbatches} microbatches (GiB):", "",
            "| preset | L | fsdp | variant | peak | x fsdp 1 | fits 80 GB | PROMA bytes/step L=1 | "
            "L=2 | full L |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  unsharded = {(d["preset"], d["variant"]): d["full_peak_bytes"] for d in derived if d["fsdp"] == 1}
  for d in derived:
    extra = [_gib(d[k]) if k in d else "-" for k in
             ("proma_bytes_per_step_l1", "proma_bytes_per_step_l2", "proma_bytes_per_step_full")]
    base = unsharded.get((d["preset"], d["variant"]))
    ratio = f"{d['full_peak_bytes'] / base:.2f}" if base else "-"
    lines.append(f"| {d['preset']} | {d['full_depth']} | {d['fsdp']} | {d['variant']} | "
                 f"{_gib(d['full_peak_bytes'])} | {ratio} | {'yes' if d['fits_80gb'] else 'no'} | "
                 + " | ".join(extra) + " |")
  return "\n".join(lines)


def layout_table(rows: list[dict]) -> str:
  """Collective GiB per microbatch call (executed) of plain and of the per-sequence variants in
  each layout, per (preset, depth, fsdp) with records in both layouts."""
  total = lambda r: sum(r["collectives"]["executed_bytes"].values()) / 2**30
  by = {(r["preset"], r["depth"], r["fsdp"], r["variant"], layout_of(r)): r for r in rows}
  cells = [(v, layout) for v in PER_SEQUENCE for layout in ("data", "both")]
  lines = ["Collectives per microbatch call, GiB (per-sequence variants: sequences over \"data\" "
           "alone / over both axes with S_i resharded like the params):", "",
           "| preset | L | fsdp | plain | " + " | ".join(f"{v} {l}" for v, l in cells) + " |",
           "| --- | --- | --- | --- | " + " | ".join("---" for _ in cells) + " |"]
  for preset, depth, fsdp in sorted({k[:3] for k in by}):
    plain = by.get((preset, depth, fsdp, "plain", "both"))
    got = [by.get((preset, depth, fsdp, v, l)) for v, l in cells]
    if plain is None or fsdp == 1 or not all(got):
      continue
    lines.append(f"| {preset} | {depth} | {fsdp} | {total(plain):.2f} | " +
                 " | ".join(f"{total(r):.2f}" for r in got) + " |")
  return "\n".join(lines)


def _read(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="qwen3-0.6b at depth 1, 2 x 64 tokens, fsdp 1 2, plain and proma_mat")
  parser.add_argument("--presets", nargs="+", default=["qwen3-1.7b", "qwen3-8b"],
                      choices=sorted(presets.PRESETS))
  parser.add_argument("--depths", nargs="+", type=int, default=[1, 2],
                      help="layers compiled; the full-depth figures need 1 and 2")
  parser.add_argument("--fsdp", nargs="+", type=int, default=[1, 2, 4, 8])
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--layout", default="both", choices=LAYOUTS,
                      help="sequence layout of the variants with per-sequence gradients (LAYOUTS)")
  parser.add_argument("--seqs", type=int, default=8, help="sequences per microbatch")
  parser.add_argument("--len", type=int, default=1536, help="tokens per sequence")
  parser.add_argument("--microbatches", type=int, default=64,
                      help="microbatches per optimizer step (the paper: 512 sequences / 8)")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--param_dtype", default="bfloat16")
  parser.add_argument("--no_remat", dest="remat", action="store_false")
  parser.add_argument("--logits_chunk", type=int, default=1024)
  parser.add_argument("--out", help="JSON-lines results, appended (default "
                      "results/bench_fsdp_cpu.jsonl; with --quick runs/bench_fsdp_quick.jsonl)")
  args = parser.parse_args(argv)
  if args.quick:
    args.presets, args.depths, args.fsdp = ["qwen3-0.6b"], [1], [1, 2]
    args.variants, args.seqs, args.len = ["plain", "proma_mat"], 2, 64
  args.out = args.out or ("runs/bench_fsdp_quick.jsonl" if args.quick
                          else "results/bench_fsdp_cpu.jsonl")
  for flag, values in (("--fsdp", args.fsdp), ("--depths", args.depths)):
    if any(v < 1 for v in values):
      parser.error(f"{flag}: values must be >= 1, got {values}")
  if any(f > NUM_DEVICES for f in args.fsdp):
    parser.error(f"--fsdp: at most {NUM_DEVICES} (the forced host devices), got {args.fsdp}")
  for flag in ("seqs", "len", "microbatches"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag}: must be >= 1, got {getattr(args, flag)}")
  if args.logits_chunk < 0:
    parser.error(f"--logits_chunk: must be >= 0, got {args.logits_chunk}")
  if "plain" not in args.variants:  # the baseline of the PROMA bytes
    args.variants = ["plain"] + args.variants
  return args


def main():
  args = parse_args()
  if jax.device_count() != NUM_DEVICES:
    raise RuntimeError(f"expected {NUM_DEVICES} forced host devices, got {jax.device_count()}: "
                       "was XLA_FLAGS overridden or the backend started before this module set it?")
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  meta = dict(machine=f"{platform.machine()} CPU, {os.cpu_count()} cores, {NUM_DEVICES} forced "
              "host devices", jax=jax.__version__, commit=commit,
              command=" ".join(["experiments/bench_fsdp.py"] + sys.argv[1:]))
  options = dict(seqs=args.seqs, len=args.len, dtype=args.dtype, param_dtype=args.param_dtype,
                 remat=args.remat, logits_chunk=args.logits_chunk)
  done = {tuple(dict(r, layout=layout_of(r))[k] for k in KEY) for r in _read(args.out)}
  grid = [(p, d, f, v) for p in args.presets for d in args.depths for f in args.fsdp
          for v in args.variants]
  for i, (preset, depth, fsdp, variant) in enumerate(grid):
    key = tuple(dict(options, preset=preset, depth=depth, fsdp=fsdp, variant=variant,
                     layout=variant_layout(variant, args.layout))[k] for k in KEY)
    label = f"[{i + 1}/{len(grid)}] {preset} L={depth} fsdp={fsdp} {variant}"
    if key in done:
      print(f"# {label}: in {args.out}, skipped", flush=True)
      continue
    print(f"# {label}: compiling ...", flush=True)
    cfg = presets.preset(preset, n_layers=depth, dtype=args.dtype, param_dtype=args.param_dtype,
                         remat=args.remat, logits_chunk=args.logits_chunk)
    r = run_one(cfg, preset, depth, fsdp, variant, args)
    print(f"# {label}: peak {_gib(r['peak_bytes'])} GiB/device, compile {r['compile_s']:.0f} s",
          flush=True)
    records.write_record(dict(r, meta=meta), args.out)
  rows = [r for r in _read(args.out) if all(r[k] == v for k, v in options.items())
          and r["preset"] in args.presets and r["fsdp"] in args.fsdp
          and r["variant"] in args.variants
          and layout_of(r) == variant_layout(r["variant"], args.layout)]
  print()
  print(markdown(rows, derive(rows, args.microbatches), args.microbatches))
  print()
  print(layout_table([r for r in _read(args.out) if all(r[k] == v for k, v in options.items())]))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
