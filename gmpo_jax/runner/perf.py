"""How fast a run uses its hardware: model FLOPs, decode bytes, chip peaks, MFU.

FLOPs follow the model-FLOPs convention of PaLM ("PaLM: Scaling Language Modeling with
Pathways", Chowdhery et al. 2022, arXiv 2204.02311, appendix B): a training token costs
6·N FLOPs, N the parameters that enter a matrix multiply, plus the attention scores and
values; the FLOPs a run really executes (rematerialization, masked blocks, elementwise ops)
do not count. Two choices of this module, stated once:

  * N counts the q/k/v/o projections (k and v are D x K·head_dim under grouped-query
    attention), the three SwiGLU matrices of every layer, and the unembedding (LM head),
    once, tied to the embedding or not. The embedding lookup is a gather, not a matmul; norm
    scales and biases are not matmul parameters either.
  * Causal attention counts only the query-key pairs under the mask: T(T+1)/2 ≈ T²/2 per
    head, i.e. half of PaLM's 2·2·L·H·head_dim·T² per sequence forward (PaLM counts the full
    square). A full-length causal sequence of T tokens costs forward
    2·2·L·H·head_dim·T(T+1)/2 attention FLOPs; training is 3x the forward (the backward pass
    costs twice the forward); a forward-only rescoring (π_old, π_ref) is 1/3 of training.

MFU = model FLOPs per second / (peak FLOP/s per device x devices). The peak of a known chip
is its dense bf16 figure from `CHIP_PEAK_TFLOPS`; on the CPU it is a measured float32 matmul
(`cpu_matmul_tflops`), which is a probe of what XLA:CPU reaches, not a datasheet number, and
`Peak.source` says which one a figure used.

Decode bandwidth: a decode step must read every weight it multiplies by once and the keys
and values of every live context position of every row; `decode_bytes` sums that over the
decode steps a rollout ran. Divided by the rollout's wall time (which also holds the prefill,
tokenization and host transfers, and a sampler that reads the whole cache capacity reads
more), it is a lower bound on the bandwidth the decode loop reached. One copy of the weights
counts per step: a sampler that replicates them over d devices reads d copies.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gmpo_jax.models.transformer import TransformerConfig

# Dense (no structured sparsity) bf16 peaks in TFLOP/s per chip, matched in order on the lower
# case `jax.Device.device_kind` (more specific names first: "tpu v5 lite" before "tpu v5").
# Sources: the NVIDIA H100 (SXM 989, PCIe 756), H200 and A100 datasheets; Google Cloud's TPU
# system-architecture pages (v4, v5e = "TPU v5 lite", v5p, v6e = "TPU v6 lite").
CHIP_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756.0),
    ("h100", 989.0),
    ("h200", 989.0),
    ("a100", 312.0),
    ("tpu v4", 275.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),
    ("tpu v6 lite", 918.0),
    ("tpu v6e", 918.0),
)

SOURCE_OVERRIDE = "config.perf.peak_tflops"
SOURCE_CPU_PROBE = "measured: float32 matmul probe on this CPU (not a chip peak)"


def matmul_params(config: TransformerConfig) -> int:
  """N = L·(D·H·hd + 2·D·K·hd + H·hd·D + 3·D·F) + D·V: the weights that enter a matmul.

  Args:
    config: the decoder (D hidden, F SwiGLU width, L layers, H query and K key/value heads
      of width hd, V vocabulary).

  Returns:
    N, counting the unembedding once whether or not it is tied to the embedding (module
    docstring).
  """
  d, hd = config.hidden_size, config.head_dim
  attention = d * config.num_heads * hd * 2 + d * config.num_kv_heads * hd * 2
  mlp = 3 * d * config.intermediate_size
  return config.num_layers * (attention + mlp) + d * config.vocab_size


def param_count(config: TransformerConfig) -> int:
  """Every stored parameter of `gmpo_jax.models.Transformer(config)`.

  N (`matmul_params`) plus the embedding table when untied, the norm scales (two per layer,
  the final one, and 2·hd per layer with q/k norms) and the q/k/v biases (Qwen2).
  """
  d, hd, layers = config.hidden_size, config.head_dim, config.num_layers
  per_layer = 2 * d
  if config.attention_bias:
    per_layer += (config.num_heads + 2 * config.num_kv_heads) * hd
  if config.qk_norm:
    per_layer += 2 * hd
  embedding = 0 if config.tie_word_embeddings else config.vocab_size * d
  return matmul_params(config) + layers * per_layer + d + embedding


def attention_flops(
    config: TransformerConfig, *, rows: int, length: int, causal: bool = True
) -> int:
  """Forward FLOPs of the scores QKᵀ and the weighted values over `rows` sequences.

  2·2·L·H·hd·pairs per sequence, with pairs = T(T+1)/2 under a causal mask (each query attends
  to itself and the keys before it) and T² without one (`causal=False`: what a dense kernel
  computes before masking).

  Args:
    config: the decoder.
    rows: sequences.
    length: T, tokens per sequence (every position is computed, padding included).
    causal: count only the pairs under the causal mask.
  """
  pairs = length * (length + 1) // 2 if causal else length * length
  return 2 * 2 * config.num_layers * config.num_heads * config.head_dim * pairs * rows


def forward_flops(config: TransformerConfig, *, rows: int, length: int) -> int:
  """2·N·rows·T + causal attention: one forward pass over [rows, T] tokens (log-probs)."""
  return 2 * matmul_params(config) * rows * length + attention_flops(
      config, rows=rows, length=length
  )


def training_flops(config: TransformerConfig, *, rows: int, length: int) -> int:
  """3x `forward_flops`: forward plus a backward pass of twice its cost (PaLM, appendix B).

  Rematerialization recomputes activations, which is hardware FLOPs, not model FLOPs: it
  does not change the count.
  """
  return 3 * forward_flops(config, rows=rows, length=length)


def update_flops(
    config: TransformerConfig,
    *,
    rows: int,
    length: int,
    num_epochs: int,
    rescore_old: bool,
    rescore_ref: bool,
) -> int:
  """Model FLOPs of one RL update on a rollout of [rows, T] tokens.

  num_epochs·training([rows, T]) (each epoch trains on every row once, whatever the
  minibatch split), plus one forward pass over the rollout for each rescoring that runs: π_old
  (not on-policy, where the update's own forward pass gives it) and π_ref (when β > 0).

  Args:
    config: the policy.
    rows: sequences in the rollout (B·G).
    length: T, the padded width the update processes.
    num_epochs: mu.
    rescore_old: the learner rescores π_old before the update.
    rescore_ref: the learner scores the reference policy.
  """
  forwards = int(rescore_old) + int(rescore_ref)
  return num_epochs * training_flops(config, rows=rows, length=length) + forwards * forward_flops(
      config, rows=rows, length=length
  )


def decode_param_bytes(config: TransformerConfig) -> int:
  """Bytes of the weights one decode step reads, in `config.param_dtype`.

  Every parameter, except an untied embedding table, of which a step gathers one row per
  sequence (B·D elements, left out).
  """
  read = param_count(config)
  if not config.tie_word_embeddings:
    read -= config.vocab_size * config.hidden_size
  return read * jnp.dtype(config.param_dtype).itemsize


def kv_bytes_per_position(config: TransformerConfig, cache_dtype) -> int:
  """2·L·K·hd·itemsize: the keys and values one context position holds in the cache."""
  return (
      2
      * config.num_layers
      * config.num_kv_heads
      * config.head_dim
      * jnp.dtype(cache_dtype).itemsize
  )


def decode_bytes(
    *,
    param_bytes: int,
    kv_bytes_per_position: int,
    prompt_lengths: np.ndarray,
    completion_lengths: np.ndarray,
) -> int:
  """Bytes the decode steps of one rollout must read: weights once per step, live K/V.

  The first completion token comes from the prefill; decode step s = 1 … S - 1, with
  S = max_b ℓ_b, feeds token s - 1 and reads the weights and, for every row b still
  generating (s < ℓ_b), the p_b + s positions of its context:

      bytes = (S - 1)·param_bytes + kv_bytes_per_position · Σ_b Σ_{s=1}^{ℓ_b - 1} (p_b + s)
            = (S - 1)·param_bytes + kv_bytes_per_position · Σ_b (ℓ_b - 1)(p_b + ℓ_b / 2).

  Finished rows, cache slots past the live context, the prefill and the up to k - 1 steps a
  sampler checking for the end every k steps (`SamplingConfig.steps_per_check`) runs after
  the last row stopped are not counted, so the real traffic is at least this.

  Args:
    param_bytes: `decode_param_bytes` of the sampler's model.
    kv_bytes_per_position: `kv_bytes_per_position` at the sampler's cache dtype.
    prompt_lengths: [B] int, real prompt tokens per row (padding excluded).
    completion_lengths: [B] int, generated tokens per row (>= 1: the prefill's token).

  Returns:
    The byte count (0 for a rollout of single-token completions: no decode step ran).
  """
  prompt = np.asarray(prompt_lengths, np.int64)
  length = np.asarray(completion_lengths, np.int64)
  if prompt.shape != length.shape or prompt.ndim != 1:
    raise ValueError(
        f"prompt_lengths {prompt.shape} and completion_lengths {length.shape} "
        "must be equal [B] shapes"
    )
  if length.size == 0 or length.min() < 1:
    raise ValueError("every row has at least the prefill's token (completion_lengths >= 1)")
  steps = int(length.max()) - 1
  # Σ_{s=1}^{ℓ-1} (p + s) = (ℓ - 1)·p + (ℓ - 1)·ℓ / 2, kept in integers.
  positions = int(np.sum((length - 1) * prompt + (length - 1) * length // 2))
  return steps * param_bytes + positions * kv_bytes_per_position


def chip_peak_tflops(device_kind: str) -> float | None:
  """The dense bf16 peak of a `jax.Device.device_kind` in `CHIP_PEAK_TFLOPS`; None if unknown.

  E.g. "NVIDIA H100 80GB HBM3" -> 989, "TPU v5 lite" -> 197, "cpu" -> None.
  """
  kind = device_kind.lower()
  for name, tflops in CHIP_PEAK_TFLOPS:
    if name in kind:
      return tflops
  return None


@functools.cache
def cpu_matmul_tflops(size: int = 1024, budget_seconds: float = 0.25) -> float:
  """The best TFLOP/s of a jitted [size, size] float32 matmul on the CPU, measured once.

  2·size³ FLOPs per product at `Precision.HIGHEST` (the model's float32 setting), repeated
  until `budget_seconds` have passed (at least 3 timed products after one warm-up); the
  fastest counts, since other processes sharing the cores only slow a product down. Cached per
  process.
  """
  # This process's own device (in a multi-process run jax.devices() lists the others' too), on
  # a mesh of its own: the caller may hold a context mesh (the runner's) over other devices.
  device = jax.local_devices(backend="cpu")[0]
  with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("probe",))):
    # NumPy inputs: jax.random would compile four more programs for a one-off measurement.
    rng = np.random.default_rng(0)
    a, b = (jax.device_put(rng.standard_normal((size, size), np.float32), device) for _ in range(2))
    product = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
    product(a, b).block_until_ready()
    best, start, trials = math.inf, time.perf_counter(), 0
    while trials < 3 or time.perf_counter() - start < budget_seconds:
      t0 = time.perf_counter()
      product(a, b).block_until_ready()
      best = min(best, time.perf_counter() - t0)
      trials += 1
  return 2 * size**3 / best / 1e12


class Peak(NamedTuple):
  """The peak a run's MFU divides by.

  Attributes:
    tflops: TFLOP/s of the whole mesh.
    per_device: TFLOP/s of one device (of the host, for the CPU probe).
    source: where the figure comes from: the config override, a chip table entry, or the
      CPU probe (`SOURCE_CPU_PROBE`).
  """

  tflops: float
  per_device: float
  source: str


def mesh_peak(devices: Sequence[jax.Device], *, override: float | None = None) -> Peak | None:
  """The peak FLOP/s of the learner's devices: per-device peak x number of devices.

  The per-device figure is `override` (TFLOP/s per device) if given, else the chip's
  (`chip_peak_tflops`), else on the CPU the measured `cpu_matmul_tflops`. Simulated CPU
  devices of one process share the host's cores, so the probe counts once per process, not
  once per device.

  Returns:
    The `Peak`, or None for an accelerator not in the table without an override (no MFU).
  """
  devices = list(devices)
  if override is not None:
    return Peak(override * len(devices), override, SOURCE_OVERRIDE)
  kind = devices[0].device_kind
  chip = chip_peak_tflops(kind)
  if chip is not None:
    return Peak(chip * len(devices), chip, f"table: {kind}, dense bf16")
  if devices[0].platform == "cpu":
    probe = cpu_matmul_tflops()
    hosts = len({d.process_index for d in devices})
    return Peak(probe * hosts, probe, SOURCE_CPU_PROBE)
  return None


def step_record(
    *,
    flops: int,
    update_seconds: float,
    peak: Peak | None,
    decoded_bytes: int,
    rollout_seconds: float,
) -> dict[str, float]:
  """The `perf/...` metrics of one RL step.

  Returns:
    `perf/train_tflops` = flops / update_seconds / 1e12; `perf/mfu` = that / peak.tflops
    (absent without a peak); `perf/decode_gb_per_s` = decoded_bytes / rollout_seconds / 1e9,
    a lower bound on the decode loop's bandwidth (module docstring; absent when the rollout
    was not sampled in this process, e.g. restored from a checkpoint: rollout_seconds 0).
  """
  tflops = flops / max(update_seconds, 1e-9) / 1e12
  record = {"perf/train_tflops": tflops}
  if peak is not None:
    record["perf/mfu"] = tflops / peak.tflops
  if rollout_seconds > 0:
    record["perf/decode_gb_per_s"] = decoded_bytes / rollout_seconds / 1e9
  return record
