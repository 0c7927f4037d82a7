"""Tests for gmpo_jax.infra.metrics: JSON lines, resume, TensorBoard, progress, summary, plots."""

import json
import logging
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gmpo_jax.infra import metrics as metrics_lib
from gmpo_jax.infra.metrics import (
    METRICS_FILE,
    PLOT_FILE,
    SUMMARY_FILE,
    TENSORBOARD_DIR,
    MetricsWriter,
    plot_learning_curves,
    read_metrics,
    to_python_scalar,
)


def _strict_json_lines(path):
  """Parses JSON lines, failing on NaN/Infinity tokens (not JSON, though Python writes them)."""
  def reject(token):
    raise AssertionError(f"non-standard JSON token {token}")
  return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def _run_metrics(step):
  """Deterministic per-step metrics of mixed types, with a NaN at step 2 and an inf at step 5."""
  rng = np.random.default_rng(step)
  loss = np.float32(rng.uniform(0.5, 2.0))
  metrics = {
      "loss": jnp.asarray(loss),
      "reward": float(rng.uniform()),
      "tokens": np.int64(100 + step),
      "kl": jnp.float32(float("nan")) if step == 2 else jnp.float32(rng.uniform()),
      "grad_norm": np.float64(np.inf) if step == 5 else np.float64(rng.uniform()),
  }
  expected = {
      "step": step,
      "loss": float(loss),
      "reward": metrics["reward"],
      "tokens": 100 + step,
      "kl": None if step == 2 else float(np.float32(metrics["kl"])),
      "grad_norm": None if step == 5 else float(metrics["grad_norm"]),
  }
  return metrics, expected


_BEST_MODES = {"loss": "min", "reward": "max", "kl": "min"}


def _write_run(workdir, steps, *, start_step=None, total_steps=6):
  with MetricsWriter(workdir, total_steps=total_steps, start_step=start_step, progress=False,
                     best_modes=_BEST_MODES) as writer:
    for step in steps:
      writer.write(step, _run_metrics(step)[0])
  return writer


class TestToPythonScalar:

  @pytest.mark.parametrize("value, expected, kind", [
      (True, 1, int), (np.bool_(False), 0, int), (jnp.int32(-3), -3, int), (np.uint8(7), 7, int),
      (0.1, 0.1, float), (np.float32(0.1), float(np.float32(0.1)), float),
      (jnp.bfloat16(1.5), 1.5, float), (jnp.asarray(2.25, jnp.float16), 2.25, float),
      (np.array(4.0), 4.0, float),
  ])
  def test_converts(self, value, expected, kind):
    got = to_python_scalar("m", value)
    assert type(got) is kind and got == expected

  def test_rejects_non_scalars_and_non_numbers(self):
    with pytest.raises(ValueError, match="'m' must be a scalar"):
      to_python_scalar("m", jnp.ones(2))
    for bad in ("high", None, {"a": 1}):
      with pytest.raises(TypeError, match="'m' must be numeric"):
        to_python_scalar("m", bad)


