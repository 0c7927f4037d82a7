"""`multiplicative`: a chain of small operations scored by a product of per-step scores.

The founding document (seeds/000, §5) names math reasoning whose reward is multiplicative,
"a product of probabilities", as a case for the geometric-mean baseline. Here a prompt
is a start value and `num_steps` operations applied left to right, and the completion
lists every running value, comma-separated:

    prompt "7 +3 *2 -5 ="   completion "10,20,15"

Reward: R = prod_k s_k, one score per step in [step_floor, 1]:

    s_k = max(step_floor, 1 / (1 + |v_k - t_k|))   if the k-th value v_k is an integer
    s_k = step_floor                               if it is missing or malformed

where t_k applies step k to the model's own previous value v_{k-1} (to the start value
for k = 1, and to the reference value when v_{k-1} was malformed): each step is judged on
its own, so an early slip costs only its step. Values are split on ',' after stripping
the completion; each piece is stripped and must match -?[0-9]{1,18}; pieces beyond
`num_steps` are ignored. R lies in [step_floor**num_steps, 1] (1e-6 to 1 with the
defaults), and log R = sum_k log s_k: the log-reward baseline turns the product into a
sum of per-step credits.

Data: start uniform in [0, max_start], each step an operation uniform over `operations`
with an operand uniform in [1, max_operand]. Chains are drawn from one
`random.Random(seed)` stream; the first `num_test` distinct chains form 'test', the next
`num_train` form 'train' (disjoint; 'test' does not depend on `num_train`).
"""

import dataclasses
import math
import random
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from gmpo_jax.tasks import base

_OPERATIONS = {op: base.BINARY_OPERATIONS[op] for op in ("+", "-", "*")}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultiplicativeData(base.DataParams):
  """Data parameters of `multiplicative` (see the module docstring).

  Attributes:
    num_steps: operations per chain.
    max_start: start values lie in [0, max_start].
    max_operand: operands lie in [1, max_operand].
    operations: symbols among '+', '-', '*'.
    num_train, num_test: split sizes.
    seed: seed of the chain generator.
  """

  num_steps: int = base.data_field(3, key="steps")
  max_start: int = base.data_field(20, key="start")
  max_operand: int = base.data_field(9, key="operand")
  operations: tuple[str, ...] = base.data_field(
      ("+", "-", "*"), key="ops", encode=base.spell_operations
  )
  num_train: int = base.data_field(10_000, key="train")
  num_test: int = base.data_field(1_000, key="test")
  seed: int = base.data_field(0, key="seed")

  def __post_init__(self):
    base.check_int("num_steps", self.num_steps, minimum=1)
    base.check_int("max_start", self.max_start, minimum=0)
    base.check_int("max_operand", self.max_operand, minimum=1)
    object.__setattr__(
        self, "operations", base.check_operations(self.operations, allowed=tuple(_OPERATIONS))
    )
    base.check_int("num_train", self.num_train, minimum=0)
    base.check_int("num_test", self.num_test, minimum=0)
    base.check_int("seed", self.seed, minimum=0)
    # Every running value must fit the 18 digits a completion may use (and int64).
    bound = self.max_start
    for _ in range(self.num_steps):
      bound = max(bound + self.max_operand, bound * self.max_operand)
      if bound >= 10**base.MAX_INTEGER_DIGITS:
        raise ValueError(
            f"running values can exceed {base.MAX_INTEGER_DIGITS} digits: "
            "lower num_steps, max_start or max_operand"
        )
    capacity = (self.max_start + 1) * (len(self.operations) * self.max_operand) ** self.num_steps
    if self.num_train + self.num_test > capacity:
      raise ValueError(
          f"num_train + num_test = {self.num_train + self.num_test} but only "
          f"{capacity} distinct chains exist"
      )


def _running_values(start: int, operations: str, operands: tuple[int, ...]) -> list[int]:
  values, value = [], start
  for op, operand in zip(operations, operands):
    value = _OPERATIONS[op][1](value, operand)
    values.append(value)
  return values


