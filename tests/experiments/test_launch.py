"""The ablation launcher (`experiments/launch.py`) and its aggregation (`experiments/aggregate.py`).

A fake runner (a script writing metrics.jsonl and summary.json with known values) stands in
for `gmpo_jax.main`, so a 2-point x 2-seed grid on configs/smoke.py runs in seconds through the
real subprocess machinery; the table is checked against means and standard errors worked out by
hand. One real run of the smoke config through the launcher is marked slow.
"""

import csv
import json
import math
import os
import shlex
import sys
import tempfile

import pytest

from configs import ablation_gmpo
from experiments import aggregate, launch

# Per point (offset o: grpo 0, gmpo 10) and seed s, over steps 0..4:
#   eval/pass@1  step 0: 0.1 (s + 1); step 2: 0.2 + 0.1 s; step 4: 0.5 for s = 0, null for s = 1
#   reward/mean  steps 1..4: o + (s + 1) * [1, 4, 2, 3]
#   ratio_min    steps 1..4: 1 - (s + 1) * [0.1, 0.3, 0.2, 0.1]
FAKE_RUNNER = r"""
import json, pathlib, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
workdir = pathlib.Path(args["workdir"])
with open(workdir / "invocations", "a") as f:
  f.write("run\n")
if (workdir / "FAIL").exists():
  print("boom: the fake runner fails on purpose", file=sys.stderr)
  sys.exit(3)
seed = int(args["config.seed"])
offset = {"grpo": 0.0, "gmpo": 10.0}[args["config.algorithm.advantage"]]
records = [{"step": 0, "eval/pass@1": 0.1 * (seed + 1)}]
for t, (r, q) in enumerate(zip([1, 4, 2, 3], [0.1, 0.3, 0.2, 0.1]), start=1):
  records.append({"step": t, "reward/mean": offset + (seed + 1) * r, "ratio_min": 1 - (seed + 1) * q})
records[2]["eval/pass@1"] = 0.2 + 0.1 * seed
records[4]["eval/pass@1"] = 0.5 if seed == 0 else None
(workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
(workdir / "summary.json").write_text(json.dumps({"total_steps": 4, "last_step": 4}))
print("fake run done")
"""

METRICS = "reward/mean,eval/pass@1,ratio_min:min"

# ml_collections loads config files with the deprecated importlib `load_module` (its issue).
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


@pytest.fixture
def fake_runner(tmp_path):
  path = tmp_path / "fake_runner.py"
  path.write_text(FAKE_RUNNER)
  return shlex.join([sys.executable, str(path)])


def _launch(out, runner, *extra):
  return launch.main(
      [
          "--config=configs/smoke.py",
          f"--out={out}",
          "--grid=advantage=grpo,gmpo",
          "--seeds=2",
          f"--runner={runner}",
          f"--metrics={METRICS}",
          *extra,
      ]
  )


def _workdir(out, advantage, seed):
  return out / "runs" / f"advantage={advantage}" / f"seed_{seed}"


def _invocations(out):
  return {
      (a, s): len((_workdir(out, a, s) / "invocations").read_text().splitlines())
      for a in ("grpo", "gmpo")
      for s in (0, 1)
      if (_workdir(out, a, s) / "invocations").exists()
  }


def _table(out):
  with (out / aggregate.TABLE_CSV).open() as f:
    return {(r["point"], r["metric"], r["statistic"]): r for r in csv.DictReader(f)}


def _float(text):
  return float(text) if text else math.nan


