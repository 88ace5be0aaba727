"""Checkpointer: exact round trips, retention, fallback past corrupt steps, empty directories."""

import json
import logging
import os
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from proma_jax.checkpoint import Checkpointer, IncompatibleCheckpointError

# A failed tensorstore read can leave an orbax callback on an event loop that is already closed;
# it surfaces later, during whichever test runs then, as an unraisable "Event loop is closed".
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def make_state(seed: int):
  """A training-state-like pytree: params, an optax clip+AdamW state, PRNG keys, counters."""
  key = jax.random.PRNGKey(seed)
  params = {"dense": {"kernel": jax.random.normal(key, (3, 4)), "bias": jnp.zeros(4)},
            "scale": jnp.ones((), jnp.bfloat16)}
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  opt_state = optimizer.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = optimizer.update(grads, opt_state, params)  # non-trivial moments and count
  return {
      "params": params,
      "opt_state": opt_state,
      "rng": jax.random.fold_in(key, 7),
      "typed_rng": jax.random.key(seed),
      "step": jnp.asarray(seed, jnp.int32),
      "data": {"position": np.int64(100 + seed), "epoch": 2,
               "tokens": np.arange(5, dtype=np.int32)},
  }


def assert_same_state(actual, expected):
  """Same pytree structure, leaf types and dtypes, and bitwise-equal values."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert type(a) is type(e) or (isinstance(a, jax.Array) and isinstance(e, jax.Array))
    if isinstance(e, jax.Array) and jax.dtypes.issubdtype(e.dtype, jax.dtypes.prng_key):
      assert a.dtype == e.dtype
      a, e = jax.random.key_data(a), jax.random.key_data(e)
    assert np.asarray(a).dtype == np.asarray(e).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_round_trip_is_exact(tmp_path):
  state = make_state(1)
  ckpt = Checkpointer(tmp_path)
  ckpt.save(5, state, {"data_position": 123, "config_hash": "abc"})
  step, restored, meta = Checkpointer(tmp_path).restore(make_state(2))
  assert step == 5
  assert meta == {"data_position": 123, "config_hash": "abc"}
  assert_same_state(restored, state)
  assert isinstance(restored["opt_state"][1][0], optax.ScaleByAdamState)
  chex.assert_trees_all_equal(restored["params"], state["params"])
  ckpt.close()


def test_keeps_only_max_to_keep(tmp_path):
  ckpt = Checkpointer(tmp_path, max_to_keep=2)
  for step in (1, 2, 3, 4):
    ckpt.save(step, make_state(step), {"step": step})
  assert ckpt.all_steps() == [3, 4]
  step, restored, meta = ckpt.restore(make_state(0))
  assert (step, meta) == (4, {"step": 4})
  assert_same_state(restored, make_state(4))


def array_data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """The tensorstore (OCDBT) data files holding the array bytes of one checkpoint."""
  return [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


@pytest.mark.parametrize("damage", ["truncate", "delete", "garble"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog, damage):
  ckpt = Checkpointer(tmp_path)
  ckpt.save(10, make_state(10), {"step": 10})
  ckpt.save(20, make_state(20), {"step": 20})
  for path in array_data_files(tmp_path / "20"):
    if damage == "truncate":
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "delete":
      path.unlink()
    else:
      path.write_bytes(bytes(b ^ 0xFF for b in path.read_bytes()))
  with caplog.at_level(logging.WARNING, logger="proma_jax.checkpoint"):
    step, restored, meta = Checkpointer(tmp_path).restore(make_state(0))
  assert (step, meta) == (10, {"step": 10})
  assert_same_state(restored, make_state(10))
  warnings = [r.getMessage() for r in caplog.records if r.name == "proma_jax.checkpoint"]
  assert any("step 20" in w for w in warnings), warnings


def test_missing_step_file_and_interrupted_save_fall_back(tmp_path, caplog):
  ckpt = Checkpointer(tmp_path)
  ckpt.save(1, make_state(1), {"step": 1})
  ckpt.save(2, make_state(2), {"step": 2})
  (tmp_path / "3.orbax-checkpoint-tmp-123").mkdir()  # what an interrupted save leaves behind
  for path in (tmp_path / "2" / "meta").iterdir():
    path.unlink()
  with caplog.at_level(logging.WARNING, logger="proma_jax.checkpoint"):
    step, _, meta = Checkpointer(tmp_path).restore(make_state(0))
  assert (step, meta) == (1, {"step": 1})
  assert any("step 2" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind", ["sum32", "crc32"])  # a leaf checked on devices, one on the host
def test_checksum_mismatch_falls_back(tmp_path, caplog, kind):
  """Bytes that decode but differ from what was saved are caught by the recorded checksum."""
  ckpt = Checkpointer(tmp_path)
  ckpt.save(1, make_state(1), {"step": 1})
  ckpt.save(2, make_state(2), {"step": 2})
  layout_file = tmp_path / "2" / "layout" / "metadata"
  layout = json.loads(layout_file.read_text())
  next(entry for entry in layout["leaves"] if kind in entry)[kind] += 1
  layout_file.write_text(json.dumps(layout))
  with caplog.at_level(logging.WARNING, logger="proma_jax.checkpoint"):
    assert ckpt.restore(make_state(0))[0] == 1
  assert any("step 2" in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records)


def test_save_after_fallback_replaces_newer_steps(tmp_path):
  ckpt = Checkpointer(tmp_path)
  for step in (10, 20):
    ckpt.save(step, make_state(step), {"step": step})
  ckpt.save(15, make_state(15), {"step": 15})  # resumed from 10 after step 20 was found corrupt
  assert ckpt.all_steps() == [10, 15]
  assert ckpt.restore(make_state(0))[0] == 15


def test_empty_or_all_corrupt_directory_gives_none(tmp_path):
  assert Checkpointer(tmp_path / "empty").restore(make_state(0)) is None
  ckpt = Checkpointer(tmp_path / "bad")
  ckpt.save(1, make_state(1))
  for path in array_data_files(tmp_path / "bad" / "1"):
    path.unlink()
  assert ckpt.restore(make_state(0)) is None


def test_different_structure_raises_instead_of_starting_over(tmp_path):
  ckpt = Checkpointer(tmp_path)
  ckpt.save(1, {"w": jnp.zeros((2, 3))})
  with pytest.raises(IncompatibleCheckpointError, match="step 1"):
    ckpt.restore({"w": jnp.zeros((2, 4))})
  assert os.path.isdir(tmp_path / "1")


@pytest.mark.parametrize("max_to_keep", [0, -1, None, 1.5])
def test_max_to_keep_below_one_is_refused(tmp_path, max_to_keep):
  """orbax reads max_to_keep=0 as "keep nothing" (and None as "keep all"): refuse, don't guess."""
  with pytest.raises((ValueError, TypeError), match="max_to_keep"):
    Checkpointer(tmp_path, max_to_keep=max_to_keep)
  assert not os.path.exists(tmp_path / "0")


