"""A compile-time plan of one RL step on a TPU topology: memory, cost and fit, from a CPU host.

One concept: the compile-time plan of a step on a TPU topology (compile, cost, fit, report),
hence its length.

With libtpu installed, `jax.experimental.topologies.get_topology_desc` describes the devices of a
TPU slice (e.g. "v5p:2x2x1", four chips) without any hardware, and `jax.jit(...).lower(...)
.compile()` for a mesh over them runs the real TPU compiler. `plan` compiles every program of the
step (`gmpo_jax.runner.abstract_step`: prefill, decode, π_old / π_ref log-probs, the update) on
the run's mesh and reads what the compiler says of each:

  * HBM per chip (`compiled.memory_analysis()`: arguments, outputs, temporaries), against the
    chip's capacity; a program that does not fit is refused by the compiler (RESOURCE_EXHAUSTED,
    with the bytes it needed), and `plan` then looks for the first change that fits, in order:
    FSDP over every chip, per-layer remat (update), twice the micro-batches (update, while they
    split), half the log-prob chunk (logprob), else more chips.
  * Cost (`compiled.cost_analysis()`: FLOPs, bytes accessed and `optimal_seconds`, the compiler's
    estimate of the time). The TPU cost model prices the body of a loop once, whatever its trip
    count, so every loop is costed per iteration from variants compiled beside the real
    program, the same program (same rows, T, mesh, shardings) with one knob changed:
      - layers (a `lax.scan` over L): variants with 1 and 2 layers, unrolled, so no layer loop;
        X(L) = X(1) + (L - 1)(X(2) - X(1));
      - decode windows (the sampler's decode loop reads the first w cache slots, w growing
        window by window, `sampling.read_windows`): a step's cost is affine in w, so the
        variants read the mean window over the rollout's steps (`mean_decode_window`);
      - log-prob chunks (`token_logprobs`' scans over n chunks of T forward and n blocks of V
        backward, each priced once, i.e. at 1/n of the whole): a 1-layer variant with half
        the `chunk_size` (n' chunks) gives the whole W = (X_n' - X_n)/(1/n' - 1/n), and
        the program gets (1 - 1/n) W more;
      - micro-batches (the update's `lax.scan` over M): the variants are the loop's body, one
        micro-batch's gradient (`abstract_step.gradient_program`), and the part after the loop
        (`abstract_step.optimizer_program`, the full model): M x X_gradient(L) + X_optimizer.
    Custom calls priced at -1 s (`UNPRICED_CUSTOM_CALLS`) are added back first.
    The attention kernel is priced analytically instead (`gmpo_jax.runner.perf.attention_flops`
    at the chip's peak, added): the cost model counts no FLOPs in a Pallas kernel (splash, a
    `tpu_custom_call`; the time it gives the call, for its operands, stays in), and the
    blockwise kernel's loops are priced one tile at a time (that tile stays in the compiler's
    count: at most one [block x block] tile per layer counted twice). A decode step
    has no such loop (its dense kernel over its window of slots is priced by the compiler).

Every time and MFU here is compiler-estimated: the cost model is a model, not a measurement.
MFU = model FLOPs (`gmpo_jax.runner.perf`, PaLM's convention) / (seconds x peak x chips); decode
reports the fraction of HBM bandwidth its necessary bytes (weights once, the live K/V) use.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import numpy as np

from gmpo_jax.config import ConfigError, ExperimentConfig
from gmpo_jax.infra import hbm as hbm_lib
from gmpo_jax.infra import sharding
from gmpo_jax.models import attention as attention_lib
from gmpo_jax.models import lora as lora_lib
from gmpo_jax.models.transformer import TransformerConfig
from gmpo_jax.rollout import sampling
from gmpo_jax.runner import abstract_step, perf

logger = logging.getLogger(__name__)

GIB = hbm_lib.GIB
# Custom calls the TPU cost model prices at -1 s each (measured, libtpu 0.0.42.1: a program
# with five ConcatBitcast calls reports optimal_seconds = t - 5); `compile_program` adds the
# seconds back. The splash kernel's call (tpu_custom_call) is priced >= 0, without FLOPs.
UNPRICED_CUSTOM_CALLS = ("ConcatBitcast",)
# Per-layer remat policies (`TransformerConfig.remat`) from the most memory to the least.
REMAT_ORDER = ("none", "projections", "full")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
ESTIMATE_NOTE = (
    "compiler-estimated: TPU cost model (optimal_seconds) with loops costed per "
    "iteration and attention at peak; not a measurement"
)


class Target(NamedTuple):
  """A TPU slice to compile for.

  Attributes:
    topology: its name, e.g. "v5p:2x2x1".
    devices: its devices (compile-only: nothing runs on them).
    device_kind: e.g. "TPU v5".
    peak_flops: dense bf16 FLOP/s of one chip (`perf.CHIP_PEAK_TFLOPS`).
    hbm: one chip's HBM capacity and bandwidth (`hbm.CHIP_HBM`; capacity maybe overridden).
  """

  topology: str
  devices: tuple[Any, ...]
  device_kind: str
  peak_flops: float
  hbm: hbm_lib.ChipHBM

  @property
  def chips(self) -> int:
    return len(self.devices)


def tpu_target(topology: str, *, hbm_gib: float | None = None) -> Target:
  """The devices and chip figures of a TPU topology name ("v5e:2x2", "v5p:2x2x1", ...).

  Args:
    topology: a name `jax.experimental.topologies.get_topology_desc` accepts for platform 'tpu'.
    hbm_gib: plan against this HBM per chip instead of the chip's (a budget: room kept for
      something else); the compiler still judges against the chip's own.

  Raises:
    ConfigError: an unknown topology, or libtpu is missing.
  """
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  try:
    devices = tuple(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  except Exception as error:  # pylint: disable=broad-except
    # libtpu raises RuntimeError or JaxRuntimeError depending on what is wrong; both are a bad
    # --topology (or a missing libtpu) to the user.
    raise ConfigError(
        f"--topology={topology!r}: {str(error).splitlines()[0]} (a TPU topology "
        "such as v5e:2x2 or v5p:2x2x1; needs libtpu installed)"
    ) from error
  kind = devices[0].device_kind
  peak, chip = perf.chip_peak_tflops(kind), hbm_lib.chip_hbm(kind)
  if peak is None or chip is None:
    raise ConfigError(f"--topology={topology!r}: no peak or HBM figures for {kind!r}")
  if hbm_gib is not None:
    chip = chip._replace(capacity=hbm_gib * GIB)
  return Target(topology, devices, kind, peak * 1e12, chip)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a plan varies: the mesh, the model (remat), micro-batches and the log-prob chunk."""

  data: int
  fsdp: int
  tensor: int
  model: TransformerConfig
  microbatches: int
  chunk_size: int
  # The cache slots the decode step attends to; None: all of them (the sampler's last window).
  decode_read_slots: int | None = None

  def describe(self) -> str:
    remat = "" if self.model.remat == "none" else f", remat={self.model.remat}"
    return (
        f"data={self.data} fsdp={self.fsdp} tensor={self.tensor}{remat}, "
        f"{self.microbatches} micro-batches, chunk_size={self.chunk_size}"
    )

  def mesh(self, target: Target) -> jax.sharding.Mesh:
    return sharding.make_mesh(
        data=self.data, fsdp=self.fsdp, tensor=self.tensor, devices=target.devices
    )


