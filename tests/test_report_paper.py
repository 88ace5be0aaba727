"""report_paper: synthetic sweep summaries with known answers: paired KL ratios and their bootstrap,
unpaired and single-seed cells, the minibatch controls, lr robustness, clipping, figures, partial
sweeps, the CLI."""

import contextlib
import csv
import importlib.util
import io
import itertools
import json
import math
import os
import pathlib

import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "report_paper.py"
_SPEC = importlib.util.spec_from_file_location("report_paper", _PATH)
rp = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(rp)

STEPS = 12
LRS = (1e-4, 3e-4, 1e-3, 3e-3)
SEEDS = (0, 1, 2, 3)
BASE_KL = (0.002, 0.01, 0.05, 0.0005)  # per-seed scale of grpo's kl/step: cancels in the pairing
NOISE = (0.05, -0.05, 0.02, -0.02)  # per-seed log-noise of proma's ratio: sums to 0 over 4 seeds
WARM = 0.5
# Seed-mean last val per lr (reverse): proma holds up to 3e-4 and collapses from 1e-3, grpo holds
# everywhere, reinforce never reaches the warm start and never collapses.
LAST_VAL = {"proma": (0.45, 0.55, 0.2, 0.1), "grpo": (0.6, 0.6, 0.6, 0.6),
            "reinforce": (0.3, 0.3, 0.3, 0.3), "grpo_2ep": (0.5, 0.5, 0.5, 0.5)}
VAL_OFFSET = (0.02, -0.02, 0.01, -0.01)  # per seed, mean 0


def kl_ratio(arm, seed):
  """kl/step of `arm` over grpo's, at every step, for one seed."""
  return {"grpo": 1.0, "proma": 0.8 * math.exp(NOISE[seed]), "reinforce": 2.0,
          "grpo_2ep": 1.5}[arm]


def summary(task, shape, arm, lr, seed, kl_scale=None, last_val=0.5, clipfrac=None):
  t = np.arange(1, STEPS + 1)
  scale = BASE_KL[seed] * kl_ratio(arm, seed) * (lr / 1e-4) if kl_scale is None else kl_scale
  kl = scale * (1 + 0.5 * np.sin(t))
  curves = {"reward/mean": list(0.1 + 0.02 * t), "kl/step": list(kl), "kl/step_max": list(3 * kl),
            "kl/init": list(np.cumsum(kl)), "entropy": list(1.5 - 0.05 * t),
            "grad/norm": [1.0] * STEPS}
  curves["entropy"][4] = None  # a null value somewhere
  if arm.startswith("grpo"):
    curves["pg/clipfrac"] = [clipfrac if clipfrac is not None else 0.01] * STEPS
  val = {"0": WARM, "4": WARM + 0.1, "8": (WARM + last_val) / 2, "12": last_val}
  val_id = {k: v + 0.2 for k, v in val.items()}
  return {"task": task, "shape": shape, "arm": arm, "algorithm": arm.split("_")[0], "lr": lr,
          "seed": seed, "overrides": {"optim.lr": lr, "seed": seed}, "wall_s": 10.0,
          "steps_done": STEPS, "val": val, "val_id": val_id,
          "curves": {k: [None if v is None else float(v) for v in c] for k, c in curves.items()}}


def write(root, s):
  path = root / s["task"] / s["shape"] / s["arm"] / f"lr{s['lr']:g}_seed{s['seed']}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(s))
  return path


def make_sweep(root, tasks=("reverse", "arith"), arms=("reinforce", "grpo", "proma", "grpo_2ep")):
  """The paper shape for every (task, arm, lr, seed) except: at lr 1e-3 proma lacks seed 3
  (unpaired), at lr 3e-3 proma has seed 0 only (n<2); plus the reverse control mb32_4x8 (proma
  = 0.5 x grpo, lrs 1e-4 and 3e-4, seeds 0-2)."""
  for task, arm, (i, lr), seed in itertools.product(tasks, arms, enumerate(LRS), SEEDS):
    if arm == "proma" and ((lr == 1e-3 and seed == 3) or (lr == 3e-3 and seed != 0)):
      continue
    clipfrac = 0.2 if (arm == "grpo_2ep" and lr >= 1e-3) else None
    write(root, summary(task, "paper", arm, lr, seed, last_val=LAST_VAL[arm][i] + VAL_OFFSET[seed],
                        clipfrac=clipfrac))
  if "reverse" in tasks:
    for arm, lr, seed in itertools.product(("grpo", "proma"), (1e-4, 3e-4), (0, 1, 2)):
      scale = BASE_KL[seed] * (0.5 if arm == "proma" else 1.0) * math.exp(NOISE[seed] * (arm == "proma"))
      write(root, summary("reverse", "mb32_4x8", arm, lr, seed, kl_scale=scale))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  root = tmp_path_factory.mktemp("sweep") / "runs"
  make_sweep(root)
  return root


