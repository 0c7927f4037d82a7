"""Tests for gmpo_jax.runner.perf: FLOP and byte counts, chip peaks, the CPU probe, the override."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import smoke
from gmpo_jax.config import ConfigError, ExperimentConfig
from gmpo_jax.models.transformer import Transformer, TransformerConfig, init_cache
from gmpo_jax.runner import perf


def _random_config(seed: int, **fixed) -> TransformerConfig:
  rng = np.random.default_rng(seed)
  kv_heads = int(rng.integers(1, 4))
  fields = dict(
      vocab_size=int(rng.integers(16, 300)),
      hidden_size=int(rng.integers(8, 64)),
      intermediate_size=int(rng.integers(8, 96)),
      num_layers=int(rng.integers(1, 4)),
      num_heads=kv_heads * int(rng.integers(1, 4)),
      num_kv_heads=kv_heads,
      head_dim=2 * int(rng.integers(2, 12)),
      tie_word_embeddings=bool(rng.integers(2)),
      attention_bias=bool(rng.integers(2)),
      qk_norm=bool(rng.integers(2)),
  )
  fields.update(fixed)
  return TransformerConfig(**fields)


def _leaves(model: Transformer) -> dict[str, np.ndarray]:
  """'path/to/leaf' -> array of every parameter of a built model."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {"/".join(str(k) for k in path): np.asarray(leaf[...]) for path, leaf in flat}


class TestCounts:
  """The counts against the parameters of real models and float64 sums from the formulas."""

  @pytest.mark.parametrize("seed", range(4))
  def test_parameter_counts_match_a_built_model(self, seed):
    config = _random_config(seed)
    leaves = _leaves(Transformer(config, rngs=nnx.Rngs(0)))
    assert perf.param_count(config) == sum(x.size for x in leaves.values())
    # Matmul weights: every projection, the LM head, and the embedding when it is the head.
    matmul = sum(
        x.size
        for name, x in leaves.items()
        if name.endswith("_proj")
        or name == "lm_head"
        or (name == "embedding" and config.tie_word_embeddings)
    )
    assert perf.matmul_params(config) == matmul
    # One decode step reads every parameter but an untied input embedding (a gather).
    read = sum(
        x.nbytes for name, x in leaves.items() if name != "embedding" or config.tie_word_embeddings
    )
    assert perf.decode_param_bytes(config) == read

  @pytest.mark.parametrize("seed", range(6))
  def test_flops_match_a_per_token_float64_sum(self, seed):
    config = _random_config(seed + 10, num_layers=int(seed % 3) + 1)
    rng = np.random.default_rng(seed)
    rows, length = int(rng.integers(1, 9)), int(rng.integers(1, 70))
    n = np.float64(perf.matmul_params(config))
    forward = np.float64(0.0)
    for t in range(length):  # query t scores t + 1 keys and mixes t + 1 values, per head
      forward += 2 * n + 2 * 2 * config.num_layers * config.num_heads * config.head_dim * (t + 1)
    forward *= rows
    assert perf.forward_flops(config, rows=rows, length=length) == forward
    assert perf.training_flops(config, rows=rows, length=length) == 3 * forward
    full = 2 * 2 * config.num_layers * config.num_heads * config.head_dim * length**2 * rows
    assert perf.attention_flops(config, rows=rows, length=length, causal=False) == full
    for epochs, old, ref in [(1, False, False), (2, True, False), (3, True, True)]:
      assert (
          perf.update_flops(
              config, rows=rows, length=length, num_epochs=epochs, rescore_old=old, rescore_ref=ref
          )
          == (3 * epochs + int(old) + int(ref)) * forward
      )

  def test_a_large_count_is_exact(self):
    config = TransformerConfig.from_name("qwen2.5-1.5b")
    flops = perf.update_flops(
        config, rows=1024, length=4096, num_epochs=4, rescore_old=True, rescore_ref=True
    )
    assert isinstance(flops, int) and flops > 2**53  # beyond float64's integers, still exact
    assert flops == 14 * perf.forward_flops(config, rows=1024, length=4096)

  @pytest.mark.parametrize("tied", [True, False])
  def test_the_forward_count_agrees_with_xla_cost_analysis(self, tied):
    # XLA's HloCostAnalysis counts a while-loop body once (the layer scan), so one layer; the
    # dense kernel computes the whole T x T score square before masking, so the reference is
    # 2·N·tokens + the unmasked attention term. What XLA counts beyond it is elementwise work
    # (RMSNorm, RoPE, softmax, SiLU, the gate product): about 1% at these widths.
    config = TransformerConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=384,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        tie_word_embeddings=tied,
        attention_impl="xla",
    )
    graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
    rows, length = 2, 32

    def logits(state, tokens):
      model = nnx.merge(graphdef, state)
      positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
      return model.logits(model(tokens, positions)[0])

    tokens = jnp.zeros((rows, length), jnp.int32)
    cost = jax.jit(logits).lower(state, tokens).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    ours = 2 * perf.matmul_params(config) * rows * length + perf.attention_flops(
        config, rows=rows, length=length, causal=False
    )
    assert 1.0 <= xla / ours < 1.03, (xla, ours)
    assert perf.forward_flops(config, rows=rows, length=length) < ours  # the causal half