class Cost(NamedTuple):
  """Per-chip figures of `compiled.cost_analysis()`: FLOPs, bytes accessed, optimal_seconds."""

  flops: float
  bytes: float
  seconds: float

  def __add__(self, other: Cost) -> Cost:
    return Cost(*(a + b for a, b in zip(self, other)))

  def __sub__(self, other: Cost) -> Cost:
    return Cost(*(a - b for a, b in zip(self, other)))

  def scale(self, factor: float) -> Cost:
    return Cost(*(a * factor for a in self))


class Memory(NamedTuple):
  """Per-chip bytes of `compiled.memory_analysis()` (outputs aliased to donated arguments
  counted once), and `held`: what other programs of the step keep on the chips meanwhile
  (the optimizer state while sampling, the sampler's copy of the parameters while learning)."""

  arguments: int
  outputs: int
  temps: int
  aliased: int
  held: int

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temps + self.held


class Compiled(NamedTuple):
  """What the compiler said of one program.

  Attributes:
    fits: it compiled (the compiler refuses a program over the chip's HBM) within the plan's
      capacity.
    need: per-chip bytes it needs: the compiled total, the compiler's figure when it refused,
      or the arguments alone when they already exceed the capacity (then nothing is compiled).
    memory: the compiled program's `Memory`; None if it did not compile.
    cost: its `Cost` as the compiler prices it (loop bodies once); None if it did not compile.
    hlo: its optimized HLO text; '' if it did not compile.
    judged: the compiler saw it (False: refused by the early check, `need` a lower bound).
  """

  fits: bool
  need: float
  memory: Memory | None
  cost: Cost | None
  hlo: str
  judged: bool


