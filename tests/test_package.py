"""proma_jax installs as a package: pyproject.toml declares every distribution the code imports (the
core as dependencies, the rest as extras), the core alone imports the library, and a wheel built
from the repository carries those declarations as Requires-Dist and, installed into a fresh
virtual environment, runs README's Optax example from a directory outside the repository."""

import ast
import importlib.metadata
import importlib.util
import json
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
CORE = [Requirement(r) for r in PROJECT["dependencies"]]
EXTRAS = {extra: [Requirement(r) for r in reqs]
          for extra, reqs in PROJECT["optional-dependencies"].items()}
SELF = canonicalize_name(PROJECT["name"])
# Imported by proma_jax but declared nowhere, on purpose.
UNDECLARED = {
    "ml_dtypes": "a dependency of jax (every jax release requires it)",
    "httpx2": "huggingface_hub's HTTP client (the hub extra installs it), for its error type",
    "datasets": "downloads GSM8K when no local copy is given; the error names it",
}
# What the library alone (`import proma_jax` and the modules that need no extra) imports.
CORE_MODULES = ["proma_jax", "proma_jax.tasks", "proma_jax.config", "proma_jax.checkpoint"]
TIMEOUT = 1800


def _names(requirements) -> set[str]:
  return {canonicalize_name(r.name) for r in requirements}


def _third_party_imports() -> dict[str, list[str]]:
  """{top-level module: files of proma_jax/ importing it} for every absolute import that is neither
  the standard library nor proma_jax itself."""
  found = {}
  for path in sorted((REPO / "proma_jax").rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        modules = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        modules = [node.module]
      else:
        continue
      for module in modules:
        top = module.split(".")[0]
        if top not in sys.stdlib_module_names and top != "proma_jax":
          found.setdefault(top, []).append(str(path.relative_to(REPO)))
  return found


def _extra_modules() -> set[str]:
  """Top-level modules provided by the distributions of the extras (and by none of the core's)."""
  core = _names(CORE)
  extras = set().union(*(_names(reqs) for reqs in EXTRAS.values())) - core - {SELF}
  modules = set(extras)  # a distribution that is not installed: its usual module name
  for module, dists in importlib.metadata.packages_distributions().items():
    names = {canonicalize_name(d) for d in dists}
    if names & extras and not names & core:
      modules.add(module)
  return {m.replace("-", "_") for m in modules}


def test_every_imported_distribution_is_declared():
  """Each third-party module proma_jax imports belongs to a distribution that pyproject.toml
  declares, as a dependency or in an extra (`pip install proma_jax` would otherwise leave it out);
  `all` holds every extra but the test tools."""
  declared = _names(CORE).union(*(_names(reqs) for reqs in EXTRAS.values()))
  distributions = importlib.metadata.packages_distributions()
  undeclared = {}
  for module, files in _third_party_imports().items():
    if module in UNDECLARED:
      continue
    names = {canonicalize_name(d) for d in distributions.get(module, [module])}
    if not names & declared:
      undeclared[module] = sorted(set(files))
  assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
  assert set(EXTRAS) >= {"models", "logging", "hub", "plots", "all"}
  (everything,) = EXTRAS["all"]
  assert canonicalize_name(everything.name) == SELF
  assert everything.extras == set(EXTRAS) - {"all", "test"}


def test_declared_ranges_hold_the_pinned_versions():
  """Every distribution pyproject.toml declares is pinned in requirements.txt (the versions the
  tests run on), and its declared range admits that pin."""
  pins = {}
  for line in (REPO / "requirements.txt").read_text().splitlines():
    if line.split("#")[0].strip():
      pin = Requirement(line.split("#")[0])
      (spec,) = pin.specifier
      assert spec.operator == "==", line
      pins[canonicalize_name(pin.name)] = spec.version
  for requirement in CORE + [r for reqs in EXTRAS.values() for r in reqs]:
    name = canonicalize_name(requirement.name)
    if name == SELF:
      continue
    assert name in pins, f"{requirement} is declared but not pinned in requirements.txt"
    assert requirement.specifier.contains(pins[name]), f"{requirement} excludes =={pins[name]}"


def test_core_dependencies_import_the_library():
  """`import proma_jax` and the modules that need no extra import with every extra's modules
  hidden: the core dependencies are enough for PROMA as an Optax transformation."""
  code = f"""
import sys
BLOCKED = {sorted(_extra_modules())!r}
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ModuleNotFoundError(f"{{name}} belongs to an extra", name=name)
sys.meta_path.insert(0, Block())
import importlib
for module in {CORE_MODULES!r}:
  importlib.import_module(module)
"""
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=TIMEOUT, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert result.returncode == 0, result.stderr


def _can_build_offline() -> bool:
  """Whether this environment's setuptools builds wheels by itself (70.1 and later) or with the
  `wheel` package; otherwise pip builds in an isolated environment it downloads."""
  try:
    setuptools = Version(importlib.metadata.version("setuptools"))
  except importlib.metadata.PackageNotFoundError:
    return False
  return setuptools >= Version("70.1") or importlib.util.find_spec("wheel") is not None


def _run(command, cwd, env=None) -> subprocess.CompletedProcess:
  result = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)
  assert result.returncode == 0, (
      f"{' '.join(map(str, command))} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
  return result


def _build_wheel(tmp_path: pathlib.Path) -> pathlib.Path:
  """A wheel of a copy of the repository's package (the build writes build/ and *.egg-info next
  to its sources, so it does not run in the checkout)."""
  src = tmp_path / "src"
  src.mkdir()
  shutil.copy(REPO / "pyproject.toml", src)
  shutil.copytree(REPO / "proma_jax", src / "proma_jax",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  isolation = ["--no-build-isolation"] if _can_build_offline() else []
  _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", tmp_path / "dist",
        src], cwd=tmp_path)
  (wheel,) = (tmp_path / "dist").glob("proma_jax-*.whl")
  return wheel