class TestDecodeBytes:

  def test_a_hand_count(self):
    # Row 0: prompt 3, 4 tokens -> steps 1-3 read 3+1, 3+2, 3+3 = 15 positions; row 1: prompt
    # 5, 2 tokens -> step 1 reads 6. Steps run: max length - 1 = 3.
    got = perf.decode_bytes(
        param_bytes=1000,
        kv_bytes_per_position=10,
        prompt_lengths=np.array([3, 5]),
        completion_lengths=np.array([4, 2]),
    )
    assert got == 3 * 1000 + (15 + 6) * 10

  def test_single_token_completions_run_no_decode_step(self):
    assert (
        perf.decode_bytes(
            param_bytes=1000,
            kv_bytes_per_position=10,
            prompt_lengths=np.array([3, 4]),
            completion_lengths=np.array([1, 1]),
        )
        == 0
    )

  def test_bad_lengths_are_refused(self):
    with pytest.raises(ValueError, match="at least the prefill"):
      perf.decode_bytes(
          param_bytes=1,
          kv_bytes_per_position=1,
          prompt_lengths=np.array([2]),
          completion_lengths=np.array([0]),
      )
    with pytest.raises(ValueError, match="equal"):
      perf.decode_bytes(
          param_bytes=1,
          kv_bytes_per_position=1,
          prompt_lengths=np.array([2]),
          completion_lengths=np.array([1, 2]),
      )

  @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
  def test_kv_bytes_per_position_match_the_cache(self, dtype):
    config = _random_config(3)
    batch, capacity = 3, 7
    cache = init_cache(config, batch, capacity, dtype)
    assert (
        perf.kv_bytes_per_position(config, dtype) * batch * capacity
        == cache.k.nbytes + cache.v.nbytes
    )


class TestPeaks:

  @pytest.mark.parametrize(
      "kind, tflops",
      [
          ("NVIDIA H100 80GB HBM3", 989.0),
          ("NVIDIA H100 PCIe", 756.0),
          ("NVIDIA H200", 989.0),
          ("NVIDIA A100-SXM4-80GB", 312.0),
          ("TPU v4", 275.0),
          ("TPU v5 lite", 197.0),
          ("TPU v5e", 197.0),
          ("TPU v5p", 459.0),
          ("TPU v5", 459.0),
          ("TPU v6 lite", 918.0),
          ("TPU v6e", 918.0),
          ("cpu", None),
          ("NVIDIA GeForce RTX 4090", None),
      ],
  )
  def test_chip_table(self, kind, tflops):
    assert perf.chip_peak_tflops(kind) == tflops

  def test_a_known_chip_counts_every_device_of_the_mesh(self):
    chips = [
        types.SimpleNamespace(device_kind="NVIDIA H200", platform="gpu", process_index=0)
        for _ in range(4)
    ]
    peak = perf.mesh_peak(chips)
    assert peak == perf.Peak(4 * 989.0, 989.0, "table: NVIDIA H200, dense bf16")

  def test_an_unknown_accelerator_has_no_peak_without_the_override(self):
    chip = types.SimpleNamespace(
        device_kind="NVIDIA GeForce RTX 4090", platform="gpu", process_index=0
    )
    assert perf.mesh_peak([chip]) is None
    assert perf.mesh_peak([chip, chip], override=165.0) == perf.Peak(
        330.0, 165.0, perf.SOURCE_OVERRIDE
    )

  def test_the_cpu_probe_is_measured_once_and_labelled(self):
    probe = perf.cpu_matmul_tflops()
    assert math.isfinite(probe) and probe > 0
    assert perf.cpu_matmul_tflops() == probe  # cached: one measurement per process
    peak = perf.mesh_peak(jax.devices("cpu"))
    # Simulated CPU devices share the host: the probe counts once per process.
    assert peak == perf.Peak(probe, probe, perf.SOURCE_CPU_PROBE)
    assert "measured" in peak.source and "not a chip peak" in peak.source

  def test_the_override_wins_over_the_table_and_the_probe(self):
    chip = types.SimpleNamespace(device_kind="TPU v4", platform="tpu", process_index=0)
    assert perf.mesh_peak([chip], override=100.0).tflops == 100.0
    assert perf.mesh_peak(jax.devices("cpu")[:1], override=2.5) == perf.Peak(
        2.5, 2.5, perf.SOURCE_OVERRIDE
    )

  def test_the_config_section(self):
    config = smoke.get_config()
    assert ExperimentConfig.from_config(config).perf.peak_tflops is None
    config.perf.peak_tflops = 123.0
    assert ExperimentConfig.from_config(config).perf.peak_tflops == 123.0
    for bad in (0.0, -1.0, math.inf):
      config.perf.peak_tflops = bad
      with pytest.raises(
          ConfigError, match=r"config.perf: peak_tflops=.* must be a finite " r"number > 0 or None"
      ):
        ExperimentConfig.from_config(config)


class TestStepRecord:

  def test_rates(self):
    peak = perf.Peak(200.0, 100.0, perf.SOURCE_OVERRIDE)
    record = perf.step_record(
        flops=6 * 10**12,
        update_seconds=2.0,
        peak=peak,
        decoded_bytes=3 * 10**9,
        rollout_seconds=0.5,
    )
    assert record == pytest.approx(
        {"perf/train_tflops": 3.0, "perf/mfu": 0.015, "perf/decode_gb_per_s": 6.0}
    )

  def test_no_peak_no_mfu_and_a_restored_rollout_no_bandwidth(self):
    record = perf.step_record(
        flops=10**12, update_seconds=1.0, peak=None, decoded_bytes=10**9, rollout_seconds=0.0
    )
    assert record == {"perf/train_tflops": 1.0}