_SIZE = re.compile(r"([\d.]+)\s*([KMGT])i?B?\b")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _oom_need(message: str) -> float:
  """The bytes a RESOURCE_EXHAUSTED message says were needed (its first size, e.g. "(27.4G)")."""
  sizes = [float(v) * _UNITS[u] for v, u in _SIZE.findall(message)]
  return sizes[0] if sizes else math.nan


def shard_bytes(tree: Any) -> int:
  """Per-chip bytes of abstract arrays, from their shardings alone."""
  return int(
      sum(
          np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64) * x.dtype.itemsize
          for x in jax.tree.leaves(tree)
      )
  )


def compile_program(
    program: abstract_step.Program,
    mesh: jax.sharding.Mesh,
    *,
    capacity: float,
    temporaries: Any = None,
    held: Any = None,
) -> Compiled:
  """Compiles `program` for `mesh`, or refuses it early when what it must hold cannot fit.

  Args:
    program: the program and its abstract arguments.
    mesh: a mesh over a TPU topology's devices.
    capacity: the plan's HBM bytes per chip.
    temporaries: arrays the program allocates whatever else it does (the update's gradient
      accumulators), counted only in the early check: the compiler counts them itself.
    held: arrays other programs keep on the chips while this one runs, added to its need.
  """
  held_bytes = shard_bytes(held)
  floor = shard_bytes(program.args) + shard_bytes(temporaries) + held_bytes
  if floor > capacity:
    return Compiled(False, floor, None, None, "", False)
  try:
    compiled = program.lower(mesh).compile()
  except jax.errors.JaxRuntimeError as error:
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    return Compiled(False, max(_oom_need(str(error)) + held_bytes, floor), None, None, "", True)
  stats = compiled.memory_analysis()
  memory = Memory(
      stats.argument_size_in_bytes,
      stats.output_size_in_bytes,
      stats.temp_size_in_bytes,
      stats.alias_size_in_bytes,
      held_bytes,
  )
  analysis, hlo = compiled.cost_analysis(), compiled.as_text()
  unpriced = sum(hlo.count(f'custom_call_target="{name}"') for name in UNPRICED_CUSTOM_CALLS)
  seconds = float(analysis.get("optimal_seconds", 0.0)) + unpriced
  if seconds < 0:
    targets = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))
    logger.warning(
        "%s: optimal_seconds %.3g < 0 after %d unpriced custom calls; another custom "
        "call among %s is priced at -1 s",
        program.name,
        seconds,
        unpriced,
        targets,
    )
  cost = Cost(
      float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0)), seconds
  )
  return Compiled(memory.total <= capacity, memory.total, memory, cost, hlo, True)


def collectives(hlo: str) -> dict[str, int]:
  """How many of each collective the optimized HLO holds (static count: a collective inside a
  loop counts once)."""
  return {name: len(re.findall(rf"\b{name}(?:-start)?\(", hlo)) for name in COLLECTIVES}


def attention_kernel(hlo: str, impl: str) -> str:
  """The attention kernel of a program: splash when the HLO calls a Mosaic kernel
  (`tpu_custom_call`), else the XLA-lowered kernel the model resolved (`impl`)."""
  calls = hlo.count('custom_call_target="tpu_custom_call"')
  if calls:
    return f"splash (tpu_custom_call x{calls})"
  return {
      "blockwise": "blockwise (XLA loops, no custom call)",
      "xla": "dense (XLA fusions, no custom call)",
      "splash": "none: splash resolved but no tpu_custom_call in the HLO",
  }.get(impl, impl)