class TestJsonLines:

  def test_content_and_nonfinite_values(self, tmp_path):
    writer = _write_run(tmp_path, range(1, 7))
    expected = [_run_metrics(step)[1] for step in range(1, 7)]
    assert _strict_json_lines(tmp_path / METRICS_FILE) == expected
    assert read_metrics(tmp_path) == expected
    assert writer.nonfinite_counts == {"kl": 1, "grad_norm": 1}

  def test_bad_writes_raise(self, tmp_path):
    with MetricsWriter(tmp_path, total_steps=5, progress=False) as writer:
      writer.write(2, {"a": 1.0})
      writer.write(2, {"b": 1.0})  # several records per step are fine
      with pytest.raises(ValueError, match="comes before"):
        writer.write(1, {"a": 1.0})
      with pytest.raises(ValueError, match="reserved"):
        writer.write(3, {"step": 3})
      with pytest.raises(ValueError, match="scalar"):
        writer.write(3, {"a": np.zeros(3)})
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 2]

  def test_fresh_run_empties_an_old_file(self, tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 9, "a": 1}\n')
    _write_run(tmp_path, [1])
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]

  def test_other_processes_write_nothing(self, tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    workdir = tmp_path / "run"
    with MetricsWriter(workdir, total_steps=3, progress=False) as writer:
      writer.write(1, {"a": 1.0})
    assert writer.close() is None
    assert not workdir.exists()


class TestResume:

  def test_resumed_run_equals_uninterrupted(self, tmp_path, caplog):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    summary_straight = _write_run(straight, range(1, 7)).summary()
    # Interrupted run: logged up to step 5 (with a line cut short by the crash),
    # but its last checkpoint is step 3 -> steps 4 and 5 are replayed.
    _write_run(resumed, range(1, 6))
    with (resumed / METRICS_FILE).open("a") as file:
      file.write('{"step": 6, "loss": 0.1')
    with caplog.at_level(logging.WARNING, logger="gmpo_jax.infra.metrics"):
      writer = MetricsWriter(resumed, total_steps=6, start_step=3, progress=False, best_modes=_BEST_MODES)
    assert any("unreadable line 6" in r.getMessage() for r in caplog.records)
    assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3]
    with pytest.raises(ValueError, match="comes before"):
      writer.write(3, {"loss": 1.0})
    for step in range(4, 7):
      writer.write(step, _run_metrics(step)[0])
    summary_resumed = writer.close()

    assert (resumed / METRICS_FILE).read_bytes() == (straight / METRICS_FILE).read_bytes()
    assert summary_resumed == summary_straight
    assert json.loads((resumed / SUMMARY_FILE).read_text()) == summary_straight
    # TensorBoard hides the interrupted run's steps 4-5 (purge_step), so the
    # curves of both runs are the same too.
    for tag in ("loss", "tokens"):
      events = {}
      for run in (straight, resumed):
        accumulator = EventAccumulator(str(run / TENSORBOARD_DIR))
        accumulator.Reload()
        events[run] = [(e.step, e.value) for e in accumulator.Scalars(tag)]
      assert events[resumed] == events[straight]
      assert [step for step, _ in events[resumed]] == [1, 2, 3, 4, 5, 6]


class TestTensorBoard:

  def test_scalars_read_back(self, tmp_path):
    _write_run(tmp_path, range(1, 7))
    accumulator = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    accumulator.Reload()
    assert set(accumulator.Tags()["scalars"]) == {"loss", "reward", "tokens", "kl", "grad_norm"}
    for tag, nonfinite_step in (("loss", None), ("reward", None), ("kl", 2), ("grad_norm", 5)):
      events = accumulator.Scalars(tag)
      # Non-finite values leave a gap, like the null in the JSON lines.
      assert [e.step for e in events] == [s for s in range(1, 7) if s != nonfinite_step]
      for event in events:
        metrics, _ = _run_metrics(event.step)
        # TensorBoard keeps float32.
        assert event.value == np.float32(metrics[tag])


  def test_names_are_made_legal_once_and_silently(self, tmp_path, caplog):
    assert metrics_lib.tensorboard_name("eval/pass@8/ci_low") == "eval/pass_at_8/ci_low"
    assert metrics_lib.tensorboard_name("a b:c") == "a_b_c"
    with caplog.at_level(logging.INFO):
      with MetricsWriter(tmp_path, total_steps=1, progress=False) as writer:
        writer.write(1, {"eval/maj@4": 0.5})
    assert "illegal" not in caplog.text
    accumulator = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    accumulator.Reload()
    assert accumulator.Tags()["scalars"] == ["eval/maj_at_4"]
    # metrics.jsonl keeps the name as logged.
    assert read_metrics(tmp_path)[0]["eval/maj@4"] == 0.5


