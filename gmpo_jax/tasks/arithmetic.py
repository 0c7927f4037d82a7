"""`arithmetic`: one operation on two multi-digit integers ("23+58=" -> "81").

Reward (all values > 0 with the defaults, as the log-reward baseline needs):

    R = min_reward + format_reward * [well-formed] + correct_reward * [exact match]

on the completion with surrounding whitespace stripped. Well-formed means `-?[0-9]+`
(ASCII digits, no '+', no spaces inside); exact match means the string equals the
answer's canonical decimal form (so '081' is well-formed but wrong). With the defaults
(0.01, 0.1, 1.0): garbage 0.01, a wrong integer 0.11, the right answer 1.11; two orders
of magnitude in all.

Data: operands are uniform in [0, 10**num_digits) (divisors of // and % in
[1, 10**num_digits)), operations uniform over `operations`; `//` and `%` follow Python
(floor division, remainder with the divisor's sign). Problems are drawn without
replacement from one `random.Random(seed)` stream: the first `num_test` distinct
problems form 'test', the next `num_train` form 'train', so the splits are disjoint and
the test split does not depend on `num_train`.
"""

import dataclasses
import random
import zlib
from collections.abc import Mapping
from typing import Any, ClassVar

import tensorflow_datasets as tfds

from gmpo_jax.tasks import base

_OPERATIONS = base.BINARY_OPERATIONS
_DIVISIONS = ("//", "%")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArithmeticData(base.DataParams):
  """Data parameters of `arithmetic` (see the module docstring).

  Attributes:
    num_digits: operands have at most this many digits (1..18).
    operations: symbols among '+', '-', '*', '//', '%'.
    num_train, num_test: split sizes.
    seed: seed of the problem generator.
  """

  num_digits: int = base.data_field(2, key="digits")
  operations: tuple[str, ...] = base.data_field(("+", "-"), key="ops", encode=base.spell_operations)
  num_train: int = base.data_field(10_000, key="train")
  num_test: int = base.data_field(1_000, key="test")
  seed: int = base.data_field(0, key="seed")

  def __post_init__(self):
    base.check_int("num_digits", self.num_digits, minimum=1, maximum=18)
    object.__setattr__(
        self, "operations", base.check_operations(self.operations, allowed=tuple(_OPERATIONS))
    )
    base.check_int("num_train", self.num_train, minimum=0)
    base.check_int("num_test", self.num_test, minimum=0)
    base.check_int("seed", self.seed, minimum=0)
    _check_capacity(
        num_digits=self.num_digits,
        operations=self.operations,
        num_train=self.num_train,
        num_test=self.num_test,
    )


def _check_capacity(
    *, num_digits: int, operations: tuple[str, ...], num_train: int, num_test: int
) -> int:
  """How many distinct (operation, a, b) problems exist; ValueError if too few."""
  size = 10**num_digits
  total = sum(size * (size - 1 if op in _DIVISIONS else size) for op in operations)
  if num_train + num_test > total:
    raise ValueError(
        f"num_train + num_test = {num_train + num_test} but only {total} distinct problems "
        f"exist with num_digits={num_digits} and operations={operations}"
    )
  return total


def _problem(index: int, *, num_digits: int, operations: tuple[str, ...]) -> dict[str, str]:
  """Problem number `index` of an enumeration of all (operation, a, b) triples."""
  size = 10**num_digits
  for op in operations:
    num_divisors = size - 1 if op in _DIVISIONS else size
    if index < size * num_divisors:
      break
    index -= size * num_divisors
  a, b = divmod(index, num_divisors)
  if op in _DIVISIONS:
    b += 1
  return {"question": f"{a}{op}{b}=", "answer": str(_OPERATIONS[op][1](a, b))}


def generate_arithmetic(
    *, num_digits: int, operations: tuple[str, ...], num_train: int, num_test: int, seed: int
) -> dict[str, list[dict[str, str]]]:
  """Deterministic, disjoint 'train' and 'test' problems (see the module docstring).

  Returns:
    {'train': [...], 'test': [...]}, each a list of {'question', 'answer'} dicts.

  Raises:
    ValueError: more problems requested than exist for these digits and operations.
  """
  total = _check_capacity(
      num_digits=num_digits, operations=operations, num_train=num_train, num_test=num_test
  )
  wanted = num_train + num_test
  rng = random.Random(seed)
  seen: set[int] = set()
  problems = []
  while len(problems) < wanted:
    index = rng.randrange(total)
    if index not in seen:
      seen.add(index)
      problems.append(_problem(index, num_digits=num_digits, operations=operations))
  return {"test": problems[:num_test], "train": problems[num_test:]}


