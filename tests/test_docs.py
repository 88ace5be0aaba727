"""The project's documents and docstrings stand on their own: the math lives in docs/algorithm.md,
nothing points to design notes kept outside the repository, and every `docs/algorithm.md#anchor`
reference names a heading that exists."""

import pathlib
import re
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ALGORITHM = REPO / "docs" / "algorithm.md"
# Documents and code whose text must not depend on notes outside the repository (tests/ may still
# read data files beside the repository, so they are not scanned for references).
SCANNED = ("proma_jax", "configs", "experiments", "docs", "README.md")
TEXT_SUFFIXES = {".py", ".md", ".txt", ".cfg", ".toml", ".rst", ".yaml", ".yml", ""}
# References to the external design notes, in any form seen in this project's history.
FORBIDDEN = re.compile(r"DESIGN\.md|shared/DESIGN|DESIGN section|\bDESIGN\b")
ANCHOR_REF = re.compile(r"docs/algorithm\.md#([A-Za-z0-9_-]+)")
# `docs/algorithm.md, "Section name"` or `docs/algorithm.md: "One", "Two"` (backquotes allowed).
NAMED_REF = re.compile(r"docs/algorithm\.md`?[,:]\s*((?:\"[^\"\n]+\"(?:,\s*|\s+and\s+)?)+)")


def _tracked(paths: tuple[str, ...]) -> list[pathlib.Path]:
  """Files under `paths` that git tracks or would track (untracked, not ignored); a walk of the
  directories when this is not a git checkout."""
  try:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", *paths],
        cwd=REPO, capture_output=True, check=True).stdout.decode()
    files = [REPO / name for name in out.split("\0") if name]
  except (OSError, subprocess.CalledProcessError):
    files = []
    for p in paths:
      root = REPO / p
      files += [root] if root.is_file() else [f for f in root.rglob("*") if f.is_file()]
  return sorted(f for f in set(files)
                if f.is_file() and f.suffix in TEXT_SUFFIXES and "__pycache__" not in f.parts)


def github_slug(heading: str) -> str:
  """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces -> '-'."""
  text = re.sub(r"`", "", heading.strip().lower())
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def algorithm_anchors() -> set[str]:
  text = ALGORITHM.read_text(encoding="utf-8")
  text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # no headings inside code blocks
  return {github_slug(h) for h in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M)}


def test_algorithm_document_exists_and_covers_the_variants():
  anchors = algorithm_anchors()
  for needed in ("accumulation-proma", "intra-microbatch-proma", "both-variants",
                 "matrix-free-statistics-for-dense-layers", "data-parallel-modes", "metrics"):
    assert needed in anchors, f"docs/algorithm.md has no heading with anchor #{needed}"


def test_readme_points_to_the_algorithm_document():
  assert "docs/algorithm.md" in (REPO / "README.md").read_text(encoding="utf-8")


def test_no_reference_to_external_design_notes():
  """No document, docstring or comment under proma_jax/, configs/, experiments/, docs/ or
  README.md mentions DESIGN.md, shared/DESIGN or 'DESIGN section' (or DESIGN as a word)."""
  hits = []
  for f in _tracked(SCANNED):
    for lineno, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
      if FORBIDDEN.search(line):
        hits.append(f"{f.relative_to(REPO)}:{lineno}: {line.strip()}")
  assert not hits, ("references to design notes outside the repository; point to docs/algorithm.md "
                    "instead:\n" + "\n".join(hits))


def _anchor_references() -> list[tuple[str, str]]:
  """(file, anchor) of every `docs/algorithm.md#anchor` and `docs/algorithm.md, "Section"`."""
  refs = []
  for f in _tracked(SCANNED + ("tests",)):
    if f == pathlib.Path(__file__).resolve():  # this file's docstrings show the patterns
      continue
    text = f.read_text(encoding="utf-8", errors="replace")
    where = str(f.relative_to(REPO))
    refs += [(where, anchor) for anchor in ANCHOR_REF.findall(text)]
    for names in NAMED_REF.findall(text):
      refs += [(where, github_slug(name)) for name in re.findall(r'"([^"]+)"', names)]
  return refs


def test_anchor_references_exist():
  """Every `docs/algorithm.md#anchor` or `docs/algorithm.md, "Section name"` in the code and
  documents, and every `(#anchor)` link inside docs/algorithm.md, names a heading of
  docs/algorithm.md."""
  anchors = algorithm_anchors()
  refs = _anchor_references()
  refs += [("docs/algorithm.md", a)
           for a in re.findall(r"\]\(#([A-Za-z0-9_-]+)\)", ALGORITHM.read_text(encoding="utf-8"))]
  assert refs, "no anchor references found: the docstrings should point into docs/algorithm.md"
  missing = [f"{where}: #{anchor}" for where, anchor in refs if anchor not in anchors]
  assert not missing, "anchors with no heading in docs/algorithm.md:\n" + "\n".join(missing)


@pytest.mark.parametrize("heading, slug", [
    ("Accumulation-PROMA", "accumulation-proma"),
    ("Relative bound, shrinkage and skip fraction", "relative-bound-shrinkage-and-skip-fraction"),
    ("The `lax.cond` story", "the-laxcond-story"),
])
def test_github_slug(heading, slug):
  assert github_slug(heading) == slug
