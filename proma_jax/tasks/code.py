"""Running untrusted Python programs against their tests, and reading code out of a response.

`run_program(program, tests)` runs `program` then `tests` (assert statements, or a `check`
function and its call) in a sandboxed child interpreter and says whether every test passed;
`run_programs` runs many at once, within a bound. The reward of the code tasks (`tasks.mbpp`)
is 1 iff `run_program(...).passed`.

What the sandbox does, for every program:
  - its own session and process group, killed as a whole (SIGKILL) when the wall-clock timeout
    passes;
  - a fresh temporary working directory, removed afterwards; no stdin; an environment of PATH,
    HOME (the working directory) and LANG alone; `python -I`;
  - resource limits: CPU seconds, address space, file size (stdout and stderr are files under it),
    processes, open files, no core dumps; privilege gain forbidden (PR_SET_NO_NEW_PRIVS);
  - a pass is proven: the harness writes `<nonce> passed` to a private pipe after the last test
    statement, with a nonce drawn per run. os._exit(0), sys.exit(0), `raise SystemExit`, a signal
    or an exception before then is a failure, whatever the exit code.
When the parent runs as root (as in the containers we train in), also:
  - a uid of its own per concurrent job (`uid_base` + slot, a lock file per slot across
    processes): the program cannot read or write files of other users (the checkout, other jobs'
    directories, /proc/<pid>/environ of the trainer), cannot signal their processes, and
    RLIMIT_NPROC counts its processes alone; processes it leaves behind are killed at the end of
    the run, and at the start of the next job on that uid;
  - new network and mount namespaces: no network (a down loopback only), and fresh tmpfs over
    /tmp, /var/tmp, /dev/shm and /run/lock, so nothing it writes outlives it.
`ExecutionResult.isolation` lists which of "uid", "network" and "private_tmp" held for a run.

What it does not protect against (say so to anyone running it elsewhere):
  - without root there is no uid of its own and no namespaces: the program runs as the trainer's
    user, can read what that user can read (the checkout, ~), signal the trainer, and reach the
    network; only the limits, the working directory, the scrubbed environment and the timeout
    apply;
  - it is not a security boundary against a kernel exploit or a deliberately hostile program (no
    seccomp filter, no container, no gVisor): run it on a machine whose compromise is acceptable;
  - a program written to defeat the harness from inside the interpreter (objects whose __eq__
    is always True, reading the nonce from the harness's memory) can fake a pass: the sandbox
    contains damage, it does not prove the program honest. Look at what the policy writes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Iterator, Sequence

STATUSES = ("passed", "failed", "error", "timeout", "killed")
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_runner.py")
# An interpreter a dropped uid can run: root's own (e.g. under /root/.pyenv) may be unreadable.
SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")
LOCK_DIR = os.path.join(tempfile.gettempdir(), "proma_jax_sandbox_slots")


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-program resource limits. `timeout_s` is wall-clock; the CPU limit is its ceiling + 1."""

  timeout_s: float = 10.0
  memory_bytes: int = 1 << 30
  file_bytes: int = 16 << 20
  processes: int = 16
  open_files: int = 64
  tmpfs_bytes: int = 16 << 20
  output_bytes: int = 4096   # kept of each of stdout and stderr

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not value > 0:
        raise ValueError(f"Limits.{field.name} must be > 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
  """How one program fared.

  passed:    every test statement ran without raising (the harness's nonce line was read).
  status:    "passed"; "failed" (an AssertionError); "error" (anything else raised, a syntax
             error, a missing function, SystemExit, or the interpreter exited before the tests
             finished); "timeout" (killed at the wall-clock limit); "killed" (ended by a signal,
             e.g. the CPU limit).
  message:   the harness's one-line account, e.g. "failed AssertionError:  (<tests> line 2)".
  stdout, stderr: at most `Limits.output_bytes` of each (the beginning), decoded leniently.
  isolation: which of "uid", "network", "private_tmp" held (empty without root).
  """

  passed: bool
  status: str
  message: str
  stdout: str
  stderr: str
  isolation: tuple[str, ...]


def _check_text(name: str, value) -> None:
  if not isinstance(value, str):
    raise TypeError(f"{name} must be a str, got {type(value).__name__}")
  if "\x00" in value:
    raise ValueError(f"{name} contains a NUL character")


def run_program(program: str, tests: str, *, setup: str = "", limits: Limits | None = None,
                timeout_s: float | None = None, python: str | None = None,
                uid_base: int = 61000) -> ExecutionResult:
  """Runs `setup`, `program`, then `tests` in a sandboxed interpreter (module docstring).

  `setup` is prepended to the program (MBPP's test_setup_code). `timeout_s` overrides
  `limits.timeout_s`. `python` is the interpreter (default: `default_python()`); `uid_base` the
  first uid of the per-job uids used when running as root.
  """
  for name, value in (("program", program), ("tests", tests), ("setup", setup)):
    _check_text(name, value)
  limits = limits or Limits()
  if timeout_s is not None:
    limits = dataclasses.replace(limits, timeout_s=timeout_s)
  source = f"{setup}\n{program}" if setup else program
  python = python or default_python()
  if os.geteuid() == 0:
    _check_runs_unprivileged(python, uid_base)
  return _run_program(source, tests, limits, python, uid_base)


def _run_program(source: str, tests: str, limits: Limits, python: str,
                 uid_base: int) -> ExecutionResult:
  with contextlib.ExitStack() as stack:
    uid = stack.enter_context(_uid_slot(uid_base)) if os.geteuid() == 0 else None
    # base/ (0711: passable, not listable) holds the job file and the outputs; base/work/ is
    # the program's directory.
    base = tempfile.mkdtemp(prefix="proma_jax_sandbox_")
    stack.callback(shutil.rmtree, base, ignore_errors=True)
    os.chmod(base, 0o711)
    os.mkdir(os.path.join(base, "work"), 0o700)
    return _run_in(base, source, tests, limits, uid, python)


def run_programs(jobs: Sequence[tuple[str, str]], *, setups: Sequence[str] | None = None,
                 workers: int | None = None, **kwargs) -> list[ExecutionResult]:
  """`run_program(program, tests, setup=...)` for each (program, tests) of `jobs`, at most
  `workers` at a time (default: the number of CPUs), results in the order of `jobs`."""
  setups = setups if setups is not None else [""] * len(jobs)
  if len(setups) != len(jobs):
    raise ValueError(f"{len(jobs)} jobs but {len(setups)} setups")
  workers = (os.cpu_count() or 1) if workers is None else workers
  if workers < 1:
    raise ValueError(f"workers must be >= 1, got {workers}")
  if not jobs:
    return []
  run = functools.partial(run_program, **kwargs)
  with concurrent.futures.ThreadPoolExecutor(min(workers, len(jobs))) as pool:
    return list(pool.map(lambda job, setup: run(*job, setup=setup), jobs, setups))


def default_python() -> str:
  """The interpreter for sandboxed programs: as root, the system Python 3 (readable by any uid);
  otherwise this one."""
  if os.geteuid() == 0:
    for path in SYSTEM_PYTHONS:
      if os.access(path, os.X_OK) and os.stat(os.path.realpath(path)).st_mode & 0o005 == 0o005:
        return path
  return sys.executable


class SandboxError(RuntimeError):
  """The sandbox cannot run programs as it must (e.g. no interpreter an unprivileged uid can run)."""


@functools.lru_cache(maxsize=None)
def _check_runs_unprivileged(python: str, uid_base: int) -> None:
  """As root, programs run under a uid of their own, which must be able to run `python` and
  import its standard library; checked once per interpreter with a probe program. Raises
  SandboxError rather than run untrusted code as root."""
  probe = _run_program("import collections, ctypes, functools, heapq, itertools, math, re\n",
                       "", Limits(), python, uid_base)
  if not probe.passed or "uid" not in probe.isolation:
    raise SandboxError(
        f"{python} cannot run sandboxed programs under an unprivileged uid ({probe.message}; "
        f"stderr: {probe.stderr.strip()[-300:]!r}): as root the sandbox needs an interpreter "
        "whose files any user can read, e.g. the system python3 (apt-get install python3), "
        "passed as python=...")


@contextlib.contextmanager
def _uid_slot(uid_base: int, slots: int = 1024) -> Iterator[int]:
  """A uid no other job of any process on this machine holds, for the duration (flock)."""
  os.makedirs(LOCK_DIR, mode=0o700, exist_ok=True)
  start = secrets.randbelow(slots)
  for i in range(slots):
    uid = uid_base + (start + i) % slots
    handle = open(os.path.join(LOCK_DIR, str(uid)), "a")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.close()
      continue
    try:
      yield uid
    finally:
      handle.close()
    return
  raise RuntimeError(f"all {slots} sandbox uids from {uid_base} are in use")


def _run_in(base: str, program: str, tests: str, limits: Limits, uid: int | None,
            python: str) -> ExecutionResult:
  nonce = secrets.token_hex(16)
  read_fd, write_fd = os.pipe()
  workdir, job_file = os.path.join(base, "work"), os.path.join(base, "job.json")
  job = dict(program=program, tests=tests, nonce=nonce, uid=uid, result_fd=write_fd,
             cpu_seconds=int(limits.timeout_s) + 1, memory_bytes=limits.memory_bytes,
             file_bytes=limits.file_bytes, processes=limits.processes,
             open_files=limits.open_files, tmpfs_bytes=limits.tmpfs_bytes)
  with open(os.open(job_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w",
            encoding="utf-8") as file:
    json.dump(job, file)
  out_path, err_path = (os.path.join(base, name) for name in ("stdout", "stderr"))
  try:
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
      process = subprocess.Popen(  # pylint: disable=consider-using-with
          [python, "-I", RUNNER, job_file], cwd=workdir, stdin=subprocess.DEVNULL, stdout=out,
          stderr=err, pass_fds=(write_fd,), start_new_session=True,
          env={"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"})
    os.close(write_fd)
    write_fd = None
    timed_out = _wait(process, limits.timeout_s)
    report = _read_pipe(read_fd, 1 << 16)
  finally:
    for fd in (read_fd, write_fd):
      if fd is not None:
        os.close(fd)
  return _result(report, nonce, process.returncode, timed_out,
                 _head(out_path, limits.output_bytes), _head(err_path, limits.output_bytes))


def _wait(process: subprocess.Popen, timeout_s: float) -> bool:
  """Waits for the process; past the timeout kills its process group. Whether it timed out."""
  try:
    process.wait(timeout=timeout_s)
    return False
  except subprocess.TimeoutExpired:
    with contextlib.suppress(ProcessLookupError, PermissionError):
      os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return True


def _read_pipe(fd: int, limit: int) -> str:
  """What the harness wrote, up to `limit` bytes. The write end is closed everywhere once the
  process group is gone; a leftover child holding it (a fork) is cut short by non-blocking reads."""
  os.set_blocking(fd, False)
  chunks, size = [], 0
  while size < limit:
    try:
      chunk = os.read(fd, limit - size)
    except BlockingIOError:
      break
    if not chunk:
      break
    chunks.append(chunk)
    size += len(chunk)
  return b"".join(chunks).decode("utf-8", "replace")


def _head(path: str, limit: int) -> str:
  try:
    with open(path, "rb") as file:
      data = file.read(limit + 1)
  except OSError:
    return ""
  text = data[:limit].decode("utf-8", "replace")
  return text + ("...[truncated]" if len(data) > limit else "")


def _result(report: str, nonce: str, returncode: int, timed_out: bool, stdout: str,
            stderr: str) -> ExecutionResult:
  lines = report.splitlines()
  isolation = ()
  if lines and lines[0].startswith("ready "):
    with contextlib.suppress(ValueError):
      isolation = tuple(json.loads(lines[0][len("ready "):]))
  verdicts = [line for line in lines[1:] if line.startswith(("failed ", "error "))]
  if timed_out:
    status, message = "timeout", "killed at the wall-clock limit"
  elif f"{nonce} passed" in lines[1:]:
    status, message = "passed", "passed"
  elif verdicts:
    status, message = verdicts[-1].split(" ", 1)[0], verdicts[-1]
  elif returncode < 0:
    try:
      name = signal.Signals(-returncode).name
    except ValueError:
      name = str(-returncode)
    status, message = "killed", f"killed by signal {name}"
  else:
    status, message = "error", f"exited with code {returncode} before the tests finished"
  return ExecutionResult(status == "passed", status, message, stdout, stderr, isolation)
