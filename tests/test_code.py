"""The sandboxed executor (proma_jax/tasks/code.py): passes are proven, escapes are contained.

Every MBPP reference solution passes through it; corrupted ones fail with the status that names
why. Each escape a sampled program could try is run for real: an infinite loop, a memory bomb, a
fork bomb, writing outside its directory, reading the trainer's environment, exiting 0 before the
asserts, 100 MB of output, and (as root) the network. The throughput figure is
experiments/bench_sandbox.py's, not a timed test.
"""

import json
import os
import pathlib
import sys
import time

import pytest

from proma_jax.tasks import code
from helpers import mbpp_path

ROOT = os.geteuid() == 0
ADD = "def add(a, b):\n  return a + b\n"
ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"


def test_a_correct_program_passes():
  result = code.run_program(ADD, ADD_TESTS)
  assert (result.passed, result.status, result.message) == (True, "passed", "passed")


@pytest.mark.parametrize("program, status, message", [
    ("def add(a, b):\n  return a - b\n", "failed", "failed AssertionError:  (<tests> line 1)"),
    ("def add(a, b)\n  return a + b\n", "error", "error SyntaxError: expected ':' (<program> "
     "line 1)"),
    ("def plus(a, b):\n  return a + b\n", "error", "error NameError: name 'add' is not defined "
     "(<tests> line 1)"),
    ("def add(a, b):\n  return a / 0\n", "error", "error ZeroDivisionError: division by zero "
     "(<program> line 2)"),
])
def test_a_wrong_program_fails_and_says_why(program, status, message):
  result = code.run_program(program, ADD_TESTS)
  assert (result.passed, result.status, result.message) == (False, status, message)


@pytest.mark.parametrize("exit_call", ["import os\nos._exit(0)", "import sys\nsys.exit(0)",
                                       "raise SystemExit", "import os, signal\n"
                                       "os.kill(os.getpid(), signal.SIGKILL)"])
def test_exiting_before_the_asserts_is_a_failure_whatever_the_exit_code(exit_call):
  result = code.run_program(ADD + exit_call, ADD_TESTS + "assert False\n")
  assert not result.passed and result.status in ("error", "killed"), result


def test_printing_a_pass_marker_or_rebinding_exec_does_not_pass():
  forged = ("import builtins, sys\nprint('passed')\nsys.stderr.write('passed')\n"
            "builtins.exec = lambda *args: None\nbuiltins.compile = lambda *args: None\n")
  result = code.run_program(ADD + forged, "assert False\n")
  assert (result.passed, result.status) == (False, "failed")


def test_setup_runs_before_the_program_and_output_is_kept_truncated():
  result = code.run_program("print(X * 3000)\ndef f():\n  return X\n", "assert f() == 'ab'",
                            setup="X = 'ab'", limits=code.Limits(output_bytes=100))
  assert result.passed
  assert result.stdout == "ab" * 50 + "...[truncated]"


def test_an_infinite_loop_is_killed_at_the_timeout_with_its_process_group():
  start = time.monotonic()
  result = code.run_program("import os\nos.fork()\nwhile True:\n  pass\n", "", timeout_s=1.0)
  assert (result.passed, result.status) == (False, "timeout")
  assert time.monotonic() - start < 60  # not a speed check: a bound that a hang would break


def test_a_memory_bomb_hits_the_address_space_limit():
  result = code.run_program("x = bytearray(8 << 30)\n", "", limits=code.Limits(
      memory_bytes=512 << 20))
  assert (result.passed, result.status) == (False, "error")
  assert "MemoryError" in result.message


def test_a_fork_bomb_hits_the_process_limit():
  bomb = "import os\nwhile True:\n  os.fork()\n"
  start = time.monotonic()
  result = code.run_program(bomb, "", timeout_s=5.0, limits=code.Limits(processes=8))
  assert not result.passed and result.status in ("error", "timeout")
  assert time.monotonic() - start < 120
  if ROOT:  # its own uid: the fork fails at RLIMIT_NPROC, and the leftovers were killed
    assert result.status == "error" and "BlockingIOError" in result.message, result


def test_100_mb_of_output_is_cut_at_the_file_size_limit_and_not_kept(tmp_path):
  result = code.run_program("import sys\nsys.stdout.write('x' * (100 << 20))\n", "",
                            limits=code.Limits(file_bytes=1 << 20, output_bytes=1000))
  assert (result.passed, result.status) == (False, "error")
  assert "File too large" in result.message
  assert len(result.stdout) == 1000 + len("...[truncated]")


def test_the_working_directory_is_fresh_and_removed(tmp_path):
  program = "import os\nopen('left.txt', 'w').write('x')\nCWD = os.getcwd()\n"
  result = code.run_program(program, "assert os.listdir('.') == ['left.txt']\n"
                            "print(CWD)")
  assert result.passed, result
  assert not os.path.exists(result.stdout.strip())


@pytest.mark.skipif(not ROOT, reason="a uid of its own needs root; without it the program runs "
                    "as the trainer's user (documented in proma_jax/tasks/code.py)")
