"""What the command-line entry points share: flags only, and the errors a user can fix printed as
one line that names the field, file or path (an unexpected exception keeps its traceback)."""

from __future__ import annotations

import contextlib
import errno
import sys

from absl import app

from proma_jax.checkpoint import IncompatibleCheckpointError
from proma_jax.config import ConfigError
from proma_jax.models.hf import CheckpointError

# Disk and permission errors that are the machine's, not the code's.
_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT)


def refuse_positional_arguments(argv: list[str]) -> None:
  """A command takes flags only: a stray word (an unquoted path with a space, a flag without its
  --) is refused with a usage message instead of silently ignored."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional argument(s) {argv[1:]}; every option is a "
                         "--flag (quote a value that holds spaces)")


@contextlib.contextmanager
def expected_errors_as_messages(*more: type[BaseException]):
  """Exits with `error: <message>` for an invalid config, a checkpoint that cannot be loaded or
  restored, the exception types in `more`, and a full disk or a read-only or forbidden path;
  any other exception propagates with its traceback."""
  try:
    yield
  except (ConfigError, CheckpointError, IncompatibleCheckpointError, *more) as e:
    sys.exit(f"error: {e}")
  except OSError as e:
    if e.errno not in _ENVIRONMENT_ERRNOS:
      raise
    sys.exit(f"error: {e.strerror}: {e.filename or ''} ({type(e).__name__})")
