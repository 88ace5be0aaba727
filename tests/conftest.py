"""Fixtures shared by the training tests, and one JAX compilation cache for the whole run.

The end-to-end tests start the training CLI in subprocesses and several test processes (xdist
workers) build the same programs: a persistent compilation cache shared by all of them (one
directory per pytest run) lets each program compile once.

The tests' programs are small and mostly compiled once, so compile time dominates the suite:
XLA's CPU backend runs at LLVM optimization level 0 here (`--xla_backend_optimization_level=0`,
added to XLA_FLAGS, which subprocesses inherit). It changes how fast the code runs, not what it
computes: the HLO is the same. It cut the two slowest test_train cases from 57 s to 42 s.
"""

import fcntl
import os
import pathlib
import tempfile

_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"proma_jax_test_jax_cache_{_RUN}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
FAST_COMPILE = "--xla_backend_optimization_level=0"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
  """Slow (end-to-end) tests first: xdist's workers then start the long ones early and share the
  short ones at the end, instead of one worker finishing a long test alone."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def warm_dir():
  """The warm-start cache of `helpers.tiny_config`, one directory for the whole pytest run:
  the first test process to need it trains it under a file lock, the others wait and load it
  (it was trained once per xdist worker before). One path also lets `trainer.trainer_for` reuse
  the compiled trainers across test modules. Tests that change the SFT recipe get their own
  subdirectory of it (`sft.warm_start_dir`), trained by the one test that uses it."""
  path = pathlib.Path(tempfile.gettempdir()) / f"proma_jax_test_warm_start_{_RUN}"
  path.mkdir(exist_ok=True)
  with open(path / ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    from proma_jax import sft
    from helpers import tiny_config
    sft.load_or_train(tiny_config("proma", path))
  return path


@pytest.fixture(scope="session")
def smollm2():
  """(model, tokenizer) of SmolLM2-135M-Instruct in float32, loaded once per test process and
  shared by the loading and parity tests."""
  from helpers import smollm2_gguf
  from proma_jax.models import load_pretrained
  return load_pretrained(smollm2_gguf())
