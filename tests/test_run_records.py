"""Run records: resume refuses a changed config, metrics.jsonl survives SIGTERM and SIGKILL, one run
per workdir.

The command-line test stops a real `python -m proma_jax.train` with SIGTERM, then with SIGKILL;
the others call
`train.run` in this process (the warm start of conftest's `warm_dir` and the compiled trainer
are shared with tests/test_train.py).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from proma_jax import run_records, train
from proma_jax.checkpoint import IncompatibleCheckpointError
from helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_bytes(path):
  with open(path, "rb") as f:
    return f.read()


def logged_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


def lock_is_free(workdir):
  try:
    with run_records.workdir_lock(str(workdir)):
      return True
  except run_records.WorkdirLockedError:
    return False


# ---------------------------------------------------------------------------------------------
# Pieces (no training).


def test_config_changes_names_nested_missing_and_retyped_fields():
  old = {"algorithm": "proma", "optim": {"lr": 3e-4, "b1": 0.9}, "model": {"d_model": 64},
         "proma": {"relative_bound": None}, "gone": 1}
  new = {"algorithm": "grpo", "optim": {"lr": 1e-3, "b1": 0.9}, "model": {"d_model": 64.0},
         "proma": {"relative_bound": 0.5}, "added": {"x": True}}
  assert run_records.config_changes(old, new) == {
      "algorithm": ("proma", "grpo"), "optim.lr": (3e-4, 1e-3),
      "proma.relative_bound": (None, 0.5), "gone": (1, "<absent>"),
      "added": ("<absent>", {"x": True})}
  assert run_records.config_changes(new, new) == {}


def test_resume_accepts_task_fields_added_at_the_value_their_absence_meant(tmp_path):
  """configs/qwen3_gsm8k.py gained task_kwargs.too_long ("error") and hf_dataset (None): a run
  recorded before them resumes under the config that has them at those values; any other value
  is a change, named as before."""
  new = {"task": "gsm8k", "task_kwargs": {"train_path": "t.jsonl", "too_long": "error",
                                          "hf_dataset": None}}
  old = {"task": "gsm8k", "task_kwargs": {"train_path": "t.jsonl"}}
  (tmp_path / "run.json").write_text(json.dumps({"config": old}))
  assert run_records.check_resume_config(str(tmp_path), new, False)[1] == {}
  skip = {**new, "task_kwargs": {**new["task_kwargs"], "too_long": "skip"}}
  with pytest.raises(run_records.ConfigChangedError, match=r'config\.task_kwargs\.too_long: "<absent>" '
                                                     r'-> "skip"'):
    run_records.check_resume_config(str(tmp_path), skip, False)


def test_truncate_metrics_keeps_the_checkpointed_prefix_byte_for_byte(tmp_path):
  path = tmp_path / "metrics.jsonl"
  head = b'{"step": 0, "val/accuracy": 0.5}\n{"step": 1, "loss": 1.25}\n{"step": 2, "loss": 0.5}\n'
  after = b'{"step": 3, "loss": 0.25}\nnot json\n{"no_step": 1}\n{"step": 4, "lo'
  path.write_bytes(head + after)
  assert run_records.truncate_metrics(str(path), 2) == 4  # steps 3, the junk, the no-step, the partial
  assert path.read_bytes() == head
  assert run_records.truncate_metrics(str(path), 2) == 0  # idempotent, file untouched
  assert path.read_bytes() == head
  path.write_bytes(head + b'{"step": 3, "lo')       # only a line cut short by a kill
  run_records.truncate_metrics(str(path), 3)
  assert path.read_bytes() == head
  run_records.truncate_metrics(str(path), None)           # nothing restored: the run starts over
  assert path.read_bytes() == b""
  assert run_records.truncate_metrics(str(tmp_path / "absent.jsonl"), 3) == 0


def _hold_lock(workdir):
  """A subprocess holding `workdir`'s lock until its stdin closes."""
  code = ("import sys; from proma_jax import run_records\n"
          f"with run_records.workdir_lock({str(workdir)!r}):\n"
          "  print('locked', flush=True); sys.stdin.read()\n")
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "locked"
  return proc


