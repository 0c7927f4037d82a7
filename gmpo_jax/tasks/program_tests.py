"""`program_tests`: write a program from input/output examples; reward = tests passed.

The founding document (seeds/000, §5) names code generation, where the number of tests
passed ranges over 0..100, as a case for the geometric-mean baseline. Here the prompt
shows `num_shown` input/output pairs of a hidden integer function, and the completion is
a program in the `minilang` expression language (one variable `x`; + - * // %, unary
minus, parentheses, abs/min/max; see `gmpo_jax.tasks.minilang`):

    prompt "f(3)=7; f(-2)=-3; f(0)=1; f(5)=11; f(x)="   completion "2*x+1"

The program is run on `num_tests` (K) hidden inputs, disjoint from the shown ones:

    R = (number of hidden tests passed) + min_reward,   R in [min_reward, K + min_reward]

A completion that does not parse passes no test; a run that divides by zero, leaves
[-max_magnitude, max_magnitude] or exceeds the step bound fails that test. With the
default min_reward = 0.01 and K = 100, R spans four orders of magnitude.

Data: each hidden function is a random expression of depth <= `max_depth` (constants 1..9,
divisors 2..9) that depends on x, is not constant on [x_min, x_max] and stays within
|f(x)| <= 10**6 there. Functions are drawn from one `random.Random(seed)` stream and
deduplicated by their values on the whole range [x_min, x_max], so that no function of
'test' (the first `num_test` drawn) equals, as a function on that range, one of 'train'.
Each example's shown and hidden inputs are distinct values of [x_min, x_max].
"""

import dataclasses
import random
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from gmpo_jax.tasks import base, minilang

# Largest |f(x)| of a generated function on [x_min, x_max]: keeps prompts short.
_MAX_OUTPUT = 10**6
_FORMS = ("+", "-", "*", "//", "%", "abs", "min", "max")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProgramTestsData(base.DataParams):
  """Data parameters of `program_tests` (see the module docstring).

  Attributes:
    num_shown: input/output pairs shown in the prompt.
    num_tests: K, hidden test cases per problem.
    x_min, x_max: inputs are drawn from [x_min, x_max] (|x| <= 10**6).
    max_depth: nesting depth of the generated hidden functions (1..4).
    num_train, num_test: split sizes.
    seed: seed of the problem generator.
  """

  num_shown: int = base.data_field(4, key="shown")
  num_tests: int = base.data_field(20, key="tests")
  x_min: int = base.data_field(-50, key="x_min")
  x_max: int = base.data_field(50, key="x_max")
  max_depth: int = base.data_field(2, key="depth")
  num_train: int = base.data_field(3_000, key="train")
  num_test: int = base.data_field(300, key="test")
  seed: int = base.data_field(0, key="seed")

  def __post_init__(self):
    base.check_int("num_shown", self.num_shown, minimum=0)
    base.check_int("num_tests", self.num_tests, minimum=1)
    base.check_int("x_min", self.x_min, minimum=-_MAX_OUTPUT, maximum=_MAX_OUTPUT)
    base.check_int("x_max", self.x_max, minimum=self.x_min, maximum=_MAX_OUTPUT)
    if self.x_max - self.x_min + 1 < self.num_shown + self.num_tests:
      raise ValueError(
          f"[x_min, x_max] = [{self.x_min}, {self.x_max}] has fewer than "
          f"num_shown + num_tests = {self.num_shown + self.num_tests} distinct inputs"
      )
    base.check_int("max_depth", self.max_depth, minimum=1, maximum=4)
    base.check_int("num_train", self.num_train, minimum=0)
    base.check_int("num_test", self.num_test, minimum=0)
    base.check_int("seed", self.seed, minimum=0)


def random_expression(rng: random.Random, depth: int, *, top: bool = True) -> str:
  """A random minilang expression of nesting depth <= `depth` (may be constant in x)."""
  # The top level is always an operation, so that the function is rarely trivial.
  if depth == 0 or (not top and rng.random() < 0.25):
    return "x" if rng.random() < 0.6 else str(rng.randint(1, 9))
  form = rng.choice(_FORMS)
  left = random_expression(rng, depth - 1, top=False)
  if form == "abs":
    return f"abs({left})"
  if form in ("//", "%"):
    expression = f"{left}{form}{rng.randint(2, 9)}"
  else:
    right = random_expression(rng, depth - 1, top=False)
    if form in ("min", "max"):
      return f"{form}({left},{right})"
    expression = f"{left}{form}{right}"
  return expression if top else f"({expression})"


