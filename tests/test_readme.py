"""The README's code blocks marked `<!-- tested -->` run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"<!-- tested -->\s*```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_tested_blocks():
  """README carries at least one tested snippet (so the test below cannot pass vacuously)."""
  assert BLOCKS


@pytest.mark.parametrize("code", BLOCKS)
def test_readme_snippet_runs(code):
  """Each tested README snippet executes without error."""
  exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
