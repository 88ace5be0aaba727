"""What the command-line entry points share: flags only, and the errors a user can fix printed as
one line that names the field, file or path (an unexpected exception keeps its traceback)."""

from __future__ import annotations

import contextlib
import errno
import os
import sys

from absl import app

from proma_jax.checkpoint import IncompatibleCheckpointError
from proma_jax.config import ConfigError
from proma_jax.models.hf import CheckpointError
from proma_jax.tasks.base import DataError

# OS errors that are the machine's or the given path's, not the code's: a full disk, a read-only
# or forbidden path, and a path through a regular file (ENOTDIR: `--out results.csv/run`) or to a
# directory where a file belongs (EISDIR). Each names the path it failed on.
_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.ENOTDIR,
                       errno.EISDIR)


def refuse_positional_arguments(argv: list[str]) -> None:
  """A command takes flags only: a stray word (an unquoted path with a space, a flag without its
  --) is refused with a usage message instead of silently ignored."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional argument(s) {argv[1:]}; every option is a "
                         "--flag (quote a value that holds spaces)")


def expected_error_message(error: BaseException, *more: type[BaseException]) -> str | None:
  """The one-line message of an error the user can fix, or None for any other exception.

  Expected are an invalid config, a checkpoint that cannot be loaded or restored, a task whose
  data cannot be used (`tasks.DataError`: the file and line named), the exception
  types in `more`, and the OS errors of `_ENVIRONMENT_ERRNOS` (a full disk, a read-only or
  forbidden path, a path of the wrong kind), whose message is "<reason>: <path> (<type>)".
  Shared by `expected_errors_as_messages` and by callers that report an error of another process
  (experiments/sweep.py's workers).
  """
  if isinstance(error, (ConfigError, CheckpointError, IncompatibleCheckpointError, DataError,
                        *more)):
    return str(error)
  if isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS:
    return f"{error.strerror}: {error.filename or ''} ({type(error).__name__})"
  return None


@contextlib.contextmanager
def expected_errors_as_messages(*more: type[BaseException]):
  """Exits with `error: <message>` for the errors of `expected_error_message` (an invalid config,
  a checkpoint that cannot be loaded or restored, the exception types in `more`, a full disk or a
  read-only, forbidden or misplaced path); any other exception propagates with its traceback."""
  try:
    yield
  except Exception as e:  # noqa: BLE001 -- re-raised unless expected
    message = expected_error_message(e, *more)
    if message is None:
      raise
    sys.exit(f"error: {message}")


@contextlib.contextmanager
def naming_path_in_os_errors(path: str | os.PathLike):
  """Gives an OSError raised inside without a file name (a write or close that hits a full disk
  names no file) `path` as its file name, so its message says which file could not be written."""
  try:
    yield
  except OSError as e:
    if e.filename is not None or e.errno is None:
      raise
    raise OSError(e.errno, e.strerror, os.fspath(path)) from e
