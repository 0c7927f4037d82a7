"""`python -m gmpo_jax.plan`: compiling the RL step for a TPU topology on this CPU host.

Nothing runs on a TPU: libtpu's compiler judges the programs (memory, cost, fit). Skipped
without libtpu. The compiles are of the smoke config's model (one layer, 32 wide), a few
seconds each.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from gmpo_jax.infra import hbm, sharding

GIB = hbm.GIB


class TestAutoFsdp:

  def test_a_replicated_state_over_the_fraction_is_sharded_over_the_data_devices(self):
    choice = hbm.auto_fsdp(
        data=-1, fsdp=1, tensor=1, num_devices=4, state_bytes=9 * GIB, hbm_bytes=16 * GIB
    )
    assert (choice.data, choice.fsdp, choice.tensor, choice.sharded) == (1, 4, 1, True)
    assert "FSDP over 4" in choice.reason

  def test_a_state_within_the_fraction_keeps_the_mesh(self):
    choice = hbm.auto_fsdp(
        data=-1, fsdp=1, tensor=1, num_devices=4, state_bytes=9 * GIB, hbm_bytes=95 * GIB
    )
    assert (choice.data, choice.fsdp, choice.sharded) == (4, 1, False)

  def test_tensor_parallelism_divides_the_state_and_is_kept(self):
    # 9 GiB over tensor=2 is 4.5 GiB a device: over a quarter of 16 GiB.
    choice = hbm.auto_fsdp(
        data=-1, fsdp=1, tensor=2, num_devices=8, state_bytes=9 * GIB, hbm_bytes=16 * GIB
    )
    assert (choice.data, choice.fsdp, choice.tensor) == (1, 4, 2)
    kept = hbm.auto_fsdp(
        data=-1, fsdp=1, tensor=4, num_devices=8, state_bytes=9 * GIB, hbm_bytes=16 * GIB
    )
    assert (kept.data, kept.fsdp, kept.tensor, kept.sharded) == (2, 1, 4, False)

  def test_an_explicit_fsdp_mesh_or_an_unknown_capacity_is_kept(self):
    explicit = hbm.auto_fsdp(
        data=2, fsdp=2, tensor=1, num_devices=4, state_bytes=99 * GIB, hbm_bytes=16 * GIB
    )
    assert (explicit.data, explicit.fsdp, explicit.sharded) == (2, 2, False)
    unknown = hbm.auto_fsdp(
        data=-1, fsdp=1, tensor=1, num_devices=4, state_bytes=99 * GIB, hbm_bytes=None
    )
    assert (unknown.data, unknown.fsdp, unknown.sharded) == (4, 1, False)

  def test_sizes_that_do_not_divide_the_devices_are_refused(self):
    with pytest.raises(ValueError, match="does not divide"):
      hbm.auto_fsdp(data=3, fsdp=1, tensor=1, num_devices=4, state_bytes=1, hbm_bytes=GIB)

  def test_the_sampler_copy_is_replicated_over_fsdp_when_it_fits(self):
    # Qwen2.5-1.5B in bfloat16 (3.1 GB) on v5e: within a quarter of 16 GiB.
    assert hbm.sampler_replicates(copy_bytes=3.1e9, fsdp=4, tensor=1, hbm_bytes=16 * GIB)
    # 7B (15.2 GB) does not fit a quarter of v5e's HBM, unless split over tensor=4.
    assert not hbm.sampler_replicates(copy_bytes=15.2e9, fsdp=4, tensor=1, hbm_bytes=16 * GIB)
    assert hbm.sampler_replicates(copy_bytes=15.2e9, fsdp=2, tensor=4, hbm_bytes=16 * GIB)
    # Nothing to replicate without fsdp; an unknown capacity (the CPU) keeps the sharding.
    assert not hbm.sampler_replicates(copy_bytes=1, fsdp=1, tensor=1, hbm_bytes=16 * GIB)
    assert not hbm.sampler_replicates(copy_bytes=1, fsdp=4, tensor=1, hbm_bytes=None)

  def test_replicated_over_drops_only_that_axis(self):
    devices = np.asarray(jax.devices("cpu")[:1]).reshape(1, 1, 1)
    mesh = jax.sharding.Mesh(devices, sharding.MESH_AXES)
    named = lambda *spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
    tree = {
        "a": named("fsdp", "tensor"),
        "b": named(("data", "fsdp"), None),
        "c": named(),
        "d": named(
            ("fsdp", "tensor"),
        ),
    }
    got = sharding.replicated_over(tree, "fsdp")
    assert {k: tuple(v.spec) for k, v in got.items()} == {
        "a": (None, "tensor"),
        "b": ("data", None),
        "c": (),
        "d": ("tensor",),
    }

  def test_chip_table(self):
    assert hbm.chip_hbm("TPU v5 lite").capacity == 16 * GIB
    assert hbm.chip_hbm("TPU v5").capacity == 95 * GIB
    assert hbm.chip_hbm("TPU v6 lite").bandwidth == 1638e9
    assert hbm.chip_hbm("cpu") is None
    # A CPU device reports no HBM limit and is in no table.
    assert hbm.device_hbm_bytes(jax.devices("cpu")[0]) is None


def _plan(tmp_path, *flags):
  """Runs the planner CLI on the smoke config; (exit status, stdout, stderr, JSON or None)."""
  path = tmp_path / "plan.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "gmpo_jax.plan",
          "--config=configs/smoke.py",
          "--topology=v5e:2x2",
          "--prompt_length=16",
          f"--json={path}",
          *flags,
      ],
      capture_output=True,
      text=True,
      env=env,
      timeout=600,
      check=False,
      cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
  )
  plan = json.loads(path.read_text()) if path.exists() else None
  return result.returncode, result.stdout, result.stderr, plan


@pytest.fixture
def libtpu():
  pytest.importorskip("libtpu", reason="compiling for a TPU topology needs libtpu")


def test_the_tiny_plan_compiles_every_program_and_writes_the_schema(tmp_path, libtpu):
  # Two layers and chunks of 8 over T = 19: the layer and chunk loops are costed by variants.
  status, out, err, plan = _plan(
      tmp_path, "--config.model.overrides.num_layers=2", "--config.chunk_size=8"
  )
  assert status == 0, err[-2000:]
  assert plan["topology"] == "v5e:2x2" and plan["chips"] == 4
  assert {"data", "fsdp", "tensor"} <= set(plan["mesh"])
  names = [p["name"] for p in plan["programs"]]
  assert names == ["prefill", "decode", "logprob", "update"]
  for program in plan["programs"]:
    assert program["fits"] and 0 < program["hbm_gib"] < program["capacity_gib"] == 16
    assert program["estimated_seconds"] > 0
    assert program["attention_kernel"]
    assert program["compiler_flops"] > 0 and program["model_flops"] > 0
    if program["name"] == "decode":
      assert 0 < program["hbm_bandwidth_fraction"] and program["mfu"] is None
    else:
      assert 0 < program["mfu"] < 1 and program["hbm_bandwidth_fraction"] is None
  update = plan["programs"][-1]
  # Gradients are summed over the data-parallel devices.
  assert update["collectives"]["all-reduce"] > 0
  # Every micro-batch and layer costed: the compiler FLOPs cover the model FLOPs.
  assert update["compiler_flops"] + update["analytic_flops"] >= update["model_flops"]
  assert plan["step"]["estimated_seconds"] > 0
  assert plan["step"]["tokens_per_second_per_chip"] > 0
  assert "compiler-estimated" in out and "compiler-estimated" in plan["estimates"]


def test_a_fit_only_plan_judges_memory_and_costs_nothing(tmp_path, libtpu):
  status, out, err, plan = _plan(tmp_path, "--fit_only")
  assert status == 0, err[-2000:]
  assert [p["name"] for p in plan["programs"]] == ["prefill", "decode", "logprob", "update"]
  for program in plan["programs"]:
    assert program["fits"] and 0 < program["hbm_gib"] < program["capacity_gib"]
    assert program["attention_kernel"] and program["estimated_seconds"] is None
  assert plan["step"] is None and "fit only" in out and "compiler-estimated" not in out
  # One compile a program: no layer or chunk variant.
  assert err.count("compiled in") == len(plan["programs"]), err[-2000:]


def test_a_plan_that_cannot_fit_exits_2_with_one_line(tmp_path, libtpu):
  # Qwen2.5-7B in 1 GiB per chip: its float32 parameters alone, sharded over 4 chips, need
  # 7 GiB, so the planner refuses without compiling, and no change but more chips fits.
  status, _, err, plan = _plan(
      tmp_path, "--model=qwen2.5-7b", "--hbm_gib=1", "--config.model.dtype=bfloat16"
  )
  assert status == 2
  line = err.strip().splitlines()[-1]
  assert line.startswith("error: prefill does not fit v5e:2x2"), err[-2000:]
  assert "needs" in line and "change that fits: more chips" in line
  assert plan["mesh"]["auto_fsdp"] and plan["mesh"]["fsdp"] == 4
  assert not any(p["fits"] for p in plan["programs"])
  assert plan["step"] is None
