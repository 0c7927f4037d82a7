"""The text table `python -m gmpo_jax.plan` prints for a `tpu_plan.Plan`.

Apart from the command line's module so that a test or a notebook can render a plan without
defining the command's absl flags (two modules defining `--config` cannot share a process).
"""

from __future__ import annotations


def _gib(x: float | None) -> str:
  return "-" if x is None else f"{x:.3g}"


def _rate(x: float | None) -> str:
  return "-" if x is None else f"{100 * x:.1f}%"


def _lora_line(lora) -> list[str]:
  """The LoRA adapters planned, as one line (none without `model.lora`)."""
  if lora is None:
    return []
  targets = ", ".join(path.rsplit("/", 1)[-1] for path in lora["targets"])
  return [
      f"  LoRA: rank {lora['rank']}, alpha {lora['alpha']:g} on {targets}; base frozen in "
      f"{lora['base_dtype']}; {lora['adapter_parameters'] / 1e6:.2f}M adapter parameters "
      "trained (the optimizer state and the update cover them alone)"
  ]


def format_plan(plan, *, fit_only: bool = False) -> str:
  """The plan as a text table (every time and MFU compiler-estimated)."""
  lines = [
      f"plan for {plan.topology}: {plan.chips} x {plan.device_kind}; mesh "
      f"{plan.setup.describe()}",
      f"  mesh choice: {plan.mesh.reason}",
      f"  model: {plan.model['parameters'] / 1e9:.3f}B parameters ({plan.model['param_dtype']}"
      f" params, {plan.model['dtype']} compute, attention {plan.model['attention_impl']}); "
      f"{plan.shape.rows} rows x T = {plan.shape.prompt_length} + "
      f"{plan.shape.completion_length}",
      *_lora_line(plan.model["lora"]),
      "  fit only: each program compiled once for its memory, nothing costed"
      if fit_only
      else "  times and MFU are compiler-estimated (TPU cost model, loops costed per iteration)",
      f"  {'program':8} {'calls':>5} {'fits':>4} {'HBM GiB/chip':>18} {'args':>6} "
      f"{'temps':>6} {'out':>6} {'TFLOP cmp/model':>16} {'s/call':>9} {'MFU/BW':>7}  "
      "attention; collectives",
  ]
  for p in plan.programs:
    memory = p.memory or {}
    flops = (
        "-"
        if p.compiler_flops is None
        else f"{(p.compiler_flops + p.analytic_flops) / 1e12:.2f}/{p.model_flops / 1e12:.2f}"
    )
    rate = _rate(p.mfu) if p.name != "decode" else _rate(p.hbm_bandwidth_fraction) + " BW"
    seconds = "-" if p.estimated_seconds is None else f"{p.estimated_seconds:.4g}"
    coll = (
        ""
        if p.collectives is None
        else ", ".join(f"{k} {v}" for k, v in p.collectives.items() if v)
    )
    lines.append(
        f"  {p.name:8} {p.calls:>5} {'yes' if p.fits else 'NO':>4} "
        f"{_gib(p.hbm_gib) + ' / ' + _gib(p.capacity_gib):>18} {_gib(memory.get('arguments')):>6}"
        f" {_gib(memory.get('temps')):>6} {_gib(memory.get('outputs')):>6} {flops:>16} "
        f"{seconds:>9} {rate:>7}  {p.attention_kernel or '-'}; {coll or '-'}"
    )
    if p.fix:
      lines.append(f"    does not fit; change that fits: {p.fix}")
  if plan.step is not None:
    step = plan.step
    lines.append(
        f"  step: {step['estimated_seconds']:.3f} s (rollout {step['rollout_seconds']:.3f} s, "
        f"learner {step['learner_seconds']:.3f} s), "
        f"{step['tokens_per_second_per_chip']:.0f} tokens/s/chip "
        f"({step['completion_tokens_per_second_per_chip']:.0f} completion), learner MFU "
        f"{_rate(step['learner_mfu'])}, step MFU {_rate(step['step_mfu'])} (compiler-estimated)"
    )
  return "\n".join(lines)
