"""The training CLI: command-line overrides, SIGTERM checkpoints and exits, rerunning resumes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The model and batch of tests/test_run_records.py's CLI runs, so the two share compiled programs
# through the run's compilation cache (tests/conftest.py).
TINY = ["--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.n_heads=2",
        "--config.model.n_kv_heads=1", "--config.model.mlp_dim=64",
        "--config.rollout.prompts_per_step=8", "--config.rollout.group_size=2",
        "--config.train.num_minibatches=2", "--config.train.num_microbatches=2",
        "--config.sft.steps=20", "--config.sft.batch_size=32", "--config.eval.num_examples=8",
        "--config.checkpoint.every=1000"]


def cli(workdir, warm, steps):
  return [sys.executable, "-m", "proma_jax.train", "--config=configs/reverse.py:reinforce",
          f"--workdir={workdir}", f"--config.steps={steps}", f"--config.sft.checkpoint_dir={warm}",
          *TINY]


def steps_logged(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line)["step"] for line in f if line.strip()]


@pytest.mark.slow
def test_sigterm_checkpoints_then_rerun_resumes(tmp_path):
  """SIGTERM mid-run saves a checkpoint of the finished step and exits 143; rerunning resumes."""
  workdir, warm = tmp_path / "run", tmp_path / "warm"
  proc = subprocess.Popen(cli(workdir, warm, 10_000), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while len(steps_logged(workdir)) < 3 and time.time() < deadline and proc.poll() is None:
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, out
  done = max(steps_logged(workdir))
  assert done >= 2
  assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())[-1] == done
  rerun = subprocess.run(cli(workdir, warm, done + 1), cwd=REPO, capture_output=True, text=True,
                         timeout=240)
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  assert f"resuming {workdir} from step {done}" in rerun.stdout
  assert steps_logged(workdir)[-1] == done + 1