def test_second_run_on_a_locked_workdir_fails_at_once_naming_the_holder(tmp_path):
  """While another process holds the workdir, run() refuses before touching anything in it."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = _hold_lock(workdir)
  try:
    c = tiny_config("proma", tmp_path / "warm_never_created")
    start = time.perf_counter()
    with pytest.raises(train.WorkdirLockedError, match=rf"in use by another run \(pid {holder.pid} "):
      train.run(c, str(workdir), progress=False)
    assert time.perf_counter() - start < 5
    assert sorted(os.listdir(workdir)) == [".lock"]
    assert not (tmp_path / "warm_never_created").exists()
    assert not lock_is_free(workdir)
  finally:
    holder.stdin.close()
    holder.wait(timeout=600)
  assert lock_is_free(workdir)  # released by the holder's exit


# ---------------------------------------------------------------------------------------------
# In-process runs.


@pytest.mark.slow
def test_resume_refuses_a_changed_config_unless_allowed(warm_dir, tmp_path):
  """A finished proma workdir rerun as grpo with another lr is refused, naming both fields, and
  nothing in the workdir changes; steps and checkpoint/eval cadence may change; an explicit
  allow_config_change continues under the new config and records the change in run.json."""
  workdir = str(tmp_path / "run")
  train.run(tiny_config("proma", warm_dir, steps=2), workdir, progress=False)
  run_json, metrics = read_bytes(f"{workdir}/run.json"), read_bytes(f"{workdir}/metrics.jsonl")

  changed = tiny_config("grpo", warm_dir, steps=3)
  changed.optim.lr = 1e-3
  with pytest.raises(train.ConfigChangedError) as error:
    train.run(changed, workdir, progress=False)
  message = str(error.value)
  assert 'config.algorithm: "proma" -> "grpo"' in message
  assert "config.optim.lr: 0.0003 -> 0.001" in message
  assert "config.steps" not in message and "--allow_config_change" in message
  assert read_bytes(f"{workdir}/run.json") == run_json  # a refused attempt leaves no trace
  assert read_bytes(f"{workdir}/metrics.jsonl") == metrics
  assert lock_is_free(workdir)

  extended = tiny_config("proma", warm_dir, steps=3)  # run-time fields only
  extended.checkpoint.update(every=2, max_to_keep=2)
  extended.eval.every = 3
  assert [r["step"] for r in train.run(extended, workdir, progress=False)] == [3]
  meta = json.load(open(f"{workdir}/run.json"))
  assert meta["config"]["steps"] == 3 and "config_changes" not in meta

  relearned = tiny_config("proma", warm_dir, steps=4)
  relearned.optim.lr = 1e-3
  with pytest.raises(train.ConfigChangedError, match=r"config\.optim\.lr: 0\.0003 -> 0\.001"):
    train.run(relearned, workdir, progress=False)
  assert [r["step"] for r in train.run(relearned, workdir, progress=False,
                                       allow_config_change=True)] == [4]
  meta = json.load(open(f"{workdir}/run.json"))
  assert meta["lr"] == meta["config"]["optim"]["lr"] == 1e-3
  assert meta["config_changes"] == [{"step": 3, "changes": {"optim.lr": [3e-4, 1e-3]}}]
  assert logged_steps(workdir) == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_failed_attempt_does_not_rewrite_run_json(warm_dir, tmp_path):
  """An allowed change that the checkpoint cannot take (another model shape) fails at restore and
  leaves run.json and metrics.jsonl as they were."""
  workdir = str(tmp_path / "run")
  train.run(tiny_config("proma", warm_dir, steps=1), workdir, progress=False)
  run_json, metrics = read_bytes(f"{workdir}/run.json"), read_bytes(f"{workdir}/metrics.jsonl")
  wider = tiny_config("proma", warm_dir, steps=2)
  wider.model.mlp_dim = 32
  wider.sft.steps = 5  # its own (short) warm start
  with pytest.raises(IncompatibleCheckpointError):
    train.run(wider, workdir, progress=False, allow_config_change=True)
  assert read_bytes(f"{workdir}/run.json") == run_json
  assert read_bytes(f"{workdir}/metrics.jsonl") == metrics
  assert lock_is_free(workdir)


@pytest.mark.slow
def test_fresh_start_empties_a_leftover_metrics_file(warm_dir, tmp_path):
  """A workdir with metrics but no checkpoint (killed before its first one) starts over: the
  file holds exactly the new run's records."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text('{"step": 0, "val/accuracy": 0.25}\n{"step": 1, "lo')
  records = train.run(tiny_config("proma", warm_dir, steps=2), str(workdir), progress=False)
  assert read_bytes(workdir / "metrics.jsonl") == b"".join(
      json.dumps(r).encode() + b"\n" for r in records)
  assert [r["step"] for r in records] == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# The command line: SIGKILL, resume, a concurrent second run, a refused config.


FLAGS = ["--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.n_heads=2",
         "--config.model.n_kv_heads=1", "--config.model.mlp_dim=64",
         "--config.rollout.prompts_per_step=8", "--config.rollout.group_size=2",
         "--config.train.num_minibatches=2", "--config.train.num_microbatches=2",
         "--config.sft.steps=200", "--config.sft.batch_size=32", "--config.sft.lr=3e-3",
         "--config.eval.num_examples=8", "--config.eval.every=2", "--config.checkpoint.every=3"]
_TIME_VALUE = re.compile(rb'("time/[a-z_]+": )[-+0-9.eE]+')


def cli(workdir, warm, steps, *extra):
  return [sys.executable, "-m", "proma_jax.train", "--config=configs/reverse.py:reinforce",
          f"--workdir={workdir}", f"--config.steps={steps}", f"--config.sft.checkpoint_dir={warm}",
          *FLAGS, *extra]


def checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


@pytest.mark.slow
def test_signals_then_resume_leave_the_uninterrupted_metrics_file(warm_dir, tmp_path):
  """SIGTERM mid-run checkpoints the finished step and exits 143; rerunning resumes from it.
  SIGKILL that run later, leave a line cut short, resume: metrics.jsonl equals an uninterrupted
  run's byte for byte, time/* values aside. A second run started while the first holds the
  workdir fails at once naming its pid; a changed config is refused naming the field."""
  warm, killed, reference = warm_dir, tmp_path / "killed", tmp_path / "reference"
  # The processes share compiled programs through the run's JAX cache (tests/conftest.py).
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  start = lambda: subprocess.Popen(cli(killed, warm, 10_000), cwd=REPO, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 1800  # no tight limit: a busy machine must not fail the test

  def wait_for_steps(proc, n):
    while not (os.path.exists(killed / "metrics.jsonl") and len(logged_steps(killed)) >= n):
      assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
      time.sleep(0.02)

  proc = start()
  try:
    wait_for_steps(proc, 3)
  finally:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=1800)
  assert proc.returncode == 128 + signal.SIGTERM, out
  terminated = max(logged_steps(killed))
  assert terminated >= 2 and checkpoint_steps(killed)[-1] == terminated

  proc = start()
  try:
    while not (os.path.exists(killed / ".lock") and (killed / ".lock").read_text()):
      assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
      time.sleep(0.1)
    second = subprocess.run(cli(killed, warm, 5, "--allow_config_change"), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=1800)
    assert second.returncode == 1, second.stdout + second.stderr
    assert f"in use by another run (pid {proc.pid} " in second.stderr
    assert proc.poll() is None  # the first run goes on
    wait_for_steps(proc, terminated + 3)
  finally:
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
  assert f"resuming {killed} from step {terminated}" in out
  assert proc.returncode == -signal.SIGKILL
  last_checkpoint = checkpoint_steps(killed)[-1]
  steps = max(logged_steps(killed)) + 3
  with open(killed / "metrics.jsonl", "ab") as f:  # as if killed in the middle of a write
    f.write(b'{"step": %d, "loss": 0.0' % (steps - 2))

  ref = subprocess.run(cli(reference, warm, steps), cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=1800)
  assert ref.returncode == 0, ref.stdout + ref.stderr
  resumed = subprocess.run(cli(killed, warm, steps), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=1800)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert f"resuming {killed} from step {last_checkpoint}" in resumed.stdout

  expected = read_bytes(reference / "metrics.jsonl")
  got = read_bytes(killed / "metrics.jsonl")
  assert logged_steps(killed) == list(range(steps + 1))
  assert _TIME_VALUE.sub(rb"\1T", got) == _TIME_VALUE.sub(rb"\1T", expected)
  assert _TIME_VALUE.search(got)  # the masking did mask something

  run_json = read_bytes(killed / "run.json")
  refused = subprocess.run(cli(killed, warm, steps + 2, "--config.optim.lr=1e-3"), cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=1800)
  assert refused.returncode == 1
  assert "config.optim.lr: 0.0003 -> 0.001" in refused.stderr, refused.stderr
  assert read_bytes(killed / "run.json") == run_json
  assert read_bytes(killed / "metrics.jsonl") == got
