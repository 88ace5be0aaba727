"""Fixtures shared by the training tests."""

import pytest


@pytest.fixture(scope="session")
def warm_dir(tmp_path_factory):
  """The warm-start cache of `test_train.tiny_config`: trained once per test process, and one
  path, so `train._trainer_for` also reuses the compiled trainers across test modules."""
  return tmp_path_factory.mktemp("warm_start")
