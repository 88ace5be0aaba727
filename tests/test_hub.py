"""Tests of hub checkpoint names (`hf:ORG/NAME[@REVISION]`, `loading.resolve_checkpoint`).

No network: each test builds a Hugging Face hub cache in tmp_path in the hub's own layout
(models--ORG--NAME/ with blobs/<hash>, snapshots/<commit>/<file> symlinked to its blob as
huggingface_hub writes them, and refs/<branch> holding the commit hash), filled with the committed
tiny Qwen3 checkpoint, and sets HF_HUB_OFFLINE=1 and HF_HUB_CACHE after huggingface_hub was
imported, which `resolve_checkpoint` must still honour (it reads them at call time).
"""

import hashlib
import json
import os
import pathlib
import sys

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from proma_jax.models import loading
from proma_jax.models.hf import CheckpointError

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "hf" / "tiny_qwen3"
REPO_ID = "tiny-org/tiny-qwen3"
MAIN, V2 = "a" * 40, "b" * 40


def add_snapshot(cache: pathlib.Path, repo_id: str, commit: str, files: dict[str, bytes],
                 refs: tuple[str, ...] = ()) -> pathlib.Path:
  """Snapshot `commit` of model `repo_id` in the hub cache `cache`, as huggingface_hub lays it out:
  each file's bytes in blobs/<sha256>, linked from snapshots/<commit>/<name>, and each ref in
  `refs` a file refs/<ref> holding the commit hash. Returns the snapshot directory."""
  repo = cache / ("models--" + repo_id.replace("/", "--"))
  snapshot = repo / "snapshots" / commit
  (repo / "blobs").mkdir(parents=True, exist_ok=True)
  snapshot.mkdir(parents=True)
  for name, data in files.items():
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data)
    (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
  for ref in refs:
    (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)  # no newline, as the hub writes it
  return snapshot


def fixture_files() -> dict[str, bytes]:
  return {f.name: f.read_bytes() for f in sorted(FIXTURE.iterdir()) if f.is_file()}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
  """An offline hub cache at tmp_path/hub holding REPO_ID: `main` -> commit MAIN (the fixture as
  it is) and branch `v2` -> commit V2 (max_position_embeddings 256)."""
  cache = tmp_path / "hub"
  monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  add_snapshot(cache, REPO_ID, MAIN, fixture_files(), refs=("main",))
  v2 = fixture_files()
  config = json.loads(v2["config.json"])
  config["max_position_embeddings"] = 256
  v2["config.json"] = json.dumps(config).encode()
  add_snapshot(cache, REPO_ID, V2, v2, refs=("v2",))
  return cache


def params(model) -> list[np.ndarray]:
  return [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model,
                                                                                  nnx.Param)))]


def test_hub_name_loads_exactly_the_fixture_directory(hub_cache):
  spec = f"hf:{REPO_ID}"
  path = loading.resolve_checkpoint(spec)
  assert path.resolve() == (hub_cache / f"models--tiny-org--tiny-qwen3/snapshots/{MAIN}").resolve()
  model, tokenizer = loading.load_pretrained(spec)
  direct_model, direct_tokenizer = loading.load_pretrained(FIXTURE)
  chex.assert_trees_all_equal(params(model), params(direct_model))
  text = "What is 2 + 3?"
  assert tokenizer.encode(text) == direct_tokenizer.encode(text)
  assert tokenizer.eos_id == direct_tokenizer.eos_id
  assert loading.checkpoint_config(spec) == loading.checkpoint_config(FIXTURE)
  assert loading.checkpoint_fingerprint(spec) == loading.checkpoint_fingerprint(FIXTURE)


def test_revision_picks_its_snapshot(hub_cache):
  snapshots = hub_cache / "models--tiny-org--tiny-qwen3" / "snapshots"
  assert loading.resolve_checkpoint(f"hf:{REPO_ID}@v2") == snapshots / V2
  assert loading.resolve_checkpoint(f"hf:{REPO_ID}@{V2}") == snapshots / V2  # a commit hash
  assert loading.resolve_checkpoint(f"hf:{REPO_ID}@main") == snapshots / MAIN
  assert loading.checkpoint_config(f"hf:{REPO_ID}@v2").max_len == 256
  assert loading.checkpoint_config(f"hf:{REPO_ID}").max_len == 128
  assert (loading.checkpoint_fingerprint(f"hf:{REPO_ID}@v2")["config.json"]
          != loading.checkpoint_fingerprint(f"hf:{REPO_ID}")["config.json"])


def test_cache_directory_is_read_when_resolving_not_at_import(hub_cache, tmp_path, monkeypatch):
  """HF_HOME alone (no HF_HUB_CACHE) names HF_HOME/hub, whatever huggingface_hub saw at import."""
  monkeypatch.delenv("HF_HUB_CACHE")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
  add_snapshot(tmp_path / "home" / "hub", REPO_ID, MAIN, fixture_files(), refs=("main",))
  assert loading.resolve_checkpoint(f"hf:{REPO_ID}").is_relative_to(tmp_path / "home" / "hub")


@pytest.mark.parametrize("spec, missing", [("hf:tiny-org/absent", "tiny-org/absent"),
                                           (f"hf:{REPO_ID}@no-such-branch", "no-such-branch")])
def test_uncached_name_or_revision_offline_names_the_cache_and_offline_mode(hub_cache, spec,
                                                                            missing):
  with pytest.raises(CheckpointError) as error:
    loading.load_pretrained(spec)
  message = str(error.value)
  assert spec in message and missing in message
  assert str(hub_cache) in message and "HF_HUB_OFFLINE=1" in message


@pytest.mark.parametrize("spec", ["hf:", "hf:noslash", "hf:a/b@", "hf:/b", "hf:a/", "hf:a/b/c",
                                  "hf:a b/c", "hf:@main"])
def test_malformed_hub_names_are_refused_naming_them(hub_cache, spec):
  with pytest.raises(CheckpointError, match="malformed hub checkpoint name") as error:
    loading.checkpoint_config(spec)
  assert repr(spec) in str(error.value)


def test_missing_huggingface_hub_says_what_to_install(hub_cache, monkeypatch):
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` fails
  with pytest.raises(CheckpointError, match=r"pip install huggingface_hub==\d"):
    loading.resolve_checkpoint(f"hf:{REPO_ID}")


def test_online_download_asks_only_for_the_files_the_loader_reads(hub_cache, monkeypatch):
  """Online, snapshot_download is called with the revision, the cache directory and the loader's
  files (the tokenizer's are those `tokenizer.from_hf_dir` reads); a failed connection is a
  CheckpointError naming the cache and HF_HUB_OFFLINE=0."""
  import huggingface_hub
  from huggingface_hub import errors
  monkeypatch.setenv("HF_HUB_OFFLINE", "0")
  calls = []

  def snapshot_download(repo_id, **kwargs):
    calls.append((repo_id, kwargs))
    raise errors.LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
  with pytest.raises(CheckpointError, match="Name or service not known") as error:
    loading.resolve_checkpoint(f"hf:{REPO_ID}@v2")
  assert str(hub_cache) in str(error.value) and "HF_HUB_OFFLINE=0" in str(error.value)
  [(repo_id, kwargs)] = calls
  assert repo_id == REPO_ID and kwargs["revision"] == "v2"
  assert kwargs["cache_dir"] == str(hub_cache) and kwargs["local_files_only"] is False
  assert set(kwargs["allow_patterns"]) == {
      "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
      "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