@pytest.fixture(scope="module")
def report_out(sweep, tmp_path_factory):
  """The CLI run once on the whole synthetic sweep: (output directory, what it printed)."""
  out = tmp_path_factory.mktemp("report") / "out"
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    rp.main([str(sweep), "--out", str(out)])
  return out, printed.getvalue()


def ratio_of(ratio_rows, task, shape, lr, arm, reference="grpo"):
  found = [r for r in ratio_rows if (r["task"], r["shape"], r["lr"], r["arm"], r["reference"])
           == (task, shape, lr, arm, reference)]
  assert len(found) == 1, found
  return found[0]


def test_run_row_statistics():
  s = summary("reverse", "paper", "grpo_2ep", 1e-4, 1, clipfrac=0.3, last_val=0.25)
  s["curves"]["kl/init"][-1] = None  # the last non-null value counts
  row = rp.run_row(s)
  kl = np.array(s["curves"]["kl/step"])
  assert row["kl_step_mean"] == pytest.approx(kl.mean())
  assert row["kl_step_max"] == pytest.approx(kl.max())
  assert row["kl_init_last"] == pytest.approx(s["curves"]["kl/init"][-2])
  assert row["entropy_last"] == pytest.approx(np.mean(s["curves"]["entropy"][-3:]))
  assert row["clipfrac_mean"] == pytest.approx(0.3)
  assert row["reward_first"] == pytest.approx(0.12) and row["reward_last"] == pytest.approx(0.34)
  assert (row["val_0"], row["val_best"], row["val_last"]) == (0.5, 0.6, 0.25)
  assert (row["val_id_0"], row["val_id_best"], row["val_id_last"]) == pytest.approx((0.7, 0.8, 0.45))
  # val_best includes the warm start when training only loses accuracy
  s["val"] = {"0": 0.5, "6": 0.4, "12": 0.3}
  assert rp.run_row(s)["val_best"] == 0.5
  assert rp.run_row(summary("reverse", "paper", "proma", 1e-4, 0))["clipfrac_mean"] is None


def test_paired_ratio_is_the_geometric_mean_with_a_narrow_ci(sweep):
  rows = [rp.run_row(s) for s in rp.load_summaries(sweep)]
  ratios = rp.kl_ratio_rows(rows)
  r = ratio_of(ratios, "reverse", "paper", 1e-4, "proma")
  assert r["n"] == 4 and r["seeds"] == "0 1 2 3"
  assert r["ratio"] == pytest.approx(0.8, rel=1e-9)
  assert r["ci_lo"] <= 0.8 <= r["ci_hi"]
  # per-seed KL spans 100x, the ratio's noise only +-5%: a paired interval is narrow, one that
  # resampled the two arms' seeds independently would span orders of magnitude
  assert r["ci_hi"] / r["ci_lo"] < math.exp(0.1) + 1e-9
  assert ratio_of(ratios, "arith", "paper", 3e-4, "grpo_2ep")["ratio"] == pytest.approx(1.5)
  assert ratio_of(ratios, "arith", "paper", 3e-4, "reinforce")["ratio"] == pytest.approx(2.0)
  vs_reinforce = ratio_of(ratios, "reverse", "paper", 1e-4, "proma", "reinforce")
  assert vs_reinforce["ratio"] == pytest.approx(0.4)
  # no grpo / grpo row, and proma / reinforce only where both ran (not in the control shape)
  assert not [x for x in ratios if x["arm"] == "grpo"]
  assert not [x for x in ratios if x["shape"] == "mb32_4x8" and x["reference"] == "reinforce"]


