"""Tests for gmpo_jax.infra.metrics: JSON lines, resume, TensorBoard, progress, summary, plots."""

import errno
import io
import json
import logging
import math
import os
import pathlib
import shutil
import subprocess
import sys
import time

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
  with MetricsWriter(
      workdir,
      total_steps=total_steps,
      start_step=start_step,
      progress=False,
      best_modes=_BEST_MODES,
  ) as writer:
    for step in steps:
      writer.write(step, _run_metrics(step)[0])
  return writer


class TestToPythonScalar:

  @pytest.mark.parametrize(
      "value, expected, kind",
      [
          (True, 1, int),
          (np.bool_(False), 0, int),
          (jnp.int32(-3), -3, int),
          (np.uint8(7), 7, int),
          (0.1, 0.1, float),
          (np.float32(0.1), float(np.float32(0.1)), float),
          (jnp.bfloat16(1.5), 1.5, float),
          (jnp.asarray(2.25, jnp.float16), 2.25, float),
          (np.array(4.0), 4.0, float),
      ],
  )
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


def _events(workdir, tag="loss"):
  """(step, value) of `tag` as TensorBoard shows it (purges applied)."""
  accumulator = EventAccumulator(str(workdir / TENSORBOARD_DIR))
  accumulator.Reload()
  return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def _interrupted(workdir, *, checkpoint_step=3, logged_to=5):
  """A run that logged steps 1..`logged_to` (the last line cut short by the crash) and
  checkpointed at `checkpoint_step`: the copy of its lines the checkpoint holds."""
  with MetricsWriter(workdir, total_steps=6, progress=False, best_modes=_BEST_MODES) as writer:
    for step in range(1, logged_to + 1):
      writer.write(step, _run_metrics(step)[0])
      if step == checkpoint_step:
        history = writer.history
  with (workdir / METRICS_FILE).open("a") as file:
    file.write('{"step": 6, "loss": 0.1')
  return history


def _resume(workdir, *, history, start_step=3):
  writer = MetricsWriter(
      workdir,
      total_steps=6,
      start_step=start_step,
      history=history,
      progress=False,
      best_modes=_BEST_MODES,
  )
  for step in range(start_step + 1, 7):
    writer.write(step, _run_metrics(step)[0])
  return writer.close()


@pytest.fixture
def straight(tmp_path):
  """An uninterrupted run of steps 1-6: (workdir, summary)."""
  workdir = tmp_path / "straight"
  return workdir, _write_run(workdir, range(1, 7)).summary()


def _assert_same_run(workdir, straight):
  reference, summary = straight
  assert (workdir / METRICS_FILE).read_bytes() == (reference / METRICS_FILE).read_bytes()
  assert json.loads((workdir / SUMMARY_FILE).read_text()) == summary
  for tag in ("loss", "tokens"):
    assert _events(workdir, tag) == _events(reference, tag)


