"""`gsm8k`: grade-school math word problems (Cobbe et al. 2021, "Training Verifiers to
Solve Math Word Problems", arXiv 2110.14168), read from local JSONL files.

Nothing is downloaded: put the official `train.jsonl` and `test.jsonl` (one JSON object
per line with 'question' and 'answer', the answer ending in '#### <number>') in a
directory and pass it as `manual_dir` (TFDS's manual-download mechanism; the default is
`<data_dir>/downloads/manual`).

Final-answer extraction (`extract_final_answer`), for completions and reference answers
alike: the first number after the last '####' if there is one, else the last number in
the text. A number is `-?$?` then digits, either plain or grouped by commas in threes
('1,234'), with an optional decimal part; '$' and ',' are removed ('$1,234.50' ->
'1234.50'; '3,4' is two numbers). Answers are compared as floats within `tolerance`.

Reward: R = min_reward + format_reward * [a number follows '####'] + correct_reward *
[correct]. The defaults (1, 0, 0) give the usual binary 0/1 reward; for the log-reward
baseline pick min_reward > 0 (or the baseline's floor/offset).
"""

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import tensorflow_datasets as tfds

from gmpo_jax.tasks import base

# Comma groups must be complete: '1,2345' reads as 1 and 2345, not 1,234 and 5.
_NUMBER_RE = re.compile(r"-?\$?(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?")
_MARKER = "####"
# GSM8K solutions mark each calculation for a calculator tool: "48/2 = <<48/2=24>>24".
_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")


def _number_after_marker(text: str) -> str | None:
  _, marker, tail = text.rpartition(_MARKER)
  match = _NUMBER_RE.search(tail) if marker else None
  return match.group().replace("$", "").replace(",", "") if match else None


def extract_final_answer(text: str) -> str | None:
  """The final answer of a GSM8K solution or completion, normalized (module docstring).

  Args:
    text: any str.

  Returns:
    The number as a str without '$' and ',' (e.g. '-1234.5'), or None if the text holds
    no number. Never raises.
  """
  after_marker = _number_after_marker(text)
  if after_marker is not None:
    return after_marker
  numbers = _NUMBER_RE.findall(text)
  return numbers[-1].replace("$", "").replace(",", "") if numbers else None


def answers_match(predicted: str | None, reference: str, *, tolerance: float) -> bool:
  """|float(predicted) - float(reference)| <= tolerance; False for None or an overflow."""
  if predicted is None:
    return False
  # float() of a numeral too large for a double is inf, never an exception.
  return abs(float(predicted) - float(reference)) <= tolerance


class Gsm8kBuilder(base.ManualJsonlBuilder):
  """TFDS builder of GSM8K from manually placed JSONL files."""

  name = "gmpo_gsm8k"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Place `train.jsonl` and `test.jsonl` from
  https://github.com/openai/grade-school-math (grade_school_math/data/) in the manual
  directory. Each line is a JSON object with "question" and "answer"; the answer ends
  with "#### <final answer>".
  """
  TEXT_FEATURES = ("question", "answer", "final_answer")
  HOMEPAGE = "https://github.com/openai/grade-school-math"
  CITATION = "Cobbe et al. 2021, Training Verifiers to Solve Math Word Problems, arXiv 2110.14168"

  def _example(self, record: Mapping[str, Any]) -> dict[str, str]:
    if not all(isinstance(record.get(key), str) for key in ("question", "answer")):
      raise ValueError("expected an object with str 'question' and 'answer'")
    final_answer = _number_after_marker(record["answer"])
    if final_answer is None:
      raise ValueError(f"the answer has no number after '{_MARKER}'")
    return {
        "question": record["question"],
        "answer": record["answer"],
        "final_answer": final_answer,
    }


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gsm8kTask(base.WeightedReward, base.ManualJsonlTask):
  """GSM8K with final-answer matching.

  Attributes:
    manual_dir: directory holding train.jsonl and test.jsonl (see `base.ManualJsonlTask`).
    prompt_template: str.format template with a `{question}` field.
    tolerance: largest |predicted - reference| that counts as correct.
    correct_reward: added for a correct final answer.
    format_reward: added when a number follows '####'.
    min_reward: given to every completion.
  """

  name: ClassVar[str] = "gsm8k"
  builder_cls: ClassVar[type[base.ManualJsonlBuilder]] = Gsm8kBuilder

  prompt_template: str = "Question: {question}\nAnswer:\n"
  tolerance: float = 1e-6

  def __post_init__(self):
    if not isinstance(self.prompt_template, str) or "{question}" not in self.prompt_template:
      raise ValueError(f"prompt_template must contain '{{question}}', got {self.prompt_template!r}")
    try:
      self.prompt_template.format(question="q")
    except (AttributeError, IndexError, KeyError, ValueError) as error:
      raise ValueError(
          f"prompt_template {self.prompt_template!r} is not a valid template: {error!r}"
      ) from None
    base.check_nonnegative("tolerance", self.tolerance)
    self.check_weights()

  def prompt(self, example: Mapping[str, Any]) -> str:
    return self.prompt_template.format(question=example["question"])

  def solution(self, example: Mapping[str, Any]) -> str:
    """The reference solution without its calculator annotations ('<<48/2=24>>')."""
    return _CALCULATOR_RE.sub("", example["answer"])

  def reward(self, completion: str, example: Mapping[str, Any]) -> float:
    """min_reward + format_reward·[number after '####'] + correct_reward·[correct]."""
    correct = answers_match(
        extract_final_answer(completion), example["final_answer"], tolerance=self.tolerance
    )
    formatted = _number_after_marker(completion) is not None
    return self.weighted_reward(well_formed=formatted, correct=correct)