def _sum32_reference(array: np.ndarray) -> int:
  """checkpoint._sum32 in NumPy uint64/Python ints: sum_i bits_i * w_i mod 2^32, w_i odd."""
  bits = array.astype(np.uint64) if array.dtype == np.bool_ else array.view(
      {1: np.uint8, 2: np.uint16, 4: np.uint32}[array.dtype.itemsize]).astype(np.uint64)
  index = np.arange(array.size, dtype=np.uint64)
  weight = ((index * 0x9E3779B1 + 0x7F4A7C15) % 2**32) | 1
  return int(np.sum((bits.ravel() * weight) % 2**32) % 2**32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32", "uint8", "bool"])
def test_device_checksum_matches_numpy_and_sees_one_changed_element(dtype):
  from proma_jax import checkpoint
  values = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 7)) * 50
  x = values > 0 if dtype == "bool" else values.astype(dtype)
  got = [int(c) for c in checkpoint._device_checksums([x, x[0, 0, 0], x.reshape(-1)])]
  reference = _sum32_reference(np.asarray(x))
  assert got == [reference, _sum32_reference(np.asarray(x)[0, 0, 0]), reference]
  flipped = jnp.logical_not(x[1, 2, 3]) if dtype == "bool" else x[1, 2, 3] + 1
  assert int(checkpoint._device_checksums([x.at[1, 2, 3].set(flipped)])[0]) != reference


def test_checkpoint_of_the_host_only_format_still_restores(tmp_path, monkeypatch):
  """A checkpoint whose every leaf went through host memory with a CRC-32 (the format before
  device checksums) restores onto today's template: same values, leaves on the template's
  devices."""
  from proma_jax import checkpoint
  state = make_state(3)
  with monkeypatch.context() as m:
    m.setattr(checkpoint, "_on_devices", lambda leaf: False)
    Checkpointer(tmp_path).save(7, state)
  layout = json.loads((tmp_path / "7" / "layout" / "metadata").read_text())
  assert all("crc32" in e and "sum32" not in e for e in layout["leaves"])
  step, restored, _ = Checkpointer(tmp_path).restore(make_state(0))
  assert step == 7
  assert_same_state(restored, state)


def test_keys_and_sub_byte_dtypes_take_the_host_path(tmp_path):
  """Typed PRNG keys and sub-byte (int4) arrays go through the host with a CRC-32 (the device
  checksum bit-casts whole bytes) and round-trip exactly; float arrays use the device path."""
  state = {"typed": jax.random.key(1), "int4": jnp.arange(6, dtype=jnp.int4).reshape(2, 3),
           "f": jnp.ones(3)}
  ckpt = Checkpointer(tmp_path)
  ckpt.save(1, state)
  layout = json.loads((tmp_path / "1" / "layout" / "metadata").read_text())
  kinds = {e["path"]: "sum32" if "sum32" in e else "crc32" for e in layout["leaves"]}
  assert kinds == {"['f']": "sum32", "['int4']": "crc32", "['typed']": "crc32"}, kinds
  _, restored, _ = ckpt.restore(jax.tree.map(jnp.zeros_like, state) | {
      "typed": jax.random.key(0)})
  assert_same_state(restored, state)