class TestResume:

  def test_the_checkpoint_copy_is_what_was_logged_up_to_it(self, tmp_path):
    history = _interrupted(tmp_path)
    lines = (tmp_path / METRICS_FILE).read_bytes().splitlines(keepends=True)
    assert history == b"".join(lines[:3])
    assert [json.loads(line)["step"] for line in history.splitlines()] == [1, 2, 3]

  def test_resumed_run_equals_uninterrupted(self, tmp_path, straight, caplog):
    history = _interrupted(tmp_path)
    with caplog.at_level(logging.WARNING, logger="gmpo_jax.infra.metrics"):
      writer = MetricsWriter(
          tmp_path,
          total_steps=6,
          start_step=3,
          history=history,
          progress=False,
          best_modes=_BEST_MODES,
      )
    # The lines after the checkpoint are the interrupted run's: dropped without a word.
    assert not caplog.records
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    with pytest.raises(ValueError, match="comes before"):
      writer.write(3, {"loss": 1.0})
    for step in range(4, 7):
      writer.write(step, _run_metrics(step)[0])
    assert writer.close() == straight[1]
    # TensorBoard hides the interrupted run's steps 4-5 (the purge marker), so the curves of
    # both runs are the same too.
    _assert_same_run(tmp_path, straight)
    assert [step for step, _ in _events(tmp_path)] == [1, 2, 3, 4, 5, 6]

  def test_a_deleted_file_is_restored_from_the_checkpoint(self, tmp_path, straight, caplog):
    history = _interrupted(tmp_path)
    (tmp_path / METRICS_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="gmpo_jax.infra.metrics"):
      _resume(tmp_path, history=history)
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / METRICS_FILE} is missing; restored its 3 records up to step 3 from the "
        "checkpoint."
    ]
    # The best values of steps 1-3 count again: the summary is the uninterrupted run's.
    _assert_same_run(tmp_path, straight)

  @pytest.mark.parametrize(
      "damage", ["0xff byte", "changed digit", "deleted line", "truncated", "emptied"]
  )
  def test_a_damaged_line_before_the_checkpoint_is_moved_aside_never_dropped(
      self, tmp_path, straight, caplog, damage
  ):
    history = _interrupted(tmp_path)
    path = tmp_path / METRICS_FILE
    lines = path.read_bytes().splitlines(keepends=True)
    if damage == "0xff byte":
      lines[1] = lines[1][:10] + b"\xff" + lines[1][11:]
    elif damage == "changed digit":
      lines[1] = lines[1].replace(b'"step": 2', b'"step": 7')
    elif damage == "deleted line":
      del lines[1]
    elif damage == "truncated":
      lines = [lines[0], lines[1][:20]]
    else:
      lines = []
    damaged = b"".join(lines)
    path.write_bytes(damaged)
    with caplog.at_level(logging.WARNING, logger="gmpo_jax.infra.metrics"):
      _resume(tmp_path, history=history)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    if damage == "emptied":
      assert "is missing; restored its 3 records" in messages[0]
    else:
      moved = tmp_path / f"{METRICS_FILE}.damaged-1"
      assert moved.read_bytes() == damaged  # kept as it was, for inspection
      assert messages[0].startswith(
          f"{path} differs from line 2 on from the copy of its records " "up to step 3"
      )
      assert f"moved it to {moved} and restored the 3 records" in messages[0]
    _assert_same_run(tmp_path, straight)

  def test_without_a_copy_lines_up_to_the_checkpoint_are_kept(self, tmp_path, straight, caplog):
    # A checkpoint written before checkpoints carried the history.
    _interrupted(tmp_path)
    with caplog.at_level(logging.WARNING, logger="gmpo_jax.infra.metrics"):
      _resume(tmp_path, history=None)
    assert [r.getMessage() for r in caplog.records] == [
        f"Skipping line 6 of {tmp_path / METRICS_FILE}: cut short (no newline), written as the run "
        "stopped."
    ]
    _assert_same_run(tmp_path, straight)

  def test_without_a_copy_an_unreadable_line_is_moved_aside_not_rewritten_away(
      self, tmp_path, caplog
  ):
    _interrupted(tmp_path)
    path = tmp_path / METRICS_FILE
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = b"\xff" + lines[1][1:]
    damaged = b"".join(lines)
    path.write_bytes(damaged)
    with caplog.at_level(logging.WARNING, logger="gmpo_jax.infra.metrics"):
      _resume(tmp_path, history=None)
    moved = tmp_path / f"{METRICS_FILE}.damaged-1"
    assert moved.read_bytes() == damaged
    assert any(
        f"Line(s) [2] of {path} cannot be parsed" in r.getMessage()
        and f"moved the file to {moved} and kept its 2 readable records up to step 3"
        in r.getMessage()
        for r in caplog.records
    )
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 3, 4, 5, 6]

  def test_a_second_damage_moves_to_the_next_free_name(self, tmp_path):
    history = _interrupted(tmp_path)
    for number in (1, 2):
      (tmp_path / METRICS_FILE).write_bytes(b"damaged\n")
      MetricsWriter(tmp_path, total_steps=6, start_step=3, history=history, progress=False).close()
      assert (tmp_path / f"{METRICS_FILE}.damaged-{number}").read_bytes() == b"damaged\n"

  def test_history_needs_the_start_step(self, tmp_path):
    with pytest.raises(ValueError, match="start_step"):
      MetricsWriter(tmp_path, total_steps=6, history=b"")


