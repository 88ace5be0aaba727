"""The process that runs one untrusted program and its tests (started by `code.run_program`).

Standard library only, and run with `python -I` (no user site-packages, no script directory on
sys.path, PYTHON* variables ignored), so the program under test imports nothing of proma_jax.
Usage: `python -I sandbox_runner.py JOB_FILE`, in the job's working directory (JOB_FILE is outside
it, in a directory only root can list), with fd RESULT_FD (from the job) open for writing.

Steps, in order:
  1. read the job (program, tests, nonce, limits, uid) from JOB_FILE and delete the file;
  2. if started as root with a uid to become: enter new network and mount namespaces (no network
     interface but a down loopback; fresh size-limited tmpfs over the world-writable directories),
     make the working directory the uid's, drop to that uid (groups cleared) and kill every
     process left under it by an earlier job;
  3. forbid privilege gain (PR_SET_NO_NEW_PRIVS) and set the resource limits;
  4. write "ready <isolation>" to the result fd, exec the program, then the tests, in one fresh
     namespace (`__name__` is "__sandbox__", so `if __name__ == "__main__":` blocks do not run);
  5. write "<nonce> passed" once the last test statement has run, or "failed <message>" (an
     AssertionError) / "error <message>" (anything else raised, SystemExit included);
  6. with a dropped uid, kill the uid's other processes (what the program forked), then exit.

A program that exits by itself (os._exit, a signal) never writes the nonce line, so it fails.
"""

import builtins
import ctypes
import json
import os
import resource
import signal
import sys
import traceback

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
PR_SET_NO_NEW_PRIVS = 38
# World-writable directories a program could otherwise leave files in.
SHARED_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
# Bound before the program runs, so that rebinding builtins.exec or compile cannot skip the tests.
_exec, _compile = builtins.exec, builtins.compile


def _libc():
  return ctypes.CDLL(None, use_errno=True)


def _private_namespaces(tmpfs_bytes):
  """New network and mount namespaces with tmpfs over SHARED_DIRS; the names of what held."""
  libc = _libc()
  if libc.unshare(CLONE_NEWNET | CLONE_NEWNS) != 0:
    return []
  applied = ["network"]
  if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
    return applied
  options = f"size={tmpfs_bytes},mode=1777".encode()
  if all(libc.mount(b"tmpfs", d.encode(), b"tmpfs", 0, options) == 0
         for d in SHARED_DIRS if os.path.isdir(d)):
    applied.append("private_tmp")
  return applied


def _become(uid):
  os.chown(".", uid, uid)
  os.setgroups([])
  os.setgid(uid)
  os.setuid(uid)
  _kill_uid_processes()


def _kill_uid_processes():
  """SIGKILL every other process of this (sandbox-only) uid: kill(-1) spares the caller."""
  try:
    os.kill(-1, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _limit(job):
  _libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
  cpu = job["cpu_seconds"]
  limits = [
      (resource.RLIMIT_CPU, (cpu, cpu + 1)),
      (resource.RLIMIT_AS, (job["memory_bytes"],) * 2),
      (resource.RLIMIT_FSIZE, (job["file_bytes"],) * 2),
      (resource.RLIMIT_NPROC, (job["processes"],) * 2),
      (resource.RLIMIT_NOFILE, (job["open_files"],) * 2),
      (resource.RLIMIT_CORE, (0, 0)),
  ]
  for which, value in limits:
    resource.setrlimit(which, value)
  # Writing past RLIMIT_FSIZE then raises OSError (EFBIG) in the program instead of a signal.
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _describe(error):
  """'<Type>: <message> (<file> line <n>)' of the innermost frame in the program or tests."""
  where = ""
  for frame, line in traceback.walk_tb(error.__traceback__):
    if frame.f_code.co_filename in ("<program>", "<tests>"):
      where = f" ({frame.f_code.co_filename} line {line})"
  text = str(error)
  if isinstance(error, SyntaxError) and error.filename in ("<program>", "<tests>"):
    text, where = error.msg, f" ({error.filename} line {error.lineno})"
  return f"{type(error).__name__}: {text[:300]}{where}"


def main():
  job_file = sys.argv[1]
  with open(job_file, encoding="utf-8") as file:
    job = json.load(file)
  os.unlink(job_file)
  fd, nonce = job["result_fd"], job.pop("nonce")
  isolation = []
  dropped = job["uid"] is not None and os.geteuid() == 0
  if dropped:
    isolation += _private_namespaces(job["tmpfs_bytes"])
    _become(job["uid"])
    isolation.append("uid")
  _limit(job)
  os.write(fd, ("ready " + json.dumps(isolation) + "\n").encode())
  namespace = {"__name__": "__sandbox__", "__builtins__": builtins}
  verdict = "error program did not finish"
  try:
    _exec(_compile(job["program"], "<program>", "exec"), namespace)
    verdict = "error tests did not finish"
    _exec(_compile(job["tests"], "<tests>", "exec"), namespace)
    verdict = f"{nonce} passed"
  except AssertionError as error:
    verdict = "failed " + _describe(error)
  except BaseException as error:  # pylint: disable=broad-except
    verdict = "error " + _describe(error)
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except BaseException:  # pylint: disable=broad-except
      pass
  os.write(fd, (verdict.replace("\n", " ") + "\n").encode())
  if dropped:
    _kill_uid_processes()
  os._exit(0)


if __name__ == "__main__":
  main()