def test_unpaired_seeds_and_single_seed_cells_are_excluded(sweep, tmp_path):
  rows = [rp.run_row(s) for s in rp.load_summaries(sweep)]
  ratios = rp.kl_ratio_rows(rows)
  r = ratio_of(ratios, "reverse", "paper", 1e-3, "proma")  # grpo's seed 3 has no proma partner
  assert r["n"] == 3 and r["seeds"] == "0 1 2"
  assert r["ratio"] == pytest.approx(0.8 * math.exp(np.mean(NOISE[:3])), rel=1e-9)
  single = ratio_of(ratios, "reverse", "paper", 3e-3, "proma")
  assert single["n"] == 1 and single["ratio"] is None and single["ci_lo"] is None
  table = rp.kl_ratio_table(ratios)
  line = next(x for x in table.splitlines() if "| reverse | paper | 0.003 | proma / grpo |" in x)
  assert "n<2" in line
  path = tmp_path / "kl.csv"
  rp.write_kl_ratios_csv(ratios, path)
  with open(path) as f:
    written = [x for x in csv.DictReader(f) if (x["task"], x["shape"], x["lr"], x["arm"],
                                                x["reference"]) == ("reverse", "paper", "0.003",
                                                                    "proma", "grpo")]
  assert len(written) == 1 and written[0]["n"] == "1" and written[0]["ratio"] == ""


def test_bootstrap_matches_the_enumeration_of_all_resamples():
  ratios = np.array([0.7, 0.8, 0.95])
  logs = np.log(ratios)
  # the 27 equally likely resamples of 3 seeds, and the exact distribution of their mean
  enumerated = np.array([logs[list(i)].mean() for i in itertools.product(range(3), repeat=3)])
  atoms, counts = np.unique(np.round(enumerated, 9), return_counts=True)
  boot = rp.bootstrap_log_means(logs)
  assert boot.shape == (rp.N_BOOT,)
  nearest = np.abs(boot[:, None] - atoms[None, :]).argmin(axis=1)
  assert np.abs(boot - atoms[nearest]).max() < 1e-9
  frequencies = np.bincount(nearest, minlength=atoms.size) / boot.size
  np.testing.assert_allclose(frequencies, counts / 27, atol=0.015)
  for level in (0.95, 0.8):
    tail = 100 * (1 - level) / 2
    expected = np.exp(np.percentile(enumerated, [tail, 100 - tail], method="inverted_cdf"))
    mean, lo, hi = rp.geo_mean_ci(ratios, level=level)
    assert mean == pytest.approx(np.exp(logs.mean()))
    np.testing.assert_allclose([lo, hi], expected, rtol=0.005)
  # reproducible: a fixed numpy seed
  assert rp.geo_mean_ci(ratios) == rp.geo_mean_ci(ratios)


def test_controls_table_puts_the_shapes_side_by_side(sweep):
  rows = [rp.run_row(s) for s in rp.load_summaries(sweep)]
  table = rp.controls_table(rp.kl_ratio_rows(rows))
  lines = table.splitlines()
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  assert header == ["lr", "paper: minibatch 256 = 32 x 8", "mb256_4x64: minibatch 256 = 4 x 64",
                    "mb32_4x8: minibatch 32 = 4 x 8", "mb32_32x1: minibatch 32 = 32 x 1"]
  body = [[c.strip() for c in x.strip("|").split("|")] for x in lines[2:]]
  assert [b[0] for b in body] == ["0.0001", "0.0003"]  # the control shapes' lrs only
  for b in body:
    assert b[1].startswith("0.800 [") and b[1].endswith("n=4")
    assert b[2] == "-" and b[4] == "-"  # shapes not run
    assert b[3].startswith(f"{0.5 * math.exp(np.mean(NOISE[:3])):.3f} [") and b[3].endswith("n=3")
  assert "No reverse control runs" in rp.controls_table([])


def test_lr_robustness_on_a_constructed_collapse(sweep):
  rows = [rp.run_row(s) for s in rp.load_summaries(sweep)]
  robust = {(r["task"], r["shape"], r["arm"]): r for r in rp.lr_robustness_rows(rows)}
  proma = robust[("reverse", "paper", "proma")]
  assert proma["warm"] == pytest.approx(WARM)
  # lr 1e-3 lacks seed 3 (offset -0.01): its seed mean is 0.2 + 0.01 / 3, still a collapse
  assert (proma["holds"], proma["collapse"]) == (3e-4, 1e-3)
  assert (robust[("reverse", "paper", "grpo")]["holds"], robust[("reverse", "paper", "grpo")]
          ["collapse"]) == (3e-3, None)
  reinforce = robust[("reverse", "paper", "reinforce")]
  assert (reinforce["holds"], reinforce["collapse"]) == (None, None)
  table = rp.lr_robustness_table(list(robust.values()))
  line = next(x for x in table.splitlines() if "| reverse | paper | reinforce |" in x)
  assert line.rstrip(" |").endswith("none | none")
  line = next(x for x in table.splitlines() if "| reverse | paper | proma |" in x)
  assert line.rstrip(" |").endswith("0.0003 | 0.001")