def test_read_metrics_skips_bad_utf8_and_json_with_a_warning(tmp_path, caplog):
  (tmp_path / METRICS_FILE).write_bytes(b'{"step": 1}\n{"step": \xff2}\n[1]\n{"step": 3}')
  with caplog.at_level(logging.WARNING, logger="gmpo_jax.infra.metrics"):
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 3}]
  assert [r.getMessage().split(":")[0] for r in caplog.records] == [
      f"Skipping unreadable line {n} of {tmp_path / METRICS_FILE}" for n in (2, 3)
  ]


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

  def test_a_deleted_directory_is_rebuilt_from_the_records(self, tmp_path, straight, caplog):
    history = _interrupted(tmp_path)
    shutil.rmtree(tmp_path / TENSORBOARD_DIR)
    with caplog.at_level(logging.WARNING, logger="gmpo_jax.infra.metrics"):
      _resume(tmp_path, history=history)
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / TENSORBOARD_DIR} holds no event file; rebuilt it from the 3 records of "
        f"{tmp_path / METRICS_FILE}."
    ]
    _assert_same_run(tmp_path, straight)

  def test_event_files_sort_in_the_order_made_whatever_the_clock(
      self, tmp_path, straight, monkeypatch
  ):
    history = _interrupted(tmp_path)
    # A file named by tensorboardX (the time in the name) from an older gmpo_jax is kept in order.
    before = sorted(os.listdir(tmp_path / TENSORBOARD_DIR))
    clock = time.time()
    monkeypatch.setattr(time, "time", lambda: clock - 86400)  # the clock went back a day
    _resume(tmp_path, history=history)
    after = sorted(os.listdir(tmp_path / TENSORBOARD_DIR))
    assert after[: len(before)] == before and len(after) == len(before) + 1
    # So the purge marker of the resumed run is read last, and hides the interrupted run's 4-5.
    _assert_same_run(tmp_path, straight)

  def test_numbers_continue_after_tensorboardx_names(self, tmp_path):
    directory = tmp_path / TENSORBOARD_DIR
    directory.mkdir()
    (directory / "events.out.tfevents.1796660856.host.1796660856920687816").write_bytes(b"")
    with MetricsWriter(tmp_path, total_steps=1, progress=False) as writer:
      writer.write(1, {"loss": 1.0})
    assert sorted(os.listdir(directory))[-1] == "events.out.tfevents.1796660857.gmpo_jax"


class TestSummaryAndProgress:

  def test_status_lines_replace_the_bar_off_a_terminal(self, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="gmpo_jax.infra.metrics"):
      with MetricsWriter(
          tmp_path, total_steps=7, progress=False, progress_keys=("loss",), status_every=3
      ) as writer:
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
          record.update(
              {
                  "eval/acc": 0.1 * step / 20,
                  "eval/acc/ci_low": 0.05 * step / 20,
                  "eval/acc/ci_high": 0.15 * step / 20,
              }
          )
        writer.write(step, record)
    path = plot_learning_curves(
        tmp_path,
        keys=[["loss", "grad_norm"], "eval/acc"],
        title="task | seed 0",
        filename="panels.png",
    )
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
  code = (
      "import sys, gmpo_jax.infra.metrics; assert 'torch' not in sys.modules; "
      "import torch; assert torch.ones(2).sum().item() == 2.0"
  )
  subprocess.run([sys.executable, "-c", code], check=True)