class ProgramPlan(NamedTuple):
  """One program of the step, as the plan reports it (JSON field names).

  Attributes:
    name: 'prefill', 'decode', 'logprob' or 'update'.
    calls: how often one RL step runs it (decode: N - 1 steps; update: the optimizer steps).
    fits: whether it compiled within the HBM capacity.
    hbm_gib / capacity_gib: per-chip need and capacity.
    memory: the compiled `Memory` (GiB per chip), None when it did not fit.
    compiler_flops: FLOPs of one call, every chip, as the compiler prices them with the loops
      costed per iteration; analytic_flops: those it cannot price (attention kernel) added;
      model_flops: the model FLOPs of one call (`perf`).
    estimated_seconds: compiler-estimated time of one call.
    mfu: model FLOPs / (seconds x peak x chips) for prefill, logprob and update; None for decode.
    hbm_bandwidth_fraction: decode: bytes a step must read / (seconds x bandwidth x chips).
    bytes_read_over_needed: decode: bytes accessed (compiler) / bytes a step must read.
    attention_kernel: the kernel found in the HLO.
    collectives: count of each collective in the HLO.
    fix: for a program that does not fit, the first change that fits (None: none found).
  """

  name: str
  calls: int
  fits: bool
  hbm_gib: float
  capacity_gib: float
  memory: dict[str, float] | None
  compiler_flops: float | None
  analytic_flops: float | None
  model_flops: float
  estimated_seconds: float | None
  mfu: float | None
  hbm_bandwidth_fraction: float | None
  bytes_read_over_needed: float | None
  attention_kernel: str | None
  collectives: dict[str, int] | None
  fix: str | None


class Plan(NamedTuple):
  """The whole plan (`to_json` gives the documented schema)."""

  topology: str
  device_kind: str
  chips: int
  mesh: hbm_lib.MeshChoice
  setup: Setup
  shape: abstract_step.StepShape
  model: dict[str, Any]
  programs: tuple[ProgramPlan, ...]
  step: dict[str, float] | None

  def to_json(self) -> dict[str, Any]:
    return {
        "topology": self.topology,
        "device_kind": self.device_kind,
        "chips": self.chips,
        "estimates": ESTIMATE_NOTE,
        "mesh": {
            "data": self.mesh.data,
            "fsdp": self.mesh.fsdp,
            "tensor": self.mesh.tensor,
            "auto_fsdp": self.mesh.sharded,
            "reason": self.mesh.reason,
        },
        "setup": self.setup.describe(),
        "model": self.model,
        "shape": {**self.shape._asdict(), "length": self.shape.length},
        "programs": [p._asdict() for p in self.programs],
        "step": self.step,
    }

  @property
  def refusal(self) -> str | None:
    """The one line of the first program that does not fit (step order), or None."""
    for program in self.programs:
      if not program.fits:
        fix = program.fix or "none found on this topology"
        return (
            f"{program.name} does not fit {self.topology} ({self.setup.describe()}): needs "
            f"{program.hbm_gib:.2f} GiB of {program.capacity_gib:.2f} GiB HBM per chip; "
            f"change that fits: {fix}"
        )
    return None


def model_flops(
    name: str, model: TransformerConfig, shape: abstract_step.StepShape, sampler_rows: int
) -> float:
  """Model FLOPs of one call of a program (`perf`'s convention; decode: one step at the mean
  context of a step whose rows all run to N)."""
  if name == "update":
    return perf.training_flops(model, rows=shape.minibatch_rows, length=shape.length)
  if name == "logprob":
    return perf.forward_flops(model, rows=shape.rows, length=shape.length)
  unembed = 2 * model.hidden_size * model.vocab_size
  body = 2 * perf.matmul_params(model) - unembed
  if name == "prefill":
    return (body * shape.prompt_length + unembed) * sampler_rows + perf.attention_flops(
        model, rows=sampler_rows, length=shape.prompt_length
    )
  context = shape.prompt_length + shape.completion_length / 2
  return sampler_rows * (
      2 * perf.matmul_params(model)
      + 4 * model.num_layers * model.num_heads * model.head_dim * context
  )


def analytic_attention_flops(
    name: str, model: TransformerConfig, shape: abstract_step.StepShape, sampler_rows: int
) -> float:
  """Attention FLOPs of one call that the compiler does not price (module docstring)."""
  if name == "update":
    return 3 * perf.attention_flops(model, rows=shape.minibatch_rows, length=shape.length)
  if name == "logprob":
    return perf.attention_flops(model, rows=shape.rows, length=shape.length)
  if name == "prefill":
    return perf.attention_flops(model, rows=sampler_rows, length=shape.prompt_length)
  return 0.0