class ArithmeticBuilder(base.GeneratedBuilder):
  """TFDS builder of the `arithmetic` task's problems."""

  name = "gmpo_arithmetic"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  params_cls = ArithmeticData
  BUILDER_CONFIGS = [base.ParamsConfig(params=ArithmeticData())]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict(
            {"question": tfds.features.Text(), "answer": tfds.features.Text()}
        ),
    )

  def _generated_splits(self):
    return generate_arithmetic(**self.params.data_params())


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArithmeticTask(base.WeightedReward, ArithmeticData, base.GeneratedTask):
  """Multi-digit arithmetic with an exact-match reward plus format and per-digit credit.

  Attributes:
    (data) num_digits, operations, num_train, num_test, seed: see `ArithmeticData`.
    correct_reward: added for an exact-match answer.
    format_reward: added for a well-formed integer.
    digit_reward: added, for a well-formed integer, times the fraction of its characters that
      match the answer's, aligned at the last digit, over the longer of the two lengths
      (`digit_credit`); 0 (the default) turns partial credit off. An exact match gets all of
      it, so passing (reaching `reward_range[1]`) still means the exact answer.
    min_reward: given to every completion; keeps rewards > 0 for the log-reward baseline.
    teacher_carry_drop: the probability that a warm-start demonstration (`demonstration`) of
      an addition forgets every carry (adds digit by digit, mod 10), as a teacher that has
      not mastered carrying would; drawn once per problem (a hash of its question), so the
      same problem always gets the same demonstration. 0 (the default): demonstrations are
      the exact answers. Only '+' problems are affected. Rewards and evaluation always check
      the true answer: the gap is what RL can recover and supervised imitation cannot.
  """

  name: ClassVar[str] = "arithmetic"
  builder_cls: ClassVar[type[base.GeneratedBuilder]] = ArithmeticBuilder

  format_reward: float = 0.1
  digit_reward: float = 0.0
  min_reward: float = 0.01
  teacher_carry_drop: float = 0.0

  def __post_init__(self):
    super().__post_init__()
    self.check_weights()
    base.check_nonnegative("digit_reward", self.digit_reward)
    base.check_nonnegative("teacher_carry_drop", self.teacher_carry_drop)
    if self.teacher_carry_drop > 1:
      raise ValueError(f"teacher_carry_drop must lie in [0, 1], got {self.teacher_carry_drop}")

  @property
  def reward_range(self) -> tuple[float, float]:
    low, high = super().reward_range
    return (low, high + self.digit_reward)

  def prompt(self, example: Mapping[str, Any]) -> str:
    return example["question"]

  def solution(self, example: Mapping[str, Any]) -> str:
    return example["answer"]

  def demonstration(self, example: Mapping[str, Any]) -> str:
    """The teacher's answer: the true one, or with probability `teacher_carry_drop` (per
    problem) the carry-less digit-wise sum."""
    question = example["question"]
    if "+" not in question or not self.teacher_carry_drop:
      return example["answer"]
    draw = zlib.crc32(question.encode()) / 2**32
    if draw >= self.teacher_carry_drop:
      return example["answer"]
    a, b = question[:-1].split("+")
    return str(carry_less_sum(int(a), int(b)))

  def reward(self, completion: str, example: Mapping[str, Any]) -> float:
    """min_reward + format_reward·[well-formed] + digit_reward·digit_credit + correct_reward·[exact]."""
    answer = completion.strip()
    well_formed = base.INTEGER_RE.fullmatch(answer) is not None
    correct = answer == example["answer"]
    partial = self.digit_reward * digit_credit(answer, example["answer"]) if well_formed else 0.0
    return self.weighted_reward(well_formed=well_formed, correct=correct) + partial


def carry_less_sum(a: int, b: int) -> int:
  """a + b with every carry dropped: each decimal digit is (digit of a + digit of b) mod 10."""
  total, place = 0, 1
  while a or b:
    total += ((a % 10 + b % 10) % 10) * place
    a, b, place = a // 10, b // 10, place * 10
  return total


def digit_credit(predicted: str, reference: str) -> float:
  """The fraction of matching characters, right-aligned, over the longer length.

  '81' vs '81': 1; '71' vs '81': 1/2; '181' vs '81': 2/3 (one character too many); '' vs
  anything: 0.
  """
  length = max(len(predicted), len(reference))
  if not length:
    return 0.0
  matches = sum(p == r for p, r in zip(reversed(predicted), reversed(reference)))
  return matches / length
