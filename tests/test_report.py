"""Report: summaries of fake run directories, resume deduplication, table, CSV, figure, CLI."""

import csv
import json
import math

import pytest

from proma_jax import report


def write_run(run_dir, meta, records):
  run_dir.mkdir(parents=True)
  (run_dir / "run.json").write_text(json.dumps(meta))
  (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def step_record(step, reward, kl, entropy, kl_init, val=None, val_id=None):
  record = {"step": step, "reward/mean": reward, "kl/step": kl, "kl/step_k3": kl,
            "kl/init": kl_init, "entropy": entropy, "time/step_s": 0.5, "time/sample_s": 0.3,
            "time/update_s": 0.2, "grad/norm": 1.0}
  if val is not None:
    record["val/accuracy"] = val
  if val_id is not None:
    record["val_id/accuracy"] = val_id
  return record


@pytest.fixture
def run_dirs(tmp_path):
  """A GRPO run that was interrupted after step 3 and resumed from step 2, and a PROMA run."""
  grpo = tmp_path / "grpo"
  write_run(grpo, {"algorithm": "grpo", "task": "arith", "lr": 1e-4, "seed": 0}, [
      {"step": 0, "val/accuracy": 0.25, "val_id/accuracy": 0.5},
      step_record(1, 0.1, 0.02, 1.5, 0.02),
      step_record(2, 0.2, 0.04, 1.4, 0.05, val=0.30, val_id=0.75),
      step_record(3, 0.9, 9.0, 0.1, 9.0),  # lost by the interruption, redone after the resume
      step_record(3, 0.3, 0.06, 1.3, 0.08),
      step_record(4, 0.4, 0.08, 1.2, 0.10, val=0.35, val_id=0.625),
  ])
  proma = tmp_path / "proma"
  write_run(proma, {"algorithm": "proma", "task": "arith", "lr": 1e-4, "seed": 0}, [
      {"step": 0, "val/accuracy": 0.25},
      step_record(1, 0.1, 0.01, 1.5, 0.01),
      step_record(2, 0.3, 0.03, 1.5, 0.02, val=0.40),
      step_record(3, 0.5, 0.02, 1.4, 0.03, val=0.38),
  ])
  with open(proma / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "reward/me')  # a line cut short by a kill
  return grpo, proma


def test_load_run_keeps_last_record_of_each_step(run_dirs):
  run = report.load_run(run_dirs[0])
  assert [r["step"] for r in run["records"]] == [0, 1, 2, 3, 4]
  assert run["records"][3]["kl/step"] == 0.06
  assert run["meta"]["algorithm"] == "grpo"


def test_summaries_are_exact(run_dirs):
  grpo, proma = (report.summarize_run(report.load_run(d)) for d in run_dirs)
  expected_grpo = {
      "run": "grpo", "task": "arith", "algorithm": "grpo", "lr": 1e-4, "seed": 0,
      "val_before": 0.25, "val_after": 0.35, "val_best": 0.35,
      "val_id_before": 0.5, "val_id_after": 0.625, "val_id_best": 0.75,
      "kl_step_mean": 0.05, "kl_step_max": 0.08, "kl_init_final": 0.10, "entropy_final": 1.2,
      "reward_first": 0.1, "reward_last": 0.4, "steps": 4, "wall_s": 2.0,
  }
  assert grpo.keys() == expected_grpo.keys() == set(report.SUMMARY_FIELDS)
  assert grpo == expected_grpo
  assert (proma["val_before"], proma["val_after"], proma["val_best"]) == (0.25, 0.38, 0.40)
  assert proma["kl_step_mean"] == 0.02 and proma["val_id_best"] is None  # never logged
  assert (proma["kl_step_max"], proma["steps"], proma["wall_s"]) == (0.03, 3, 1.5)


def test_diverged_kl_is_reported_as_nan(tmp_path):
  write_run(tmp_path / "r", {"algorithm": "reinforce", "task": "arith", "lr": 1e-3, "seed": 1},
            [step_record(1, 0.1, 0.5, 1.0, 0.5), step_record(2, 0.0, math.nan, 0.0, math.nan)])
  summary = report.summarize_run(report.load_run(tmp_path / "r"))
  assert math.isnan(summary["kl_step_max"]) and math.isnan(summary["kl_step_mean"])
  assert summary["val_before"] is None


def test_table_csv_and_figure(run_dirs, tmp_path):
  runs = [report.load_run(d) for d in run_dirs]
  summaries = [report.summarize_run(run) for run in runs]

  table = report.results_table(summaries)
  lines = table.splitlines()
  assert len(lines) == 2 + len(runs)
  assert len({len(line) for line in lines[:2]}) == 1  # header and rule line up
  assert "grpo" in lines[2] and "0.250 -> 0.350" in lines[2]
  assert "proma" in lines[3] and "0.250 -> 0.380" in lines[3]

  csv_path = tmp_path / "out" / "summary.csv"
  report.write_summary_csv(summaries, csv_path)
  with open(csv_path, newline="") as f:
    rows = list(csv.DictReader(f))
  assert [row["algorithm"] for row in rows] == ["grpo", "proma"]
  assert list(rows[0]) == list(report.SUMMARY_FIELDS)
  assert float(rows[0]["val_after"]) == 0.35 and float(rows[1]["kl_step_max"]) == 0.03

  png = tmp_path / "out" / "curves.png"
  report.plot_runs(runs, png, title="test")
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert 0 < png.stat().st_size < 200_000


def test_labels_name_only_what_differs(run_dirs):
  runs = [report.load_run(d) for d in run_dirs]
  assert report.run_labels(runs) == ["grpo", "proma"]
  runs[1]["meta"]["lr"] = 3e-4
  assert report.run_labels(runs) == ["grpo lr=0.0001", "proma lr=0.0003"]


def test_cli_writes_outputs_and_prints_table(run_dirs, tmp_path, capsys):
  out = tmp_path / "results"
  report.main([str(d) for d in run_dirs] + ["--out", str(out)])
  printed = capsys.readouterr().out
  assert "grpo" in printed and "proma" in printed
  assert (out / "summary.csv").stat().st_size > 0
  assert (out / "curves.png").stat().st_size > 0


def test_records_without_integer_step_are_skipped_with_a_warning(tmp_path, caplog):
  """A valid JSON line with no "step" (or a non-integer one, or not an object) is skipped and
  warned about, like an invalid line; the other records load."""
  run_dir = tmp_path / "r"
  write_run(run_dir, {"algorithm": "grpo", "task": "arith", "lr": 1e-4, "seed": 0}, [
      {"step": 0, "val/accuracy": 0.25},
      {"reward/mean": 0.5},
      step_record(1, 0.1, 0.02, 1.5, 0.02),
      {"step": "two", "reward/mean": 0.5},
      {"step": None},
      [1, 2],
      {"step": 2.0, "reward/mean": 0.2},
  ])
  with caplog.at_level("WARNING", logger="proma_jax.report"):
    run = report.load_run(run_dir)
  assert [r["step"] for r in run["records"]] == [0, 1, 2]
  warned = [m for m in caplog.messages if 'no integer "step"' in m]
  assert [m.split(" has")[0].rsplit(":", 1)[1] for m in warned] == ["2", "4", "5", "6"]
  assert report.summarize_run(run)["steps"] == 2


def test_cli_skips_directories_without_run_json(run_dirs, tmp_path, capsys, caplog):
  """A directory without run.json (or with a broken one) is skipped with a warning naming it; the
  report covers the others. With no run directory at all, the CLI exits with a usage error."""
  stray = tmp_path / "stray"
  stray.mkdir()
  (stray / "metrics.jsonl").write_text('{"step": 1}\n')
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "run.json").write_text('{"algorithm": ')
  out = tmp_path / "results"
  with caplog.at_level("WARNING", logger="proma_jax.report"):
    report.main([str(stray), str(run_dirs[0]), str(broken), str(run_dirs[1]), "--out", str(out)])
  printed = capsys.readouterr().out
  assert "grpo" in printed and "proma" in printed
  assert any(f"skipping {stray}" in m and "run.json does not exist" in m for m in caplog.messages)
  assert any(f"skipping {broken}" in m and "cannot be read as JSON" in m for m in caplog.messages)
  with open(out / "summary.csv", newline="") as f:
    assert [row["run"] for row in csv.DictReader(f)] == ["grpo", "proma"]
  with pytest.raises(SystemExit) as exit_info:
    report.main([str(stray), "--out", str(out)])
  assert exit_info.value.code == 2
  assert "run.json" in capsys.readouterr().err


def test_cli_skips_a_run_whose_metrics_cannot_be_read(run_dirs, tmp_path, capsys, caplog):
  """A metrics.jsonl that cannot be read (here a directory; a forbidden or failing file alike)
  skips its run with a warning naming the file, as an unreadable run.json does, instead of
  stopping the report with a traceback."""
  unreadable = tmp_path / "unreadable"
  unreadable.mkdir()
  (unreadable / "run.json").write_text(json.dumps({"algorithm": "grpo", "task": "arith"}))
  (unreadable / "metrics.jsonl").mkdir()
  out = tmp_path / "results"
  with caplog.at_level("WARNING", logger="proma_jax.report"):
    report.main([str(unreadable), str(run_dirs[1]), "--out", str(out)])
  assert "proma" in capsys.readouterr().out
  assert any(f"skipping {unreadable}" in m and f"{unreadable / 'metrics.jsonl'} cannot be read"
             in m for m in caplog.messages), caplog.messages
  with open(out / "summary.csv", newline="") as f:
    assert [row["run"] for row in csv.DictReader(f)] == ["proma"]


def test_non_utf8_lines_and_non_numeric_values_are_skipped_with_a_warning(tmp_path, caplog):
  """One bad byte costs its line, not the run; a non-numeric metric value costs that value."""
  run_dir = tmp_path / "r"
  write_run(run_dir, {"algorithm": "grpo", "task": "arith", "lr": 1e-4, "seed": 0}, [
      {"step": 0, "val/accuracy": 0.25},
      step_record(1, 0.1, 0.02, 1.5, 0.02),
      dict(step_record(2, 0.2, 0.04, 1.4, 0.05), **{"kl/step": "abc"}),
  ])
  with open(run_dir / "metrics.jsonl", "ab") as f:
    f.write(b'{"step": 3, "reward/mean": 0.9, "note": "\xff"}\n')
    f.write((json.dumps(step_record(4, 0.4, 0.08, 1.2, 0.1)) + "\n").encode())
  with caplog.at_level("WARNING", logger="proma_jax.report"):
    run = report.load_run(run_dir)
    summary = report.summarize_run(run)
  assert [r["step"] for r in run["records"]] == [0, 1, 2, 4]
  assert any("metrics.jsonl:4 is not UTF-8" in m for m in caplog.messages), caplog.messages
  assert any("step 2 has a non-numeric 'kl/step' value 'abc'" in m for m in caplog.messages)
  assert summary["kl_step_mean"] == pytest.approx((0.02 + 0.08) / 2)
  assert summary["reward_last"] == pytest.approx(0.4)