def mean_decode_window(config: ExperimentConfig, shape: abstract_step.StepShape) -> int:
  """The cache slots a decode step attends to, averaged over the N − 1 steps of a rollout:
  step s reads the first of `sampling.read_windows` that holds slot P + s − 1 (counted for
  one step per finish check, the TPU default)."""
  _, width = abstract_step.sampler_batch(config, shape)
  new_tokens = shape.completion_length
  windows = sampling.read_windows(width, new_tokens, config.sampling.cache_read_bucket)
  if new_tokens < 2:
    return windows[-1]
  reads = [next(w for w in windows if w >= width + step) for step in range(1, new_tokens)]
  return round(sum(reads) / len(reads))


def decode_bytes_per_step(
    model: TransformerConfig, shape: abstract_step.StepShape, kv_dtype: Any, *, weight_readers: int
) -> float:
  """Bytes a decode step must read over all chips, averaged over a step whose rows all run to
  N (`perf.decode_bytes`: every row's live K/V, and the sampler's compute-dtype weights once
  per `weight_readers`: each chip multiplies its rows by all the weights, which a mesh
  without a tensor axis must bring to every chip, chips / tensor of them)."""
  steps = max(shape.completion_length - 1, 1)
  rows = shape.rows
  sampler_weights = dataclasses.replace(model, param_dtype=model.dtype)
  total = perf.decode_bytes(
      param_bytes=perf.decode_param_bytes(sampler_weights) * weight_readers,
      kv_bytes_per_position=perf.kv_bytes_per_position(model, kv_dtype),
      prompt_lengths=np.full(rows, shape.prompt_length),
      completion_lengths=np.full(rows, shape.completion_length),
  )
  return total / steps