def _readme_optax_example() -> str:
  blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
  (example,) = [b for b in blocks if "optax.chain" in b and "proma_jax.proma_accumulation" in b]
  return example


@pytest.mark.slow
def test_wheel_installs_and_runs_the_readme_example(tmp_path):
  """The wheel lists pyproject.toml's dependencies and extras as Requires-Dist and holds every
  module of proma_jax/; installed with --no-deps into a new virtual environment whose other
  packages come from this one's site-packages (a .pth file; this environment's editable
  proma_jax is not among them: an editable install is a finder that only a site directory's .pth
  files start), it is the proma_jax that imports, and README's Optax example exits 0 run from a
  directory outside the repository."""
  wheel = _build_wheel(tmp_path)

  with zipfile.ZipFile(wheel) as archive:
    files = set(archive.namelist())
    metadata = archive.read(next(f for f in files if f.endswith(".dist-info/METADATA"))).decode()
  requires = [Requirement(line.split(":", 1)[1]) for line in metadata.splitlines()
              if line.startswith("Requires-Dist:")]
  plain = {(canonicalize_name(r.name), str(r.specifier)) for r in requires if r.marker is None}
  assert plain == {(canonicalize_name(r.name), str(r.specifier)) for r in CORE}
  for extra, reqs in EXTRAS.items():
    assert f"Provides-Extra: {extra}" in metadata
    listed = {(canonicalize_name(r.name), str(r.specifier), frozenset(r.extras)) for r in requires
              if r.marker is not None and r.marker.evaluate({"extra": extra})}
    assert listed == {(canonicalize_name(r.name), str(r.specifier), frozenset(r.extras))
                      for r in reqs}, extra
  modules = {str(p.relative_to(REPO)) for p in (REPO / "proma_jax").rglob("*.py")}
  assert modules <= files, sorted(modules - files)

  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
  python = venv / "bin" / "python"
  _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
        wheel], cwd=tmp_path)
  purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
  site = pathlib.Path(_run([python, "-c", purelib], cwd=tmp_path).stdout.strip())
  ours = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
  (site / "proma_jax_test_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))

  user = tmp_path / "user"  # the example's working directory, outside the repository
  user.mkdir()
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "HOME": str(user)}
  check = ("import importlib.metadata, json, proma_jax; print(json.dumps({'file': "
           "proma_jax.__file__, 'requires': importlib.metadata.requires('proma_jax')}))")
  found = json.loads(_run([python, "-c", check], cwd=user, env=env).stdout.splitlines()[-1])
  assert pathlib.Path(found["file"]).is_relative_to(site), found["file"]
  assert not pathlib.Path(found["file"]).is_relative_to(REPO), found["file"]
  assert sorted(found["requires"]) == sorted(
      line.split(":", 1)[1].strip() for line in metadata.splitlines()
      if line.startswith("Requires-Dist:"))

  (user / "example.py").write_text(_readme_optax_example())
  out = _run([python, "example.py"], cwd=user, env=env).stdout
  assert "proma/reduction" in out, out