def generate_programs(
    *,
    num_shown: int,
    num_tests: int,
    x_min: int,
    x_max: int,
    max_depth: int,
    num_train: int,
    num_test: int,
    seed: int,
) -> dict[str, list[dict[str, Any]]]:
  """Deterministic 'train' and 'test' problems with disjoint functions (module docstring).

  Returns:
    {'train': [...], 'test': [...]}; each example holds 'question' (the prompt),
    'solution' (the hidden program), 'shown_inputs'/'shown_outputs' (tuples of
    num_shown ints) and 'test_inputs'/'test_outputs' (tuples of num_tests ints).

  Raises:
    ValueError: the generator found fewer distinct functions than requested.
  """
  domain = range(x_min, x_max + 1)
  wanted = num_train + num_test
  max_attempts = 100 * wanted + 1000
  rng = random.Random(seed)
  seen_sources: set[str] = set()
  seen: set[tuple[int, ...]] = set()
  problems = []
  for _ in range(max_attempts):
    if len(problems) == wanted:
      break
    source = random_expression(rng, max_depth)
    # Repeated sources are common and cannot give a new function: skip them unevaluated.
    if source in seen_sources:
      continue
    seen_sources.add(source)
    program = minilang.compile_program(source)
    try:
      values = tuple(minilang.run_program(program, x) for x in domain)
    except minilang.MiniLangRuntimeError:  # An intermediate value out of range.
      continue
    # A function constant on the domain (which includes every x-free expression) is
    # rejected, and so is one already drawn.
    if len(set(values)) == 1 or max(map(abs, values)) > _MAX_OUTPUT or values in seen:
      continue
    seen.add(values)
    inputs = rng.sample(domain, num_shown + num_tests)
    outputs = [values[x - x_min] for x in inputs]
    shown = "; ".join(f"f({x})={y}" for x, y in zip(inputs[:num_shown], outputs[:num_shown]))
    problems.append(
        {
            "question": f"{shown}; f(x)=" if shown else "f(x)=",
            "solution": source,
            "shown_inputs": tuple(inputs[:num_shown]),
            "shown_outputs": tuple(outputs[:num_shown]),
            "test_inputs": tuple(inputs[num_shown:]),
            "test_outputs": tuple(outputs[num_shown:]),
        }
    )
  if len(problems) < wanted:
    raise ValueError(
        f"found only {len(problems)} distinct functions in {max_attempts} draws, "
        f"{wanted} requested: lower num_train/num_test or widen max_depth/[x_min, x_max]"
    )
  return {"test": problems[:num_test], "train": problems[num_test:]}


class ProgramTestsBuilder(base.GeneratedBuilder):
  """TFDS builder of the `program_tests` task's problems."""

  name = "gmpo_program_tests"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  params_cls = ProgramTestsData
  BUILDER_CONFIGS = [base.ParamsConfig(params=ProgramTestsData())]

  def _info(self) -> tfds.core.DatasetInfo:
    shown = (self.params.num_shown,)
    tests = (self.params.num_tests,)
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict(
            {
                "question": tfds.features.Text(),
                "solution": tfds.features.Text(),
                "shown_inputs": tfds.features.Tensor(shape=shown, dtype=np.int64),
                "shown_outputs": tfds.features.Tensor(shape=shown, dtype=np.int64),
                "test_inputs": tfds.features.Tensor(shape=tests, dtype=np.int64),
                "test_outputs": tfds.features.Tensor(shape=tests, dtype=np.int64),
            }
        ),
    )

  def _generated_splits(self):
    return generate_programs(**self.params.data_params())


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProgramTestsTask(ProgramTestsData, base.GeneratedTask):
  """Programs from examples; reward = hidden tests passed + min_reward.

  Attributes:
    (data) num_shown, num_tests, x_min, x_max, max_depth, num_train, num_test, seed: see
      `ProgramTestsData`.
    min_reward: added to every reward; keeps rewards > 0 for the log-reward baseline.
    limits: interpreter bounds used to score completions (a `minilang.Limits` or a
      mapping of its fields); they must admit the reference solutions, as the defaults do.
  """

  name: ClassVar[str] = "program_tests"
  builder_cls: ClassVar[type[base.GeneratedBuilder]] = ProgramTestsBuilder

  min_reward: float = 0.01
  limits: minilang.Limits = minilang.Limits()

  def __post_init__(self):
    super().__post_init__()
    base.check_nonnegative("min_reward", self.min_reward)
    # Config files hold plain mappings; the task holds the frozen (hashable) Limits.
    if isinstance(self.limits, Mapping):
      object.__setattr__(self, "limits", minilang.Limits(**self.limits))
    if not isinstance(self.limits, minilang.Limits):
      raise ValueError(f"limits must be a minilang.Limits or a mapping, got {self.limits!r}")

  @property
  def reward_range(self) -> tuple[float, float]:
    return (self.min_reward, self.num_tests + self.min_reward)

  def prompt(self, example: Mapping[str, Any]) -> str:
    return example["question"]

  def solution(self, example: Mapping[str, Any]) -> str:
    return example["solution"]

  def reward(self, completion: str, example: Mapping[str, Any]) -> float:
    """(hidden tests passed) + min_reward."""
    passed = minilang.count_passed(
        completion, example["test_inputs"], example["test_outputs"], limits=self.limits
    )
    return float(passed + self.min_reward)
