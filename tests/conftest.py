"""Fixtures shared by the training tests, and one JAX compilation cache for the whole run.

The end-to-end tests start the training CLI in subprocesses and several test processes (xdist
workers) build the same programs: a persistent compilation cache shared by all of them (one
directory per pytest run) lets each program compile once.
"""

import os
import tempfile

_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"proma_jax_test_jax_cache_{_RUN}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def warm_dir(tmp_path_factory):
  """The warm-start cache of `test_train.tiny_config`: trained once per test process, and one
  path, so `train._trainer_for` also reuses the compiled trainers across test modules."""
  return tmp_path_factory.mktemp("warm_start")
