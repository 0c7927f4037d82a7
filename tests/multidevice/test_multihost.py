"""Two processes on JAX's distributed runtime train like one process, and resume together.

`configs/smoke.py` on a (2,2,2) mesh of 8 devices: in this process (8 simulated devices),
and as 2 local processes with 4 simulated devices each, joined by `jax.distributed` through a
coordinator on 127.0.0.1 (Gloo collectives over loopback TCP). The 2-process run is stopped by
SIGTERM to ONE process after its first step (both must stop at the same step and save one
Orbax checkpoint collectively), then restarted; the finished run must log the same metrics and
hold the same checkpointed parameters, optimizer state and key as the 1-process run.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import smoke
from gmpo_jax.infra import distributed
from gmpo_jax.runner import loop, rl_step

ROOT = pathlib.Path(__file__).resolve().parents[2]
OVERRIDES = {
    "mesh.data": 2,
    "mesh.fsdp": 2,
    "mesh.tensor": 2,
    # 16 prompts x 1 sample: evaluation reuses the training rollout's compiled sampler.
    "eval.num_examples": 16,
    "eval.num_samples": 1,
    "eval.k": (1,),
}
NUM_PROCESSES = 2
TIMEOUT_S = 400


def _config():
  config = smoke.get_config()
  for name, value in OVERRIDES.items():
    section, field = name.split(".")
    config[section][field] = value
  return config


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, port):
  """Starts the processes of one multi-process run of `gmpo_jax.main`."""
  env = dict(os.environ)
  env.update(
      XLA_FLAGS="--xla_force_host_platform_device_count=4",
      JAX_PLATFORMS="cpu",
      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
      # JAX's coordinator binds every interface by default; keep all traffic on loopback.
      JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",
      JAX_NUM_PROCESSES=str(NUM_PROCESSES),
      JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
  )
  command = [
      sys.executable,
      "-m",
      "gmpo_jax.main",
      f"--config={ROOT / 'configs/smoke.py'}",
      f"--workdir={workdir}",
  ] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  processes = []
  for process_id in range(NUM_PROCESSES):
    with open(workdir / f"process{process_id}.log", "ab") as log:
      processes.append(
          subprocess.Popen(
              command,
              cwd=ROOT,
              stdout=log,
              stderr=subprocess.STDOUT,
              env={**env, "JAX_PROCESS_ID": str(process_id)},
          )
      )
  return processes


def _wait(processes, workdir):
  """Waits for every process (bounded); kills them all and shows the logs on failure."""
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for p in processes:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()
  codes = [p.returncode for p in processes]
  if codes != [0] * len(processes):
    logs = "\n".join(
        f"--- process {i} ---\n" + (workdir / f"process{i}.log").read_text()[-3000:]
        for i in range(len(processes))
    )
    pytest.fail(f"exit codes {codes} (negative: killed after {TIMEOUT_S}s)\n{logs}")


def _logged_steps(workdir):
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def _metrics(workdir):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if k not in rl_step.TIMING_METRICS} for r in records]


def _checkpoint(directory, step):
  """The model, optimizer state and key saved at `step` under `directory`, as NumPy arrays.

  Read with Orbax directly: the checkpoint was written from 8 devices of two processes, and
  plain host arrays need no restore target of the writer's topology.
  """
  path = directory / str(step) / "state"
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(single-process workdir, two-process workdir, the step the SIGTERM stopped at)."""
  single = tmp_path_factory.mktemp("single")
  loop.train_and_evaluate(_config(), single)

  multi = tmp_path_factory.mktemp("multi")
  processes = _launch(multi, _free_port())
  deadline = time.monotonic() + TIMEOUT_S
  while 1 not in _logged_steps(multi) and time.monotonic() < deadline:
    if any(p.poll() is not None for p in processes):
      break
    time.sleep(0.05)
  # One process only: the other must learn of it through the collective stop check.
  processes[1].send_signal(signal.SIGTERM)
  _wait(processes, multi)
  stopped_at = max(_logged_steps(multi))

  _wait(_launch(multi, _free_port()), multi)
  return single, multi, stopped_at


