"""The command-line entry points: flags only, and the errors a user can fix as one line naming the
field or file, with no traceback (an unexpected exception keeps its traceback)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("module", ["proma_jax.train", "proma_jax.sft"])
def test_stray_positional_arguments_are_refused(module, tmp_path):
  """An unquoted workdir with a space leaves a stray word: refused, not silently ignored."""
  args = ["--config=configs/reverse.py:grpo", "extra"]
  if module == "proma_jax.train":
    args.append(f"--workdir={tmp_path}/my")
  proc = run(module, *args)
  assert proc.returncode != 0
  assert "unexpected positional argument(s) ['extra']" in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not os.listdir(tmp_path)


def test_config_errors_are_one_line_naming_the_field(tmp_path):
  proc = run("proma_jax.train", "--config=configs/reverse.py:grpo", f"--workdir={tmp_path}/run",
             "--config.train.num_microbatches=0")
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config.train.num_microbatches:"), last


def test_a_broken_checkpoint_is_one_line_naming_the_file(tmp_path):
  """A pretrained run whose checkpoint directory has a garbled config.json."""
  directory = tmp_path / "ckpt"
  directory.mkdir()
  (directory / "config.json").write_text("{not json")
  proc = run("proma_jax.train", "--config=configs/smollm2_arith.py:grpo",
             f"--workdir={tmp_path}/run", f"--config.model.checkpoint={directory}")
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "config.json: unreadable config" in last, last
