"""The README's code blocks marked `<!-- tested -->` run as written, and so do the commands of its
"Training from a config" section."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCKS = re.findall(r"<!-- tested -->\s*```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_tested_blocks():
  """README carries at least one tested snippet (so the test below cannot pass vacuously)."""
  assert BLOCKS


@pytest.mark.parametrize("code", BLOCKS)
def test_readme_snippet_runs(code):
  """Each tested README snippet executes without error."""
  exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


# ---------------------------------------------------------------------------------------------
# The commands of "Training from a config", run as written plus overrides that make them tiny.

SECTION = re.search(r"^## Training from a config\n(.*?)^##? ", README.read_text(), re.S | re.M)[1]
# Appended to every training command (the last value of a repeated flag wins): one RL step of a
# tiny rollout, a 2-step warm start, few evaluation prompts.
TINY = ["--config.steps=1", "--config.sft.steps=2", "--config.sft.batch_size=8",
        "--config.eval.num_examples=4", "--config.rollout.prompts_per_step=2",
        "--config.rollout.group_size=2", "--config.train.num_minibatches=1",
        "--config.train.num_microbatches=2"]


def section_commands() -> list[list[str]]:
  """The shell commands of the section's ```bash blocks (continuations joined, comments cut)."""
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", SECTION, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      if line.split("#")[0].strip():
        commands.append(shlex.split(line, comments=True))
  return commands


def test_section_documents_each_route():
  """The section shows the warm start, a training run on a built-in task and one on your own JSONL
  data through configs/jsonl.py, and the report command; every config it names exists."""
  commands = [" ".join(command) for command in section_commands()]
  assert any("-m proma_jax.sft" in c for c in commands)
  assert any("-m proma_jax.train --config=configs/reverse.py" in c for c in commands)
  assert any("--config=configs/jsonl.py" in c and "--config.task_kwargs.train_path=my.jsonl" in c
             for c in commands)
  assert "python -m proma_jax.report RUN_DIR... --out DIR" in SECTION
  for config in set(re.findall(r"configs/(\w+)\.py", SECTION)) - {"<task>"}:
    assert (REPO / "configs" / f"{config}.py").exists(), config


def _run(command: list[str], cwd: pathlib.Path, returncode: int = 0) -> subprocess.CompletedProcess:
  # A compilation cache shared by the commands of one test: programs they have in common (the warm
  # start step, sampling) compile once.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", 
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=1800, env=env)
  assert (result.returncode == 0) == (returncode == 0), (
      f"{shlex.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
  return result


def _user_checkout(path: pathlib.Path, records: list[dict]) -> pathlib.Path:
  """`path` set up as a user's working directory: the repository's configs/ and a my.jsonl."""
  (path / "configs").symlink_to(REPO / "configs")
  (path / "my.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


# Reversal records whose longest prompt and answer match configs/reverse.py's widths (lengths up
# to 6), so the two training commands share their warm-start and sampling programs.
MY_RECORDS = [{"prompt": f"rev:{w}=", "answer": w[::-1]} for w in (
    "ab", "abc", "xyz", "hello", "cat", "dog", "jax", "moon", "abcdef", "tree")]


@pytest.mark.slow
def test_section_commands_run_as_written(tmp_path):
  """Each command of the section runs, in order, in a directory holding `configs/` and a
  `my.jsonl` (as a user's checkout would), with TINY appended; then the report command on the
  run directories they made."""
  _user_checkout(tmp_path, MY_RECORDS)
  workdirs = []
  for command in section_commands():
    assert command[0].endswith("python") and command[1] == "-m", command
    out = _run([sys.executable, *command[1:], *TINY], tmp_path).stdout
    workdirs += [arg.split("=", 1)[1] for arg in command if arg.startswith("--workdir=")]
    if "proma_jax.train" in command:
      assert (tmp_path / workdirs[-1] / "run.json").exists(), out
  assert len(workdirs) >= 2
  report = SECTION.split("`python -m proma_jax.report ")[1].split("`")[0].split()
  report = [arg for arg in report if arg != "RUN_DIR..."]
  report = [str(tmp_path / "results") if arg == "DIR" else arg for arg in report]
  out = _run([sys.executable, "-m", "proma_jax.report", *workdirs, *report], tmp_path).stdout
  assert all(algorithm in out for algorithm in ("proma", "grpo"))
  assert (tmp_path / "results" / "curves.png").exists()
  assert json.loads((tmp_path / "runs/my_grpo/run.json").read_text())["task"] == "jsonl"


def test_jsonl_route_rejects_a_too_long_record_before_anything_runs(tmp_path):
  """The documented JSONL command on a file with one 3000-character prompt fails at once, naming
  the file, line, length and maximum: no warm start is trained, no run.json written."""
  records = MY_RECORDS[:5] + [{"prompt": "rev:" + "a" * 2995 + "=", "answer": "a"}] + MY_RECORDS
  _user_checkout(tmp_path, records)
  command = next(c for c in section_commands() if "--config=configs/jsonl.py:grpo" in c)
  result = _run([sys.executable, *command[1:], *TINY], tmp_path, returncode=1)
  assert ("my.jsonl, line 6: prompt is 3001 tokens (BOS included) > max_prompt_tokens 256"
          in result.stderr), result.stderr
  assert "warm start" not in result.stdout
  assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "runs/my_grpo/run.json").exists()
