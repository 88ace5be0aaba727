"""The result records of the experiment scripts: one JSON object a line, on stdout and in a file."""

from __future__ import annotations

import json


def write_record(record: dict, out: str | None = None) -> None:
  """Prints `record` as one JSON line and, with `out`, appends that line to the file `out`."""
  line = json.dumps(record)
  print(line, flush=True)
  if out:
    with open(out, "a") as f:
      f.write(line + "\n")
