"""The profiler hook: a jax.profiler trace of RL steps first..last, and its config."""

import jax
import jax.numpy as jnp
import pytest

from configs import smoke
from gmpo_jax.config import ConfigError, ExperimentConfig
from gmpo_jax.runner import profiling


def _trace_files(directory):
  return sorted(p for p in directory.rglob("*") if p.is_file())


def test_traces_the_window_and_nothing_else(tmp_path, monkeypatch):
  events = []
  monkeypatch.setattr(jax.profiler, "start_trace", lambda d: events.append(("start", d)))
  monkeypatch.setattr(jax.profiler, "stop_trace", lambda: events.append(("stop",)))
  trace = profiling.StepTrace((3, 4), tmp_path)
  for step in range(1, 7):
    trace.before(step)
    events.append(("step", step))
    trace.after(step)
  assert events == [
      ("step", 1),
      ("step", 2),
      ("start", str(tmp_path)),
      ("step", 3),
      ("step", 4),
      ("stop",),
      ("step", 5),
      ("step", 6),
  ]


def test_a_run_resumed_inside_the_window_traces_and_an_early_end_closes(tmp_path, monkeypatch):
  events = []
  monkeypatch.setattr(jax.profiler, "start_trace", lambda d: events.append("start"))
  monkeypatch.setattr(jax.profiler, "stop_trace", lambda: events.append("stop"))
  trace = profiling.StepTrace((3, 9), tmp_path)
  trace.before(5)  # resumed at step 4
  trace.after(5)
  assert trace.active and events == ["start"]
  trace.close()  # the loop's finally: preempted at step 5
  trace.close()
  assert not trace.active and events == ["start", "stop"]
  never = profiling.StepTrace(None, tmp_path)
  never.before(1), never.after(1), never.close()
  assert events == ["start", "stop"]


def test_writes_a_trace_the_profile_plugin_reads(tmp_path):
  trace = profiling.StepTrace((1, 1), tmp_path)
  trace.before(1)
  jax.jit(lambda x: x @ x)(jnp.ones((64, 64))).block_until_ready()
  trace.after(1)
  assert any(p.name.endswith(".xplane.pb") for p in _trace_files(tmp_path))


@pytest.mark.parametrize("steps", [(0, 3), (4, 3), (1,), (1.0, 2)])
def test_bad_windows_are_config_errors(steps):
  config = smoke.get_config()
  config.perf.profile_steps = steps
  with pytest.raises(ConfigError, match="config.perf: profile_steps="):
    ExperimentConfig.from_config(config)


def test_a_list_from_a_config_file_is_a_window():
  config = smoke.get_config()
  config.perf.profile_steps = [2, 5]
  assert ExperimentConfig.from_config(config).perf.profile_steps == (2, 5)
