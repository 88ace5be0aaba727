"""Throughput of the code tasks' sandbox: MBPP's reference solutions through `tasks.code`.

Runs every MBPP reference solution against its three asserts (974 programs, or --limit) three
ways, in the same process, and prints one JSON line per way:
  - "plain": one `python -c` subprocess per program, no sandbox (the floor: interpreter start-up);
  - "sandbox": `code.run_programs`, the executor the reward uses (as root: a uid per job, network
    and mount namespaces, rlimits, the nonce check);
  - "reward": `mbpp.code_rewards` on responses that wrap each solution in a ```python fence (what
    a training step pays: extraction, JSON answers, the executor).
Each line has the number of programs, how many passed, the wall-clock seconds and programs/s,
with --workers programs at once (default: the number of CPUs), and the CPU seconds per program
of the child processes (user + system): on a shared machine the wall-clock rate depends on what
else runs, the CPU cost much less; cpus / cpu_s_per_program bounds the rate on idle cores.

  .venv/bin/python experiments/bench_sandbox.py --mbpp ../shared/data/mbpp/mbpp.jsonl
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proma_jax.tasks import code, mbpp  # noqa: E402


def plain(program: str, tests: str) -> bool:
  run = subprocess.run([sys.executable, "-c", f"{program}\n{tests}"], capture_output=True,
                       timeout=60, check=False)
  return run.returncode == 0


def _children_cpu_s() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def timed(name: str, fn, n: int, workers: int) -> None:
  start, cpu = time.perf_counter(), _children_cpu_s()
  passed = sum(fn())
  seconds, cpu = time.perf_counter() - start, _children_cpu_s() - cpu
  print(json.dumps({"way": name, "programs": n, "passed": int(passed), "workers": workers,
                    "seconds": round(seconds, 2), "programs_per_s": round(n / seconds, 1),
                    "cpu_ms_per_program": round(1000 * cpu / n, 1), "cpus": os.cpu_count(),
                    "root": os.geteuid() == 0}), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--mbpp", default="../shared/data/mbpp/mbpp.jsonl")
  parser.add_argument("--limit", type=int, default=None)
  parser.add_argument("--workers", type=int, default=os.cpu_count())
  args = parser.parse_args()
  with open(args.mbpp, encoding="utf-8") as file:
    records = [json.loads(line) for line in file if line.strip()][:args.limit]
  programs = [r["code"] for r in records]
  tests = ["\n".join([r["test_setup_code"], *r["test_list"]]) + "\n" for r in records]
  n, workers = len(records), args.workers

  def run_plain():
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      return list(pool.map(plain, programs, tests))

  timed("plain", run_plain, n, workers)
  timed("sandbox", lambda: [r.passed for r in code.run_programs(
      list(zip(programs, tests)), workers=workers)], n, workers)
  responses = [f"Here it is:\n```python\n{p}\n```\n" for p in programs]
  answers = [mbpp.code_answer("", t) for t in tests]
  timed("reward", lambda: mbpp.code_rewards(responses, [True] * n, answers, workers=workers), n,
        workers)


if __name__ == "__main__":
  main()