class TestSummaryAndProgress:

  def test_status_lines_replace_the_bar_off_a_terminal(self, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="gmpo_jax.infra.metrics"):
      with MetricsWriter(tmp_path, total_steps=7, progress=False, progress_keys=("loss",),
                         status_every=3) as writer:
        for step in range(8):
          writer.write(step, {"loss": 1.0 / (step + 1)})
    lines = [r.getMessage() for r in caplog.records if "s/step" in r.getMessage()]
    assert [line.split()[1] for line in lines] == ["3/7", "6/7", "7/7"]
    assert "loss=0.125" in lines[-1] and "ETA 0m00s" in lines[-1]

  def test_add_to_summary_lands_in_summary_json(self, tmp_path):
    with MetricsWriter(tmp_path, total_steps=1, progress=False) as writer:
      writer.write(1, {"loss": 0.5})
      writer.add_to_summary("initial_eval", {"eval/pass@1": 0.25})
      with pytest.raises(ValueError, match="reserved"):
        writer.add_to_summary("final", {})
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary["initial_eval"] == {"eval/pass@1": 0.25} and summary["final"] == {"loss": 0.5}

  def test_close_writes_and_prints_summary(self, tmp_path, capsys):
    summary = _write_run(tmp_path, range(1, 7)).close()
    assert summary is None  # the `with` block already closed it
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    rows = [_run_metrics(step)[1] for step in range(1, 7)]
    losses = [row["loss"] for row in rows]
    rewards = [row["reward"] for row in rows]
    kls = [(row["kl"], row["step"]) for row in rows if row["kl"] is not None]
    assert summary["last_step"] == 6 and summary["num_records"] == 6 and summary["total_steps"] == 6
    assert summary["final"] == {k: v for k, v in rows[-1].items() if k != "step"}
    assert summary["best"] == {
        "loss": {"value": min(losses), "step": 1 + int(np.argmin(losses))},
        "reward": {"value": max(rewards), "step": 1 + int(np.argmax(rewards))},
        "kl": {"value": min(kls)[0], "step": min(kls)[1]},
    }
    assert summary["nonfinite_counts"] == {"kl": 1, "grad_norm": 1}
    printed = capsys.readouterr().out
    assert "best  loss" in printed and "non-finite kl: 1" in printed

  def test_progress_bar_shows_step_and_key_metrics(self, tmp_path, capsys):
    with MetricsWriter(tmp_path, total_steps=10, progress=True, progress_keys=("loss",)) as writer:
      writer.write(3, {"loss": 0.123456, "other": 1.0})
    err = capsys.readouterr().err
    assert "3/10" in err and "loss=0.1235" in err and "other" not in err


class TestPlot:

  def test_png_written(self, tmp_path):
    _write_run(tmp_path, range(1, 7))
    path = plot_learning_curves(tmp_path, keys=["loss", "grad_norm"])
    assert path == tmp_path / PLOT_FILE
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  def test_panels_with_several_keys_intervals_and_title(self, tmp_path):
    with MetricsWriter(tmp_path, total_steps=60, progress=False) as writer:
      for step in range(0, 61):
        record = {"loss": 1.0 / (step + 1), "grad_norm": float(step % 7)}
        if step % 20 == 0:
          record.update({"eval/acc": 0.1 * step / 20, "eval/acc/ci_low": 0.05 * step / 20,
                         "eval/acc/ci_high": 0.15 * step / 20})
        writer.write(step, record)
    path = plot_learning_curves(tmp_path, keys=[["loss", "grad_norm"], "eval/acc"],
                                title="task | seed 0", filename="panels.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="at least one metric"):
      plot_learning_curves(tmp_path, keys=[[]])

  def test_ema_skips_gaps_and_starts_unbiased(self):
    values = np.array([np.nan, 2.0, np.nan, 4.0])
    smoothed = metrics_lib.ema(values, 0.5)
    assert np.isnan(smoothed[0]) and smoothed[1] == 2.0 and smoothed[2] == 2.0
    assert smoothed[3] == pytest.approx((0.25 * 2.0 + 4.0) / 1.25)
    np.testing.assert_allclose(metrics_lib.ema(np.arange(5.0), 0.0), np.arange(5.0))
    with pytest.raises(ValueError, match="smoothing"):
      metrics_lib.ema(values, 1.0)

  def test_all_null_key_and_errors(self, tmp_path):
    with MetricsWriter(tmp_path, total_steps=2, progress=False) as writer:
      writer.write(1, {"loss": 1.0, "broken": float("nan")})
    assert plot_learning_curves(tmp_path, keys=["broken"], filename="b.png").exists()
    with pytest.raises(ValueError, match=r"\['nope'\] not found; available: \['broken', 'loss'\]"):
      plot_learning_curves(tmp_path, keys=["nope"])
    with pytest.raises(ValueError, match="No metrics"):
      plot_learning_curves(tmp_path / "empty", keys=["loss"])


def test_the_metrics_writer_does_not_import_torch():
  pytest.importorskip("torch")  # tensorboardX imports it only when it is installed
  code = ("import sys, gmpo_jax.infra.metrics; assert 'torch' not in sys.modules; "
          "import torch; assert torch.ones(2).sum().item() == 2.0")
  subprocess.run([sys.executable, "-c", code], check=True)