def test_two_processes_stop_together_then_resume_to_the_end(runs):
  _, multi, stopped_at = runs
  num_steps = _config().num_steps
  assert 1 <= stopped_at < num_steps
  logs = [(multi / f"process{i}.log").read_text() for i in range(NUM_PROCESSES)]
  for i, log in enumerate(logs):
    assert f"process {i} of 2: 4 local of 8 devices" in log
    assert f"resuming from step {stopped_at}" in log
  assert "preemption requested" in logs[0]  # process 0 got no signal but stopped too
  assert _logged_steps(multi) == list(range(num_steps + 1))


def test_two_process_metrics_equal_the_single_process_run(runs):
  single, multi, _ = runs
  want, got = _metrics(single), _metrics(multi)
  assert [r["step"] for r in got] == [r["step"] for r in want]
  assert any(r.get("grad_norm", 0) > 0 for r in want)
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for name in w:
      if w[name] is None:  # a non-finite metric (e.g. reward_shape/tail_index), written as null
        assert g[name] is None, (w["step"], name)
        continue
      np.testing.assert_allclose(
          g[name], w[name], rtol=1e-5, atol=1e-6, err_msg=f"step {w['step']} {name}"
      )


def test_two_process_checkpoint_equals_the_single_process_checkpoint(runs):
  single, multi, _ = runs
  config = _config()
  want = _checkpoint(single / "checkpoints", config.num_steps)
  got = _checkpoint(multi / "checkpoints", config.num_steps)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)
  # RL moved the parameters away from the warm start (so the comparison is not vacuous).
  # The warm start stops at its first probe that reaches the target, as summary.json records.
  warm_steps = json.loads((single / "summary.json").read_text())["warm_start"]["warm_start/steps"]
  before_rl = _checkpoint(single / "warm_start", warm_steps)["model"]
  moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), want["model"], before_rl)
  assert max(jax.tree.leaves(moved)) > 1e-5


def test_distributed_config_from_environment_and_config():
  environ = {
      "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
      "JAX_NUM_PROCESSES": "4",
      "JAX_PROCESS_ID": "3",
  }
  from_env = distributed.DistributedConfig.from_config(None, environ)
  assert (from_env.coordinator_address, from_env.num_processes, from_env.process_id) == (
      "10.0.0.1:1234",
      4,
      3,
  )
  assert from_env.enabled
  # Config values win over the environment; '' / None fall back to it.
  mixed = distributed.DistributedConfig.from_config(
      {"coordinator_address": "", "num_processes": 4, "process_id": 0}, environ
  )
  assert (mixed.coordinator_address, mixed.process_id) == ("10.0.0.1:1234", 0)
  assert not distributed.DistributedConfig.from_config({}, {}).enabled
  assert distributed.DistributedConfig.from_config({"auto_detect": True}, {}).enabled
  # A single-process run starts nothing (safe to call after JAX's backend is up).
  assert distributed.initialize(distributed.DistributedConfig()) is False


@pytest.mark.parametrize(
    "section,environ,match",
    [
        ({"coordinator_address": "127.0.0.1:1234"}, {}, "missing"),
        ({}, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "coordinator_address"),
        (
            {"coordinator_address": "127.0.0.1", "num_processes": 2, "process_id": 0},
            {},
            "host:port",
        ),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {}, "process_id=2"),
        (
            {},
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
            "JAX_NUM_PROCESSES='two'",
        ),
        ({"initialization_timeout": 0}, {}, "initialization_timeout"),
        ({"coordinator": "h:1"}, {}, "unknown distributed options"),
    ],
)
def test_distributed_config_rejects_incomplete_or_invalid_settings(section, environ, match):
  with pytest.raises(ValueError, match=match):
    distributed.DistributedConfig.from_config(section, environ)