def test_as_root_writing_outside_the_working_directory_is_refused_or_private(tmp_path):
  # /etc is root's: refused. pytest's tmp_path is under /tmp, which the program sees as a fresh
  # tmpfs of its own: not found there, and nothing it writes to /tmp outlives it.
  for target, error in ((pathlib.Path("/etc") / f"proma_jax_escaped_{os.getpid()}",
                         "PermissionError"), (tmp_path / "escaped.txt", "FileNotFoundError")):
    try:
      result = code.run_program(f"open({str(target)!r}, 'w').write('x')\n", "")
      assert error in result.message and not target.exists(), result
    finally:
      if target.exists():
        target.unlink()
  shared = f"/tmp/proma_jax_sandbox_test_{os.getpid()}"
  result = code.run_program(f"open({shared!r}, 'w').write('x')\n", "import os\n"
                            f"assert os.path.exists({shared!r})")
  assert result.passed and "private_tmp" in result.isolation
  assert not os.path.exists(shared)


@pytest.mark.skipif(not ROOT, reason="the sandbox hides the environment from programs, but "
                    "without a uid of its own /proc/<pid>/environ stays readable")
def test_the_parents_environment_is_unreadable(monkeypatch):
  monkeypatch.setenv("PROMA_JAX_SECRET", "hunter2")
  result = code.run_program(
      "import os\nSEEN = os.environ.get('PROMA_JAX_SECRET')\n"
      "try:\n  PARENT = open(f'/proc/{os.getppid()}/environ', 'rb').read()\n"
      "except OSError:\n  PARENT = b''\n"
      f"try:\n  TRAINER = open('/proc/{os.getpid()}/environ', 'rb').read()\n"
      "except OSError:\n  TRAINER = b''\n",
      "assert SEEN is None\nassert b'hunter2' not in PARENT + TRAINER\n"
      "assert sorted(os.environ) == ['HOME', 'LANG', 'PATH'], sorted(os.environ)")
  assert result.passed, result
  assert set(result.isolation) == {"uid", "network", "private_tmp"}


@pytest.mark.skipif(not ROOT, reason="a network namespace needs root here")
def test_as_root_there_is_no_network():
  result = code.run_program(
      "import socket\ns = socket.socket()\ns.settimeout(2)\n"
      "try:\n  s.connect(('1.1.1.1', 80))\n  REACHED = True\nexcept OSError:\n  REACHED = False\n",
      "assert not REACHED")
  assert result.passed, result


def test_as_root_an_interpreter_the_uid_cannot_read_is_refused_not_run_as_root():
  home = os.path.dirname(os.path.realpath(sys.executable))
  while home != "/" and os.stat(home).st_mode & 0o001:
    home = os.path.dirname(home)
  if not ROOT or home == "/":
    pytest.skip("needs root and a test interpreter under a directory other users cannot enter")
  with pytest.raises(code.SandboxError, match="cannot run sandboxed programs under an "
                     "unprivileged uid"):
    code.run_program(ADD, ADD_TESTS, python=sys.executable)


def test_results_keep_the_order_of_the_jobs_and_bad_arguments_are_refused():
  jobs = [(f"def f():\n  return {i}\n", f"assert f() == {i if i % 2 else -1}") for i in range(6)]
  assert [r.passed for r in code.run_programs(jobs, workers=3)] == [False, True] * 3
  assert code.run_programs([]) == []
  with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
    code.run_programs(jobs, workers=0)
  with pytest.raises(ValueError, match="2 jobs but 1 setups"):
    code.run_programs(jobs[:2], setups=[""])
  with pytest.raises(TypeError, match="program must be a str"):
    code.run_program(b"x = 1", "")
  with pytest.raises(ValueError, match="Limits.timeout_s must be > 0"):
    code.Limits(timeout_s=0)


def _mbpp_records():
  with open(mbpp_path(), encoding="utf-8") as file:
    return [json.loads(line) for line in file if line.strip()]


@pytest.mark.slow
def test_every_mbpp_reference_solution_passes_and_corrupted_ones_fail():
  records = _mbpp_records()
  assert len(records) == 974
  tests = ["\n".join([r["test_setup_code"], *r["test_list"]]) for r in records]
  results = code.run_programs([(r["code"], t) for r, t in zip(records, tests)], workers=2)
  failed = [(r["task_id"], res.message) for r, res in zip(records, results) if not res.passed]
  assert not failed, failed[:5]
  sample = records[::97]
  broken = {
      # A wrong return value: every function's return statements return None instead.
      "failed": [r["code"].replace("return ", "return None and ") for r in sample],
      "error": [r["code"] + "\ndef (:\n" for r in sample],  # a syntax error
  }
  for status, programs in broken.items():
    results = code.run_programs([(p, t) for p, t in zip(programs, tests[::97])], workers=2)
    assert all(not res.passed for res in results), [res.message for res in results]
    assert sum(res.status == status for res in results) >= len(sample) - 2, results
  missing = code.run_programs([("", t) for t in tests[::97]], workers=2)  # no function at all
  assert all(res.status == "error" and "NameError" in res.message for res in missing)