def test_clipping_and_seed_mean_tables(sweep):
  rows = [rp.run_row(s) for s in rp.load_summaries(sweep)]
  table = rp.clipping_table(rows)
  line = next(x for x in table.splitlines() if "| arith | paper | 0.001 |" in x)
  assert "0.0100 n=4" in line and "0.2000 (acts) n=4" in line
  line = next(x for x in table.splitlines() if "| arith | paper | 0.0001 |" in x)
  assert "(acts)" not in line
  means = rp.seed_mean_table(rows)
  line = next(x for x in means.splitlines() if "| reverse | paper | proma | 0.0003 |" in x)
  cols = [c.strip() for c in line.strip("|").split("|")]
  expected_kl = np.mean([BASE_KL[s] * kl_ratio("proma", s) * 3 for s in SEEDS]) * np.mean(
      1 + 0.5 * np.sin(np.arange(1, STEPS + 1)))
  assert cols[4] == "4" and float(cols[5]) == pytest.approx(expected_kl, rel=2e-3)
  assert float(cols[7]) == pytest.approx(0.55)  # last val
  assert float(cols[9]) == pytest.approx(0.75)  # last val_id


def test_cli_writes_everything_and_figures_are_real_pngs(report_out):
  out, printed = report_out
  for name in ("runs.csv", "kl_ratios.csv", "report.md"):
    assert (out / name).exists(), name
  with open(out / "runs.csv") as f:
    runs = list(csv.DictReader(f))
  n_paper = 2 * 4 * 4 * 4 - 2 * (1 + 3)  # tasks x arms x lrs x seeds, less proma's missing seeds
  assert len(runs) == n_paper + 12 and list(runs[0]) == list(rp.RUN_FIELDS)
  for task in ("reverse", "arith"):
    for kind in ("frontier", "curves"):
      path = out / f"{kind}_{task}.png"
      data = path.read_bytes()
      assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, (path, len(data))
  report = (out / "report.md").read_text()
  for heading in ("## Runs per task / shape / arm", "## Paired per-step KL ratios", "## Controls",
                  "## Learning-rate robustness", "## GRPO clipping check", "## Seed means"):
    assert heading in report
  assert report in printed
  assert not (out / "frontier_mb32_4x8.png").exists()


def test_a_partial_sweep_still_reports(tmp_path, capsys):
  """arith without grpo, a reverse control cell with one run (and no paper shape: no reverse
  figures), and a summary cut short mid-write."""
  root = tmp_path / "runs"
  make_sweep(root, tasks=("arith",), arms=("reinforce", "proma", "grpo_2ep"))
  write(root, summary("reverse", "mb32_4x8", "proma", 1e-4, 0))
  (root / "arith" / "paper" / "proma" / "lr0.0001_seed9.json").write_text('{"task": "ari')
  out = tmp_path / "out"
  rp.main([str(root), "--out", str(out)])
  printed = capsys.readouterr().out
  report = (out / "report.md").read_text()
  counts = report.split("## Runs per task / shape / arm")[1].split("##")[0]
  assert "| arith | paper | proma | 12 |" in counts and "| reverse | mb32_4x8 | proma | 1 |" in counts
  assert "| arith | paper | grpo |" not in counts
  assert "No reverse control runs" in report
  with open(out / "kl_ratios.csv") as f:
    ratios = list(csv.DictReader(f))
  assert {(r["arm"], r["reference"]) for r in ratios} == {("proma", "reinforce")}
  assert (out / "frontier_arith.png").stat().st_size > 10_000
  assert (out / "curves_arith.png").exists() and not (out / "curves_reverse.png").exists()
  assert "skipping" in printed and "lr0.0001_seed9.json" in printed
  with pytest.raises(SystemExit):
    rp.main([str(tmp_path / "empty"), "--out", str(out)])
  assert os.path.exists(out / "runs.csv")