class _Disk:
  """A disk with `free` bytes left: writes beyond it fail with ENOSPC, after writing what fits."""

  def __init__(self, free: float):
    self.free = free

  def take(self, size: int) -> int:
    if self.free <= 0:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    taken = int(min(size, self.free))
    self.free -= taken
    return taken


@pytest.fixture
def disk(monkeypatch):
  """The disk under the metrics writer's files (metrics.jsonl, events, summary.json)."""
  disk = _Disk(math.inf)

  class FileOnDisk(io.FileIO):

    def write(self, data):
      return super().write(bytes(data)[: disk.take(len(data))])

  def write_bytes(path, data):
    taken = disk.take(len(data))
    write(path, data[:taken])
    if taken < len(data):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  write = pathlib.Path.write_bytes
  # Every file of the metrics writers is opened through `files`.
  monkeypatch.setattr(
      metrics_lib.files, "open", lambda path, mode, buffering: FileOnDisk(path, mode), raising=False
  )
  monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
  return disk


class TestFullDisk:

  @pytest.mark.parametrize("free", ["none", "half the line", "the line and a bit"])
  def test_a_record_is_written_whole_or_not_at_all(self, tmp_path, disk, free):
    writer = MetricsWriter(tmp_path, total_steps=6, progress=False)
    writer.write(1, _run_metrics(1)[0])
    files = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    line = (json.dumps(_run_metrics(2)[1]) + "\n").encode()
    disk.free = {"none": 0, "half the line": len(line) // 2, "the line and a bit": len(line) + 9}[
        free
    ]
    with pytest.raises(OSError) as raised:
      writer.write(2, _run_metrics(2)[0])
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename in {str(path) for path in files}
    # The line went in whole (the event failed), or not at all; the event file is as it was.
    assert (tmp_path / METRICS_FILE).read_bytes() in (
        files[tmp_path / METRICS_FILE],
        files[tmp_path / METRICS_FILE] + line,
    )
    for path, data in files.items():
      if path.name != METRICS_FILE:
        assert path.read_bytes() == data, path

  def test_no_half_written_summary(self, tmp_path, disk):
    _write_run(tmp_path, range(1, 3))
    summary = (tmp_path / SUMMARY_FILE).read_bytes()
    writer = MetricsWriter(tmp_path, total_steps=6, start_step=2, progress=False)
    writer.write(3, _run_metrics(3)[0])
    disk.free = 100
    with pytest.raises(OSError, match=SUMMARY_FILE) as raised:
      writer.close()
    assert raised.value.errno == errno.ENOSPC
    assert (tmp_path / SUMMARY_FILE).read_bytes() == summary
    assert not list(tmp_path.glob("*.tmp"))

  def test_the_error_in_flight_is_the_one_reported(self, tmp_path, disk, capsys):
    with pytest.raises(OSError, match="the save failed"):
      with MetricsWriter(tmp_path, total_steps=6, progress=False) as writer:
        writer.write(1, _run_metrics(1)[0])
        disk.free = 0
        raise OSError(errno.ENOSPC, "the save failed")
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / SUMMARY_FILE).exists()
    assert "Run summary" not in capsys.readouterr().out  # the error is the one line

  def test_once_there_is_space_again_the_run_resumes_identically(self, tmp_path, straight, disk):
    writer = MetricsWriter(tmp_path, total_steps=6, progress=False, best_modes=_BEST_MODES)
    for step in range(1, 4):
      writer.write(step, _run_metrics(step)[0])
    history = writer.history  # the checkpoint at step 3
    writer.write(4, _run_metrics(4)[0])
    disk.free = 500
    with pytest.raises(OSError):
      with writer:
        writer.write(5, _run_metrics(5)[0])
    disk.free = math.inf
    _resume(tmp_path, history=history)
    _assert_same_run(tmp_path, straight)