class _Planner:
  """Builds, compiles and costs the programs of one config on one target."""

  def __init__(self, config: ExperimentConfig, target: Target, *, prompt_length: int):
    self.config, self.target, self.prompt_length = config, target, prompt_length

  def shape(self, setup: Setup) -> abstract_step.StepShape:
    return abstract_step.step_shape(
        self.config, prompt_length=self.prompt_length, microbatches=setup.microbatches
    )

  def program(self, name: str, setup: Setup) -> tuple[abstract_step.Program, Any, Any]:
    """The program `name` under `setup`; the arrays it allocates whatever it does (gradient
    accumulators); and what the step's other programs hold meanwhile (`Memory.held`)."""
    mesh = setup.mesh(self.target)
    policy = abstract_step.abstract_policy(
        setup.model,
        mesh,
        lora=self.config.model.lora,
        seed=self.config.seed,
        hbm_bytes=self.target.hbm.capacity,
    )
    shape = self.shape(setup)
    opt_state = abstract_step.abstract_opt_state(
        abstract_step.optimizer_for(self.config, setup.model), policy, mesh
    )
    sampler_copy = abstract_step.sampler_copy(policy)
    kv_dtype = abstract_step.cache_dtype(self.config, setup.model, "tpu")
    chunk = setup.chunk_size
    if name == "update":
      return (
          abstract_step.update_program(self.config, policy, mesh, shape, chunk_size=chunk),
          abstract_step.float32_gradients(policy),
          sampler_copy,
      )
    if name == "logprob":
      return (
          abstract_step.logprob_program(self.config, policy, mesh, shape, chunk_size=chunk),
          None,
          (opt_state, sampler_copy),
      )
    # While sampling, the learner keeps its optimizer state, and its trained parameters where
    # the sampler reads a copy of them rather than the arrays themselves.
    learner_state = (policy.trained if sampler_copy is not None else None, opt_state)
    if name == "prefill":
      return (
          abstract_step.prefill_program(self.config, policy, mesh, shape, kv_dtype=kv_dtype),
          None,
          learner_state,
      )
    if name == "decode":
      return (
          abstract_step.decode_program(
              self.config,
              policy,
              mesh,
              shape,
              kv_dtype=kv_dtype,
              read_slots=setup.decode_read_slots,
          ),
          None,
          learner_state,
      )
    if name == "gradient":
      return (
          abstract_step.gradient_program(self.config, policy, mesh, shape, chunk_size=chunk),
          None,
          None,
      )
    if name == "optimizer":
      return abstract_step.optimizer_program(self.config, policy, mesh), None, None
    raise ValueError(f"unknown program {name!r}")

  def compile(self, name: str, setup: Setup) -> Compiled:
    program, temporaries, held = self.program(name, setup)
    start = time.perf_counter()
    compiled = compile_program(
        program,
        setup.mesh(self.target),
        capacity=self.target.hbm.capacity,
        temporaries=temporaries,
        held=held,
    )
    logger.info(
        "%s (%d layers; %s): %s, %.2f GiB per chip, compiled in %.0f s",
        name,
        setup.model.num_layers,
        setup.describe(),
        "fits" if compiled.fits else "does not fit",
        compiled.need / GIB,
        time.perf_counter() - start,
    )
    return compiled

  def cost(self, name: str, setup: Setup, real: Compiled) -> Cost | None:
    """The compiler's cost of one call with every loop costed per iteration (module docstring);
    None when a variant does not compile within HBM."""
    layers = setup.model.num_layers
    # The update is costed from its loop body, the gradient of one micro-batch.
    body = "gradient" if name == "update" else name
    # A decode step's cost is affine in the slots it reads: priced at the mean window, it is
    # the mean over the steps of a rollout.
    if name == "decode":
      setup = dataclasses.replace(
          setup, decode_read_slots=mean_decode_window(self.config, self.shape(setup))
      )

    def variant(num_layers: int, chunk_size: int) -> Cost | None:
      if body == name != "decode" and layers == num_layers == 1 and chunk_size == setup.chunk_size:
        return real.cost  # the real program is that variant
      model = dataclasses.replace(setup.model, num_layers=num_layers, layer_unroll=num_layers)
      return self.compile(body, dataclasses.replace(setup, model=model, chunk_size=chunk_size)).cost

    one = variant(1, setup.chunk_size)
    two = variant(2, setup.chunk_size) if layers > 1 else one
    if one is None or two is None:
      return None
    total = one + (two - one).scale(layers - 1)
    length = self.shape(setup).length
    chunks = abstract_step.num_chunks(length, setup.chunk_size)
    if name in ("update", "logprob") and chunks > 1:
      half = max(math.ceil(setup.chunk_size / 2), 1)
      more = abstract_step.num_chunks(length, half)
      finer = variant(1, half)
      if finer is None:
        return None
      whole = (finer - one).scale(1 / (1 / more - 1 / chunks))
      total = total + whole.scale(1 - 1 / chunks)
    if name == "update":
      tail = self.compile("optimizer", setup).cost
      if tail is None:
        return None
      total = total.scale(setup.microbatches) + tail
    return total

  def candidates(self, name: str, setup: Setup) -> Iterator[tuple[str, Setup]]:
    """Changes to try, in order, for a program that does not fit (each builds on the last)."""
    chips = self.target.chips
    base, label = setup, []
    if setup.fsdp * setup.tensor < chips:
      base = dataclasses.replace(setup, data=1, fsdp=chips // setup.tensor)
      label.append(f"FSDP over {base.fsdp} (--config.mesh.data=1 --config.mesh.fsdp={base.fsdp})")
      yield "; ".join(label), base
    if name == "update":
      for policy in ("projections", "full"):
        if REMAT_ORDER.index(policy) > REMAT_ORDER.index(base.model.remat):
          remat = dataclasses.replace(base, model=dataclasses.replace(base.model, remat=policy))
          yield " + ".join(
              label + [f"remat={policy} " f"(--config.model.overrides.remat={policy})"]
          ), remat
      if REMAT_ORDER.index(base.model.remat) < REMAT_ORDER.index("full"):
        base = dataclasses.replace(base, model=dataclasses.replace(base.model, remat="full"))
        label.append("remat=full (--config.model.overrides.remat=full)")
    if name == "update":
      shape, batch_split = self.shape(base), base.data * base.fsdp
      micro = base.microbatches * 2
      while shape.minibatch_rows % (micro * batch_split) == 0:
        candidate = dataclasses.replace(base, microbatches=micro)
        yield " + ".join(
            label + [f"{micro} micro-batches " f"(--config.algorithm.num_microbatches={micro})"]
        ), candidate
        micro *= 2
    if name == "logprob":
      chunk = base.chunk_size // 2
      while chunk >= 16:
        yield " + ".join(label + [f"chunk_size {chunk} (--config.chunk_size={chunk})"]), (
            dataclasses.replace(base, chunk_size=chunk)
        )
        chunk //= 2

  def find_fix(self, name: str, setup: Setup, real: Compiled) -> str:
    """The first candidate change under which `name` fits, else an estimate of the chips."""
    last = real
    for label, candidate in self.candidates(name, setup):
      compiled = self.compile(name, candidate)
      if compiled.fits:
        return f"{label}: {compiled.need / GIB:.2f} GiB per chip"
      last = compiled
    chips = self.target.chips
    more = 2 ** math.ceil(math.log2(max(chips * last.need / self.target.hbm.capacity, chips + 1)))
    # A need from the early check counts the arguments and held state only: a lower bound.
    bound = "about" if last.judged else "at least"
    return (
        f"more chips: {bound} {more} of {self.target.device_kind} with FSDP over all of "
        f"them ({last.need / GIB:.2f} GiB per chip on {chips})"
    )


def initial_setup(
    config: ExperimentConfig, model: TransformerConfig, target: Target
) -> tuple[Setup, hbm_lib.MeshChoice]:
  """The run's mesh on `target` (FSDP when a replicated state does not fit, `hbm.auto_fsdp`).

  Chosen from the whole model's parameters and Adam state even with `model.lora`: `build_run`
  fits the mesh before `attach_lora` adapts the policy.
  """
  mesh = sharding.make_mesh(devices=target.devices[:1])
  policy = abstract_step.abstract_policy(model, mesh)
  optimizer = abstract_step.optimizer_for(config, model)
  state = hbm_lib.tree_bytes(policy.params) + hbm_lib.tree_bytes(
      abstract_step.abstract_opt_state(optimizer, policy, mesh)
  )
  try:
    choice = hbm_lib.auto_fsdp(
        data=config.mesh.data,
        fsdp=config.mesh.fsdp,
        tensor=config.mesh.tensor,
        num_devices=target.chips,
        state_bytes=state,
        hbm_bytes=target.hbm.capacity,
    )
  except ValueError as error:
    raise ConfigError(f"config.mesh on {target.topology}: {error}") from error
  setup = Setup(
      choice.data,
      choice.fsdp,
      choice.tensor,
      model,
      config.algorithm.num_microbatches,
      config.chunk_size,
  )
  return setup, choice


def check_batch(config: ExperimentConfig, setup: Setup, shape: abstract_step.StepShape) -> None:
  """The minibatch must split into micro-batches over data x fsdp (as `build_run` checks)."""
  split = setup.data * setup.fsdp * setup.microbatches
  if shape.minibatch_rows % split:
    raise ConfigError(
        f"config: {shape.minibatch_rows} rows per minibatch do not split into "
        f"{setup.microbatches} micro-batches over data x fsdp = {setup.data * setup.fsdp}"
    )
  if config.rollout.devices is not None:
    raise ConfigError(
        "config.rollout.devices: the planner plans a sampler that shares the "
        "learner's devices (None)"
    )


def plan(
    config: ExperimentConfig,
    model: TransformerConfig,
    target: Target,
    *,
    prompt_length: int,
    fit_only: bool = False,
) -> Plan:
  """Compiles and costs every program of one RL step of `config` on `target` (module docstring).

  Args:
    config: the run's typed config.
    model: the policy's architecture (`abstract_step.model_config`).
    target: the TPU slice (`tpu_target`).
    prompt_length: P, prompt tokens per row.
    fit_only: compile each program once, to judge its memory, and cost none (no layer or
      chunk variants: a few times faster; no times, MFU or step estimate).

  Returns:
    The `Plan`; `Plan.refusal` is the one line of a program that does not fit.

  Raises:
    ConfigError: the mesh or batch does not suit the topology.
  """
  setup, choice = initial_setup(config, model, target)
  planner = _Planner(config, target, prompt_length=prompt_length)
  shape = planner.shape(setup)
  check_batch(config, setup, shape)
  sampler_rows, _ = abstract_step.sampler_batch(config, shape)
  kv_dtype = abstract_step.cache_dtype(config, setup.model, "tpu")
  chips, peak, capacity = target.chips, target.peak_flops, target.hbm.capacity
  names = [n for n in abstract_step.PROGRAMS if n != "logprob" or shape.rescorings]
  reports = []
  for name in names:
    real = planner.compile(name, setup)
    calls = {
        "prefill": 1,
        "decode": max(shape.completion_length - 1, 0),
        "logprob": shape.rescorings,
        "update": shape.updates,
    }[name]
    flops = model_flops(name, setup.model, shape, sampler_rows)
    report = dict(
        name=name,
        calls=calls,
        fits=real.fits,
        hbm_gib=real.need / GIB,
        capacity_gib=capacity / GIB,
        memory=None,
        compiler_flops=None,
        analytic_flops=None,
        model_flops=flops,
        estimated_seconds=None,
        mfu=None,
        hbm_bandwidth_fraction=None,
        bytes_read_over_needed=None,
        attention_kernel=None,
        collectives=None,
        fix=None,
    )
    if not real.fits:
      report["fix"] = planner.find_fix(name, setup, real)
      reports.append(ProgramPlan(**report))
      continue
    impl = attention_lib.resolve_impl(
        setup.model.attention_impl,
        backend="tpu",
        dtype=setup.model.dtype,
        num_queries=1 if name == "decode" else 2,
        cached=name in ("prefill", "decode"),
    )
    report.update(
        memory={k: v / GIB for k, v in real.memory._asdict().items()},
        attention_kernel=attention_kernel(real.hlo, impl),
        collectives=collectives(real.hlo),
    )
    cost = None if fit_only else planner.cost(name, setup, real)
    if cost is not None:
      analytic = analytic_attention_flops(name, setup.model, shape, sampler_rows)
      seconds = cost.seconds + analytic / chips / peak
      report.update(
          compiler_flops=cost.flops * chips, analytic_flops=analytic, estimated_seconds=seconds
      )
      if name == "decode":
        needed = decode_bytes_per_step(
            setup.model, shape, kv_dtype, weight_readers=chips // setup.tensor
        )
        report.update(
            hbm_bandwidth_fraction=needed / (seconds * target.hbm.bandwidth * chips),
            bytes_read_over_needed=cost.bytes * chips / needed,
        )
      else:
        report["mfu"] = flops / (seconds * peak * chips)
    reports.append(ProgramPlan(**report))
  return Plan(
      topology=target.topology,
      device_kind=target.device_kind,
      chips=chips,
      mesh=choice,
      setup=setup,
      shape=shape,
      model=_model_summary(setup.model, config, target),
      programs=tuple(reports),
      step=_step(reports, shape, setup.model, chips, peak),
  )


def _model_summary(
    model: TransformerConfig, config: ExperimentConfig, target: Target
) -> dict[str, Any]:
  """The architecture and dtypes planned; with `model.lora`, the adapters ('lora': rank, alpha,
  targets, the base's storage dtype and the adapter parameter count), else 'lora' None."""
  summary = {
      "parameters": perf.param_count(model),
      "layers": model.num_layers,
      "hidden_size": model.hidden_size,
      "vocab_size": model.vocab_size,
      "param_dtype": str(model.param_dtype),
      "dtype": str(model.dtype),
      "attention_impl": model.attention_impl,
      "remat": model.remat,
      "lora": None,
  }
  lora = config.model.lora
  if lora is not None:
    mesh = sharding.make_mesh(devices=target.devices[:1])
    policy = abstract_step.abstract_policy(model, mesh, lora=lora, seed=config.seed)
    summary["lora"] = {
        "rank": lora.rank,
        "alpha": lora.alpha,
        "targets": list(lora.target_paths),
        "base_dtype": lora.base_dtype or model.dtype.name,
        "adapter_parameters": lora_lib.adapter_count(policy.params),
    }
  return summary


def _step(
    reports: list[ProgramPlan],
    shape: abstract_step.StepShape,
    model: TransformerConfig,
    chips: int,
    peak: float,
) -> dict[str, float] | None:
  """Rollout + rescoring + updates of one RL step, when every program was costed."""
  if any(r.estimated_seconds is None for r in reports):
    return None
  seconds = {r.name: r.estimated_seconds * r.calls for r in reports}
  total = sum(seconds.values())
  learner = perf.update_flops(
      model,
      rows=shape.rows,
      length=shape.length,
      num_epochs=shape.epochs,
      rescore_old=not shape.on_policy,
      rescore_ref=shape.rescore_ref,
  )
  everything = sum(r.model_flops * r.calls for r in reports if r.name in ("prefill", "decode"))
  everything += learner
  learner_seconds = seconds.get("update", 0.0) + seconds.get("logprob", 0.0)
  rollout_seconds = seconds.get("prefill", 0.0) + seconds.get("decode", 0.0)
  return {
      "estimated_seconds": total,
      "rollout_seconds": rollout_seconds,
      "learner_seconds": learner_seconds,
      "tokens_per_second_per_chip": shape.rows * shape.length / total / chips,
      "completion_tokens_per_second_per_chip": (
          shape.rows * shape.completion_length / total / chips
      ),
      "learner_mfu": learner / (learner_seconds * peak * chips),
      "step_mfu": everything / (total * peak * chips),
  }