def generate_chains(
    *,
    num_steps: int,
    max_start: int,
    max_operand: int,
    operations: tuple[str, ...],
    num_train: int,
    num_test: int,
    seed: int,
) -> dict[str, list[dict[str, Any]]]:
  """Deterministic, disjoint 'train' and 'test' chains (see the module docstring).

  Returns:
    {'train': [...], 'test': [...]}; each example holds 'question' (the prompt), 'start',
    'operations' (one symbol per step, as a str), 'operands' and 'values' (tuples of
    num_steps ints) and 'answer' (the values joined by ',').

  Raises:
    ValueError: invalid parameters (see `MultiplicativeData`), such as more chains
      requested than exist.
  """
  # Checks the parameters, and that enough distinct chains exist.
  MultiplicativeData(
      num_steps=num_steps,
      max_start=max_start,
      max_operand=max_operand,
      operations=operations,
      num_train=num_train,
      num_test=num_test,
      seed=seed,
  )
  wanted = num_train + num_test
  rng = random.Random(seed)
  seen: set[tuple[int, str, tuple[int, ...]]] = set()
  chains = []
  while len(chains) < wanted:
    start = rng.randint(0, max_start)
    ops = "".join(rng.choice(operations) for _ in range(num_steps))
    operands = tuple(rng.randint(1, max_operand) for _ in range(num_steps))
    if (start, ops, operands) in seen:
      continue
    seen.add((start, ops, operands))
    values = _running_values(start, ops, operands)
    chains.append(
        {
            "question": f"{start} " + " ".join(f"{op}{c}" for op, c in zip(ops, operands)) + " =",
            "start": start,
            "operations": ops,
            "operands": operands,
            "values": tuple(values),
            "answer": ",".join(map(str, values)),
        }
    )
  return {"test": chains[:num_test], "train": chains[num_test:]}


class MultiplicativeBuilder(base.GeneratedBuilder):
  """TFDS builder of the `multiplicative` task's chains."""

  name = "gmpo_multiplicative"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  params_cls = MultiplicativeData
  BUILDER_CONFIGS = [base.ParamsConfig(params=MultiplicativeData())]

  def _info(self) -> tfds.core.DatasetInfo:
    steps = (self.params.num_steps,)
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict(
            {
                "question": tfds.features.Text(),
                "start": np.int64,
                "operations": tfds.features.Text(),
                "operands": tfds.features.Tensor(shape=steps, dtype=np.int64),
                "values": tfds.features.Tensor(shape=steps, dtype=np.int64),
                "answer": tfds.features.Text(),
            }
        ),
    )

  def _generated_splits(self):
    return generate_chains(**self.params.data_params())


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultiplicativeTask(MultiplicativeData, base.GeneratedTask):
  """Chains of arithmetic steps; reward = product of per-step partial credits.

  Attributes:
    (data) num_steps, max_start, max_operand, operations, num_train, num_test, seed: see
      `MultiplicativeData`.
    step_floor: smallest per-step score, in (0, 1]; the reward is >= step_floor**num_steps.
  """

  name: ClassVar[str] = "multiplicative"
  builder_cls: ClassVar[type[base.GeneratedBuilder]] = MultiplicativeBuilder

  step_floor: float = 0.01

  def __post_init__(self):
    super().__post_init__()
    base.check_nonnegative("step_floor", self.step_floor)
    if not 0 < self.step_floor <= 1:
      raise ValueError(f"step_floor must be in (0, 1], got {self.step_floor}")
    # The smallest reward must stay a normal positive float (log R finite).
    if self.num_steps * math.log(self.step_floor) < math.log(np.finfo(np.float64).tiny):
      raise ValueError(f"step_floor**num_steps = {self.step_floor}**{self.num_steps} underflows")

  @property
  def reward_range(self) -> tuple[float, float]:
    # The same float product as `reward` computes for a completion with no valid step.
    return (math.prod([self.step_floor] * self.num_steps), 1.0)

  def prompt(self, example: Mapping[str, Any]) -> str:
    return example["question"]

  def solution(self, example: Mapping[str, Any]) -> str:
    return example["answer"]

  def step_scores(self, completion: str, example: Mapping[str, Any]) -> list[float]:
    """The per-step scores s_k (see the module docstring); never raises on a str."""
    pieces = completion.strip().split(",")
    reference = _running_values(example["start"], example["operations"], example["operands"])
    scores = []
    previous = example["start"]
    for k, (op, operand) in enumerate(zip(example["operations"], example["operands"])):
      target = _OPERATIONS[op][1](previous, operand)
      value = base.parse_integer(pieces[k].strip()) if k < len(pieces) else None
      if value is None:
        scores.append(self.step_floor)
        previous = reference[k]
      else:
        scores.append(max(self.step_floor, 1.0 / (1.0 + abs(value - target))))
        previous = value
    return scores

  def reward(self, completion: str, example: Mapping[str, Any]) -> float:
    """prod_k s_k, in [step_floor**num_steps, 1]."""
    return float(math.prod(self.step_scores(completion, example)))