class _ListWriter(metrics_lib.MetricWriter):
  """A writer as a user would plug one in (W&B, a dashboard): notes each call in `calls`, and
  raises `error` from the methods named in `fails`."""

  def __init__(self, name, calls, *, fails=(), error=RuntimeError):
    self.name, self.calls, self.fails, self.error = name, calls, fails, error

  def _call(self, method, *args):
    self.calls.append((self.name, method, *args))
    if method in self.fails:
      raise self.error(f"{self.name}.{method} failed")

  def write_scalars(self, step, scalars):
    self._call("write_scalars", step, dict(scalars))

  def flush(self):
    self._call("flush")

  def close(self):
    self._call("close")


class TestWriterInterface:

  def test_multi_writer_calls_each_writer_in_order(self):
    calls = []
    writer = metrics_lib.MultiWriter([_ListWriter(name, calls) for name in "abc"])
    writer.write_scalars(4, {"loss": 0.5})
    writer.flush()
    writer.close()
    assert calls == [
        *((name, "write_scalars", 4, {"loss": 0.5}) for name in "abc"),
        *((name, "flush") for name in "abc"),
        *((name, "close") for name in "abc"),
    ]

  def test_a_failed_write_stops_before_the_later_writers(self):
    calls = []
    writer = metrics_lib.MultiWriter(
        [
            _ListWriter("a", calls),
            _ListWriter("b", calls, fails=("write_scalars",)),
            _ListWriter("c", calls),
        ]
    )
    with pytest.raises(RuntimeError, match="b.write_scalars failed"):
      writer.write_scalars(1, {"loss": 0.5})
    assert [name for name, *_ in calls] == ["a", "b"]

  @pytest.mark.parametrize("method", ["flush", "close"])
  def test_flush_and_close_reach_every_writer_and_raise_the_first_error(self, method, caplog):
    calls = []
    writer = metrics_lib.MultiWriter(
        [
            _ListWriter("a", calls, fails=(method,), error=OSError),
            _ListWriter("b", calls),
            _ListWriter("c", calls, fails=(method,), error=ValueError),
        ]
    )
    with caplog.at_level(logging.ERROR, logger="gmpo_jax.infra.metrics"):
      with pytest.raises(OSError, match=f"a.{method} failed"):
        getattr(writer, method)()
    assert calls == [(name, method) for name in "abc"]
    assert [r.getMessage() for r in caplog.records] == [
        f"_ListWriter failed as well: ValueError('c.{method} failed')"
    ]

  def test_extra_writers_get_each_record_as_python_scalars_and_close_with_it(self, tmp_path):
    calls = []
    with MetricsWriter(
        tmp_path, total_steps=6, progress=False, extra_writers=[_ListWriter("user", calls)]
    ) as writer:
      for step in range(1, 4):
        writer.write(step, _run_metrics(step)[0])
    assert calls[-1] == ("user", "close")
    written = [(step, scalars) for _, _, step, scalars in calls[:-1]]
    # Python scalars with NaN and inf as they are (metrics.jsonl writes them as null).
    assert all(type(v) in (int, float) for _, scalars in written for v in scalars.values())
    assert math.isnan(written[1][1]["kl"])
    nulled = [
        {"step": step, **{k: v if math.isfinite(v) else None for k, v in scalars.items()}}
        for step, scalars in written
    ]
    assert nulled == [_run_metrics(step)[1] for step in range(1, 4)] == read_metrics(tmp_path)

  def test_a_record_metrics_jsonl_failed_to_take_reaches_no_extra_writer(self, tmp_path, disk):
    calls = []
    writer = MetricsWriter(
        tmp_path, total_steps=6, progress=False, extra_writers=[_ListWriter("user", calls)]
    )
    writer.write(1, {"loss": 1.0})
    disk.free = 0
    with pytest.raises(OSError):
      writer.write(2, {"loss": 0.5})
    assert calls == [("user", "write_scalars", 1, {"loss": 1.0})]
