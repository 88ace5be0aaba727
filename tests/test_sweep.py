"""A reduced sweep runs end to end, records its overrides and summaries, resumes from summaries
alone, and the report covers every cell; the queue is seed-major."""

import csv
import json
import os
import shutil
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import report as sweep_report  # noqa: E402
import sweep  # noqa: E402


@pytest.mark.slow
def test_reduced_sweep_and_report(tmp_path):
  """1 arm (GRPO with 2 epochs) x 2 learning rates x 1 seed: overrides.json and a summary per run, a rerun with the
  run directories deleted redoes nothing, and the report has every (task, algorithm, lr, seed).
  (One arm: the others run the same sweep code; tests/test_train.py covers each algorithm.)"""
  out, summaries = tmp_path / "sweep", tmp_path / "summaries"
  overrides = [f"sft.checkpoint_dir={json.dumps(str(tmp_path / 'warm'))}", "sft.steps=20",
               "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
               "rollout.prompts_per_step=4", "rollout.group_size=2", "eval.num_examples=8"]
  args = ["--out", str(out), "--summaries", str(summaries), "--tasks", "reverse",
          "--arms", "grpo_2ep", "--lrs", "1e-4,1e-3", "--seeds", "0", "--steps", "2",
          "--workers", "1"]
  args += [x for o in overrides for x in ("--override", o)]
  sweep.main(args)
  names = ["reverse/base/grpo_2ep/lr0.0001_seed0", "reverse/base/grpo_2ep/lr0.001_seed0"]
  assert sorted(str(p.relative_to(summaries)) for p in summaries.rglob("*.json")) == [
      n + ".json" for n in names]
  for name, lr in zip(names, (1e-4, 1e-3)):
    recorded = json.load(open(out / name / "overrides.json"))
    assert recorded["optim.lr"] == lr and recorded["train.num_epochs"] == 2
    assert recorded["model.d_model"] == 32 and recorded["steps"] == 2
    run = json.load(open(out / name / "run.json"))
    assert run["config"]["train"]["num_epochs"] == 2 and run["lr"] == lr
    summary = json.load(open(summaries / (name + ".json")))
    assert summary["arm"] == "grpo_2ep" and summary["algorithm"] == "grpo"
    assert summary["steps_done"] == 2 and set(summary["val"]) == set(summary["val_id"]) == {"0", "1", "2"}
    assert len(summary["curves"]["kl/step"]) == 2 and "pg/clipfrac" in summary["curves"]

  results = tmp_path / "results"
  sweep_report.main([str(out), "--out", str(results)])
  rows = list(csv.DictReader(open(results / "summary.csv")))
  cells = {(r["task"], r["algorithm"], float(r["lr"]), int(r["seed"])) for r in rows}
  assert cells == {("reverse", "grpo", lr, 0) for lr in (1e-4, 1e-3)}
  for r in rows:
    assert r["val_best"] != "" and r["kl_step_max"] != ""
  for name in ("val_vs_lr_reverse.png", "curves_reverse.png"):
    assert (results / name).stat().st_size > 10_000

  shutil.rmtree(out)  # a fresh machine with only the committed summaries: nothing to run
  mtimes = {p: p.stat().st_mtime for p in summaries.rglob("*.json")}
  sweep.main(args)
  assert not out.exists() or not any(out.rglob("metrics.jsonl"))
  assert {p: p.stat().st_mtime for p in summaries.rglob("*.json")} == mtimes


def test_queue_is_seed_major_and_costliest_first():
  """All of seed 0 before seed 1 (a sweep stopped part-way has paired seeds in every cell), and
  within a seed the costliest runs first (proma_both over grpo; 512 sequences over 64)."""
  cells = [("reverse", "base", "grpo", 1e-4, 1), ("reverse", "paper", "grpo", 1e-4, 0),
           ("reverse", "base", "proma_both", 1e-4, 0), ("arith", "paper", "proma_both", 3e-4, 1),
           ("reverse", "paper", "proma_both", 1e-4, 0), ("reverse", "base", "grpo", 1e-4, 0)]
  assert sweep.queue_order(cells) == [
      ("reverse", "paper", "proma_both", 1e-4, 0), ("reverse", "paper", "grpo", 1e-4, 0),
      ("reverse", "base", "proma_both", 1e-4, 0), ("reverse", "base", "grpo", 1e-4, 0),
      ("arith", "paper", "proma_both", 3e-4, 1), ("reverse", "base", "grpo", 1e-4, 1)]


def test_overrides_precedence_and_unknown_names():
  """Later layers win: run-time fields < shape < arm < --override; unknown arms are refused."""
  o = sweep.run_overrides("paper", "grpo_2ep", 1e-4, 3, 30, ["train.num_epochs=3"])
  assert o["rollout.prompts_per_step"] == 64 and o["train.num_microbatches"] == 32
  assert o["train.num_epochs"] == 3 and o["optim.lr"] == 1e-4 and o["seed"] == 3
  with pytest.raises(SystemExit, match="unknown arm or shape"):
    sweep.main(["--arms", "ppo", "--out", "/nonexistent"])


def test_a_summary_run_with_other_overrides_is_refused(tmp_path):
  """A summarised run counts as done only if it ran with this sweep's overrides (e.g. steps)."""
  cell = ("reverse", "paper", "grpo", 1e-4, 0)
  ran = sweep.run_overrides(*cell[1:], 60, [])
  path = tmp_path / (sweep.run_name(*cell) + ".json")
  path.parent.mkdir(parents=True)
  path.write_text(json.dumps({"overrides": ran}))
  sweep._check_summaries([cell], {cell: ran}, str(tmp_path))  # the same: accepted
  with pytest.raises(sweep.SweepError,
                     match=r"lr0.0001_seed0.json was run with overrides .*'steps': 60"):
    sweep._check_summaries([cell], {cell: sweep.run_overrides(*cell[1:], 40, [])}, str(tmp_path))