def test_grid_runs_and_table_matches_hand_computed_statistics(tmp_path, fake_runner, capsys):
  out = tmp_path / "out"
  assert _launch(out, fake_runner) == 0
  assert _invocations(out) == {(a, s): 1 for a in ("grpo", "gmpo") for s in (0, 1)}
  table = _table(out)
  # (point, metric, statistic) -> (mean, stderr, finite runs); two seeds: se = |x0 - x1| / 2.
  expected = {
      ("advantage=grpo", "reward/mean", "final"): (4.5, 1.5, 2),  # 3, 6
      ("advantage=grpo", "reward/mean", "max"): (6.0, 2.0, 2),  # 4, 8
      ("advantage=gmpo", "reward/mean", "final"): (14.5, 1.5, 2),  # 13, 16
      ("advantage=gmpo", "reward/mean", "max"): (16.0, 2.0, 2),
      ("advantage=grpo", "eval/pass@1", "initial"): (0.15, 0.05, 2),  # 0.1, 0.2
      ("advantage=grpo", "eval/pass@1", "final"): (0.5, math.nan, 1),  # 0.5, null
      ("advantage=grpo", "eval/pass@1", "max"): (0.4, 0.1, 2),  # 0.5, 0.3 (null skipped)
      ("advantage=grpo", "ratio_min", "final"): (0.85, 0.05, 2),  # 0.9, 0.8
      ("advantage=grpo", "ratio_min", "min"): (0.55, 0.15, 2),  # 0.7, 0.4
  }
  for key, (mean, stderr, finite) in expected.items():
    row = table[key]
    assert _float(row["mean"]) == pytest.approx(mean, abs=1e-12), key
    if math.isnan(stderr):
      assert row["stderr"] == "", key
    else:
      assert _float(row["stderr"]) == pytest.approx(stderr, abs=1e-12), key
    assert (int(row["num_finite"]), int(row["num_runs"])) == (finite, 2), key
  assert ("advantage=grpo", "reward/mean", "min") not in table  # only the chosen extreme
  markdown = (out / aggregate.TABLE_MD).read_text()
  # 95% CI half-widths of two seeds: t_{0.975, 1} = 12.706 times the s.e.
  assert "| advantage=grpo | 2/2 | 4 ± 19 | 0.5 (1/2) | 0.85 ± 0.64 |" in markdown
  assert _float(table["advantage=grpo", "reward/mean", "final"]["ci95"]) == pytest.approx(
      12.706205 * 1.5, rel=1e-6
  )
  assert "`algorithm.advantage=gmpo`" in markdown
  with (out / aggregate.RUNS_CSV).open() as f:
    runs = list(csv.DictReader(f))
  assert len(runs) == 4 * 3 * 4  # runs x metrics x (initial, final, gain, extreme)
  # gain = final - initial per run: 0.5 - 0.1 for seed 0; seed 1's final is null.
  assert _float(table["advantage=grpo", "eval/pass@1", "gain"]["mean"]) == pytest.approx(0.4)
  assert "## RL gain (final − step 0)" in markdown
  # Paired by seed: gmpo's finals 13, 16 minus grpo's 3, 6 are 10 and 10, no spread at all,
  # where the unpaired intervals (4 ± 19, 14 ± 19) overlap.
  paired = table["advantage=gmpo", "reward/mean", "final_minus_advantage=grpo"]
  assert (_float(paired["mean"]), _float(paired["stderr"])) == pytest.approx((10.0, 0.0))
  assert "## Final values minus advantage=grpo's, paired by seed" in markdown
  assert (
      "## Extremes over the RL steps (step >= 1) minus advantage=grpo's, paired by seed" in markdown
  )
  assert "| advantage=gmpo | 2 | 10 ± 0 |" in markdown
  for name in (aggregate.CURVES_PNG, aggregate.BARS_PNG):
    data = (out / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
  identity = json.loads((_workdir(out, "gmpo", 1) / launch.RUN_FILE).read_text())
  assert identity["config"]["algorithm"]["advantage"] == "gmpo"
  assert identity["config"]["seed"] == 1
  assert "fake run done" in (_workdir(out, "gmpo", 1) / launch.LOG_FILE).read_text()
  assert "4 finished, 0 skipped, 0 failed" in capsys.readouterr().out


def test_restart_skips_finished_runs_and_reruns_the_rest(tmp_path, fake_runner, capsys):
  out = tmp_path / "out"
  assert _launch(out, fake_runner) == 0
  # An interrupted run: the runner leaves a summary that stops short of the last step.
  (_workdir(out, "gmpo", 0) / "summary.json").write_text(
      json.dumps({"total_steps": 4, "last_step": 2})
  )
  for path in _workdir(out, "grpo", 1).iterdir():  # a run that never started
    path.unlink()
  capsys.readouterr()
  assert _launch(out, fake_runner) == 0
  assert _invocations(out) == {("grpo", 0): 1, ("gmpo", 0): 2, ("grpo", 1): 1, ("gmpo", 1): 1}
  assert "2 already finished, 2 to run" in capsys.readouterr().out
  assert _float(_table(out)["advantage=grpo", "reward/mean", "final"]["mean"]) == 4.5

  # Another config in the same results folder is refused before anything runs.
  assert _launch(out, fake_runner, "--set=steps=7") == 2
  assert "holds a run with other overrides" in capsys.readouterr().err
  assert sum(_invocations(out).values()) == 5

  # --aggregate-only rebuilds the outputs from the folder alone, with the default metrics.
  (out / aggregate.TABLE_MD).unlink()
  assert launch.main(["--aggregate-only", f"--out={out}"]) == 0
  markdown = (out / aggregate.TABLE_MD).read_text()
  assert "not logged by any run: approx_kl, clip_fraction_high" in markdown
  assert "| advantage=gmpo | 2/2 | 0.5 (1/2) |" in markdown


def test_a_failed_run_is_reported_and_the_others_finish(tmp_path, fake_runner, capsys):
  out = tmp_path / "out"
  _workdir(out, "grpo", 0).mkdir(parents=True)
  (_workdir(out, "grpo", 0) / "FAIL").touch()
  assert _launch(out, fake_runner, "--parallel=2") == 1
  printed = capsys.readouterr().out
  log = _workdir(out, "grpo", 0) / launch.LOG_FILE
  assert f"failed: advantage=grpo seed 0 (exit code 3): {log}" in printed
  assert "boom: the fake runner fails on purpose" in printed  # the log's tail
  assert "3 finished, 0 skipped, 1 failed" in printed
  assert "boom" in log.read_text()
  assert all(
      launch.is_finished(_workdir(out, a, s)) for a, s in (("grpo", 1), ("gmpo", 0), ("gmpo", 1))
  )
  row = _table(out)["advantage=grpo", "reward/mean", "final"]
  assert (_float(row["mean"]), row["num_runs"]) == (6.0, "1")  # seed 1 alone
  assert "| advantage=grpo | 1/2 | 6 |" in (out / aggregate.TABLE_MD).read_text()


def test_dry_run_lists_commands_and_a_missing_runner_fails_cleanly(tmp_path, capsys):
  out = tmp_path / "out"
  assert _launch(out, "my-runner --flag", "--dry-run") == 0
  printed = capsys.readouterr().out
  assert f"my-runner --flag --config={os.path.abspath('configs/smoke.py')} --workdir=" in printed
  assert "--config.algorithm.advantage=gmpo --config.seed=1" in printed
  assert not out.exists()
  assert _launch(out, str(tmp_path / "no_such_runner"), "--no-aggregate") == 1
  assert "FAILED advantage=grpo seed 0 (could not start)" in capsys.readouterr().out


# --- Grid parsing and config resolution --------------------------------------------------------


def test_split_values_respects_brackets_and_quotes():
  assert launch.split_values("a, b") == ["a", "b"]
  assert launch.split_values("{'x': 1, 'y': (2, 3)},'p,q',[4, 5]") == [
      "{'x': 1, 'y': (2, 3)}",
      "'p,q'",
      "[4, 5]",
  ]
  for bad in ("{a,b", "a)", "'open"):
    with pytest.raises(ValueError):
      launch.split_values(bad)


def test_aliases_point_names_and_override_order():
  assert launch.expand_key("epsilon") == (
      "algorithm.objective_kwargs.epsilon_low",
      "algorithm.objective_kwargs.epsilon_high",
  )
  assert launch.expand_key("config.optim.b1") == ("optim.b1",)
  with pytest.raises(ValueError, match="--seeds"):
    launch.expand_key("seed")
  with pytest.raises(ValueError, match="alias"):
    launch.expand_key("a..b")
  axes = launch.grid_axes(
      [
          "epsilon=0.2,0.4",
          "optim.b1=0.9",
          "warm_start.optim.b1=0.8",
          "algorithm.objective_kwargs={'clip_mode': 'none'}",
      ]
  )
  point = launch.make_points(axes)[0]
  label = point.name.split(",")[-1]
  assert point.name.startswith("epsilon=0.2,optim.b1=0.9,warm_start.optim.b1=0.8,objective_kwargs=")
  assert label == "objective_kwargs=" + launch.safe_label("{'clip_mode': 'none'}")
  assert launch.safe_label("{'clip_mode': 'none'}") == launch.safe_label("{'clip_mode': 'none'}")
  assert launch.safe_label("{'clip_mode': 'none'}") != launch.safe_label("{'clip_mode': 'token'}")
  assert all(c.isalnum() or c in "._+-" for c in launch.safe_label("{'a': 1}"))
  paths = [o.path for o in point.overrides]
  assert paths.index("algorithm.objective_kwargs") < paths.index(
      "algorithm.objective_kwargs.epsilon_low"
  )  # parents first, as the flag parser requires
  with pytest.raises(ValueError, match="more than once"):
    launch.make_points(launch.grid_axes(["epsilon=0.2", "epsilon_low=0.3"]))


def test_resolve_config_uses_the_runners_flag_parser(tmp_path):
  config = os.path.abspath("configs/smoke.py")

  def spec(*overrides):
    point = launch.Point("p", tuple(overrides))
    return launch.RunSpec(point, 3, config, tmp_path / "p")

  resolved = launch.resolve_config(
      spec(launch.Override("algorithm.objective_kwargs.epsilon_low", "0.25"))
  )
  assert resolved.algorithm.objective_kwargs.epsilon_low == 0.25 and resolved.seed == 3
  with pytest.raises(ValueError, match="p seed 3"):
    launch.resolve_config(spec(launch.Override("algorithm.no_such_field", "1")))
  with pytest.raises(ValueError, match="clip_mode"):  # the algorithm section is validated
    launch.resolve_config(
        spec(
            launch.Override("algorithm.objective", "token_clip"),
            launch.Override(
                "algorithm.objective_kwargs", "{'epsilon_low': 0.2, 'clip_mode': 'none'}"
            ),
        )
    )
  with pytest.raises(ValueError, match="parses to 7"):  # a preset value must survive the flag
    launch.resolve_config(spec(launch.Override("num_steps", "7", "7")))
  with pytest.raises(ValueError, match="prompts_per_step"):  # and every other section too
    launch.resolve_config(spec(launch.Override("prompts_per_step", "0")))


def test_gmpo_design_preset_resolves_to_the_papers_variants(tmp_path):
  config = os.path.abspath("configs/ablation_gmpo.py")
  points = launch.make_points([launch.preset_axis(launch.load_preset(config, "gmpo_design"))])
  assert [p.name for p in points] == [
      "gmpo_full",
      "gmpo_noclip",
      "gmpo_seqclip",
      "gmpo_clip0.2",
      "gmpo_clip0.8",
      "grpo",
      "pm_p1",
      "pm_pm1",
  ]
  got = {}
  for point in points:
    algorithm = launch.resolve_config(launch.RunSpec(point, 0, config, tmp_path)).algorithm
    assert algorithm.advantage == "grpo" and algorithm.loss_agg_mode == "seq-mean-token-mean"
    got[point.name] = (algorithm.objective, algorithm.objective_kwargs.to_dict())
  assert got == {
      "gmpo_full": ("geometric", {"epsilon_low": 0.4, "epsilon_high": 0.4, "clip_mode": "token"}),
      "gmpo_noclip": ("geometric", {"epsilon_low": 0.4, "epsilon_high": 0.4, "clip_mode": "none"}),
      "gmpo_seqclip": (
          "geometric",
          {"epsilon_low": 0.4, "epsilon_high": 0.4, "clip_mode": "sequence"},
      ),
      "gmpo_clip0.2": (
          "geometric",
          {"epsilon_low": 0.2, "epsilon_high": 0.2, "clip_mode": "token"},
      ),
      "gmpo_clip0.8": (
          "geometric",
          {"epsilon_low": 0.8, "epsilon_high": 0.8, "clip_mode": "token"},
      ),
      "grpo": ("token_clip", {"epsilon_low": 0.2, "epsilon_high": 0.2}),
      "pm_p1": (
          "power_mean",
          {"epsilon_low": 0.4, "epsilon_high": 0.4, "clip_mode": "token", "p": 1.0},
      ),
      "pm_pm1": (
          "power_mean",
          {"epsilon_low": 0.4, "epsilon_high": 0.4, "clip_mode": "token", "p": -1.0},
      ),
  }
  stress = ablation_gmpo.get_grid("gmpo_stress")
  assert list(stress) == ["gmpo_full", "gmpo_noclip", "gmpo_seqclip", "grpo"]
  assert all(stress[p] == ablation_gmpo.get_grid("gmpo_design")[p] for p in stress)
  with pytest.raises(ValueError, match="known"):
    ablation_gmpo.get_grid("nope")


def test_mean_stderr_and_metric_specs():
  stat = aggregate.mean_stderr([1.0, 2.0, 4.0, math.nan])
  assert stat.mean == pytest.approx(7 / 3)
  # s^2 = ((1-7/3)^2 + (2-7/3)^2 + (4-7/3)^2) / 2 = 7/3; se = sqrt(7/3 / 3)
  assert stat.stderr == pytest.approx(math.sqrt(7 / 9))
  assert (stat.num_finite, stat.num_runs) == (3, 4)
  assert math.isnan(aggregate.mean_stderr([5.0]).stderr)
  assert math.isnan(aggregate.mean_stderr([]).mean)
  assert aggregate.MetricSpec.parse("ratio_min:min") == aggregate.MetricSpec("ratio_min", "min")
  with pytest.raises(ValueError, match="mode"):
    aggregate.MetricSpec.parse("entropy:lowest")


# --- One real run ------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_smoke_run_through_the_launcher(tmp_path, capsys):
  out = tmp_path / "out"
  cache = os.environ.get(
      "GMPO_JAX_TEST_CACHE", os.path.join(tempfile.gettempdir(), "gmpo_jax_xla_cache")
  )
  assert (
      launch.main(
          [
              "--config=configs/smoke.py",
              f"--out={out}",
              "--set=steps=3",
              f"--xla-cache={cache}",
              "--metrics=eval/pass@1,reward/mean,ratio_max",
          ]
      )
      == 0
  )
  workdir = out / "runs" / "base" / "seed_0"
  assert launch.is_finished(workdir)
  assert json.loads((workdir / "summary.json").read_text())["last_step"] == 3
  assert (workdir / "checkpoints").exists()
  row = _table(out)["base", "reward/mean", "final"]
  assert row["num_finite"] == "1" and math.isfinite(_float(row["mean"]))
  assert "1 finished" in capsys.readouterr().out


# A fake runner for `--shared-warm-start`: a warm-start-only run writes warm_start.json (or fails
# when its workdir holds FAIL); a point run fails unless its init_from holds one.
FAKE_SHARED_RUNNER = r"""
import json, pathlib, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
workdir = pathlib.Path(args["workdir"])
with open(workdir / "invocations", "a") as f:
  f.write("run\n")
if "--warm_start_only" in sys.argv:
  if (workdir / "FAIL").exists():
    sys.exit(3)
  (workdir / "warm_start.json").write_text(json.dumps({"fingerprint": "f", "result": {}}))
  sys.exit(0)
init_from = pathlib.Path(args["config.warm_start.init_from"])
if not (init_from / "warm_start.json").exists():
  sys.exit(4)
(workdir / "init_from").write_text(str(init_from))
(workdir / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 1.0}) + "\n")
(workdir / "summary.json").write_text(json.dumps({"total_steps": 1, "last_step": 1}))
"""


def test_shared_warm_starts_run_first_once_per_seed(tmp_path):
  runner_path = tmp_path / "fake_shared_runner.py"
  runner_path.write_text(FAKE_SHARED_RUNNER)
  runner = shlex.join([sys.executable, str(runner_path)])
  out = tmp_path / "out"

  def run():
    return launch.main(
        [
            "--config=configs/smoke.py",
            f"--out={out}",
            "--seeds=3",
            "--grid=advantage=grpo,gmpo",
            "--shared-warm-start",
            "--parallel=2",
            f"--runner={runner}",
            "--metrics=reward/mean",
        ],
        stream=open(os.devnull, "w"),
    )

  (out / "warm_starts" / "seed_2").mkdir(parents=True)
  (out / "warm_starts" / "seed_2" / "FAIL").touch()
  assert run() == 1  # seed 2's warm start fails, so its points are not run
  for advantage in ("grpo", "gmpo"):
    for seed in (0, 1):
      workdir = _workdir(out, advantage, seed)
      assert (workdir / "init_from").read_text() == str(out / "warm_starts" / f"seed_{seed}")
    assert not (_workdir(out, advantage, 2) / "invocations").exists()
  (out / "warm_starts" / "seed_2" / "FAIL").unlink()
  assert run() == 0  # only seed 2's warm start and points run now
  counts = {
      path.parent.relative_to(out).as_posix(): len(path.read_text().splitlines())
      for path in out.rglob("invocations")
  }
  assert counts == {
      "warm_starts/seed_0": 1,
      "warm_starts/seed_1": 1,
      "warm_starts/seed_2": 2,
      **{f"runs/advantage={a}/seed_{s}": 1 for a in ("grpo", "gmpo") for s in range(3)},
  }


def test_points_selects_and_orders_the_grid_and_by_seed_interleaves_the_seeds(tmp_path):
  points = launch.select_points(
      launch.make_points([launch.preset_axis(ablation_gmpo.get_grid("gmpo_design"))]),
      ["grpo", "gmpo_full"],
  )
  assert [p.name for p in points] == ["grpo", "gmpo_full"]
  specs = launch.plan_runs(points, [0, 1], config="c.py", out=tmp_path, by_seed=True)
  assert [(s.point.name, s.seed) for s in specs] == [
      ("grpo", 0),
      ("gmpo_full", 0),
      ("grpo", 1),
      ("gmpo_full", 1),
  ]
  with pytest.raises(ValueError, match=r"\['nope'\] not in the grid"):
    launch.select_points(points, ["nope"])
