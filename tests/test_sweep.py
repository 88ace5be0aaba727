"""A reduced sweep runs end to end, the report covers every cell, and a rerun redoes nothing."""

import csv
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import report as sweep_report  # noqa: E402
import sweep  # noqa: E402


@pytest.mark.slow
def test_reduced_sweep_and_report(tmp_path):
  """1 algorithm x 2 learning rates x 1 seed: every (task, algorithm, lr, seed) row and figure.
  (One algorithm: the others run the same sweep code; tests/test_train.py covers each.)"""
  out = tmp_path / "sweep"
  overrides = [f"sft.checkpoint_dir={json.dumps(str(tmp_path / 'warm'))}", "sft.steps=20",
               "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
               "rollout.prompts_per_step=4", "rollout.group_size=2", "eval.num_examples=8"]
  args = ["--out", str(out), "--tasks", "reverse", "--algorithms", "proma",
          "--lrs", "1e-4,1e-3", "--seeds", "0", "--steps", "2", "--workers", "1"]
  args += [x for o in overrides for x in ("--override", o)]
  sweep.main(args)
  done = sorted(str(p.relative_to(out)) for p in out.rglob("DONE"))
  assert done == ["reverse/proma/lr0.0001_seed0/DONE", "reverse/proma/lr0.001_seed0/DONE"]
  mtimes = {p: p.stat().st_mtime for p in out.rglob("metrics.jsonl")}
  sweep.main(args)  # resume: nothing left to run
  assert {p: p.stat().st_mtime for p in out.rglob("metrics.jsonl")} == mtimes

  results = tmp_path / "results"
  sweep_report.main([str(out), "--out", str(results)])
  rows = list(csv.DictReader(open(results / "summary.csv")))
  cells = {(r["task"], r["algorithm"], float(r["lr"]), int(r["seed"])) for r in rows}
  assert cells == {("reverse", "proma", lr, 0) for lr in (1e-4, 1e-3)}
  for r in rows:
    assert r["val_best"] != "" and r["kl_step_max"] != "" and r["wall_s"] != ""
  for name in ("val_vs_lr_reverse.png", "curves_reverse.png"):
    assert (results / name).stat().st_size > 10_000
