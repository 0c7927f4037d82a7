r"""`math`: competition mathematics with answers in `\boxed{}`, checked for equivalence.

Problems in the layout of MATH (Hendrycks et al. 2021, "Measuring Mathematical Problem
Solving With the MATH Dataset", arXiv 2103.03874) and MATH-500 (Lightman et al. 2023,
"Let's Verify Step by Step", arXiv 2305.20050), read from local JSONL files. Nothing is
downloaded: put `train.jsonl` and `test.jsonl` in a directory and pass it as `manual_dir`
(default `<data_dir>/downloads/manual`). Each line is a JSON object with a str 'problem'
and a str 'solution' and/or 'answer' (other fields, e.g. 'subject', 'level', 'unique_id',
are ignored). The reference answer is 'answer' when present, else the content of the last
`\boxed{…}` of 'solution'. The built dataset is cached under `<data_dir>/gmpo_math/1.0.0`
whatever `manual_dir` is: for other files, use another `data_dir`.

Answer extraction (`last_boxed`), for completions and solutions alike: the content of the
last `\boxed{` (spaces allowed before the brace) up to its matching `}`. Braces nest;
escaped braces `\{ \}` do not count. When that last box never closes, the text has no
answer (an earlier box does not stand in for it).

Equivalence: `math_verify.parse` reads each answer (as the LaTeX `\boxed{answer}`) into
SymPy, and `math_verify.verify(reference, prediction)` compares them numerically and
symbolically, so 1/2, 0.5, \frac{1}{2}, \dfrac12 and \frac{ 1 }{ 2 } all match; sets,
intervals, tuples, equations ('x = 5' for 5) and \text{} answers are handled by
math-verify. Each parse and each comparison is cut off after `timeout_seconds`
(math-verify's SIGALRM timeout, so rewards must be computed in the main thread), and a
predicted answer longer than `max_answer_chars` (or the reference, if longer) is not
compared: a timeout, an error or an over-long answer counts as not equivalent.

Reward: R = min_reward + format_reward * [the last box is closed and not blank] +
correct_reward * [its content is equivalent to the reference]. The defaults (1, 0, 0)
give the usual 0/1 reward; for the log-reward baseline pick min_reward > 0 (or the
baseline's floor/offset).
"""

import dataclasses
import functools
import re
import threading
from collections.abc import Mapping
from typing import Any, ClassVar

import tensorflow_datasets as tfds

from gmpo_jax.tasks import base

_BOXED_RE = re.compile(r"\\boxed\s*\{")

DEFAULT_PROMPT_TEMPLATE = (
    "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
)


def _box_span(text: str) -> tuple[int, int] | None:
  """(start, end) of the content of the last `\\boxed{…}` of `text`, or None (module docstring)."""
  opening = None
  for opening in _BOXED_RE.finditer(text):  # Keeps the last match.
    pass
  if opening is None:
    return None
  depth, index = 1, opening.end()
  while index < len(text):
    char = text[index]
    if char == "\\":
      index += 2  # An escaped character ('\{', '\}', '\\') is not a brace.
      continue
    if char == "{":
      depth += 1
    elif char == "}":
      depth -= 1
      if depth == 0:
        return opening.end(), index
    index += 1
  return None


def last_boxed(text: str) -> str | None:
  r"""The content of the last `\boxed{…}` of `text` (module docstring).

  Args:
    text: any str.

  Returns:
    The content between the braces, unstripped ('\frac{1}{2}' for
    'so \boxed{\frac{1}{2}}.'), or None when there is no box or the last one never closes.
    Never raises.
  """
  span = _box_span(text)
  return None if span is None else text[span[0] : span[1]]


@functools.cache
def _math_verify() -> tuple[Any, list[Any], type[BaseException]]:
  """(math_verify, its extraction config, its TimeoutException), loaded on first use.

  The import takes about a second (SymPy) and the first parse about half a second more
  (the LaTeX grammar and regexes), so both happen here, once and without the per-answer
  timeout, and importing the tasks stays fast.
  """
  import math_verify
  from math_verify.errors import TimeoutException

  config = [
      math_verify.LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)
  ]
  in_main_thread = threading.current_thread() is threading.main_thread()
  math_verify.parse(
      "\\boxed{\\frac{1}{2}}",
      extraction_config=config,
      parsing_timeout=60 if in_main_thread else None,
  )
  return math_verify, config, TimeoutException


def answers_equivalent(predicted: str, reference: str, *, timeout_seconds: int | None) -> bool:
  """Whether math-verify finds two LaTeX answers equal (module docstring).

  Args:
    predicted: the content of a completion's box.
    reference: the reference answer.
    timeout_seconds: limit of each math-verify parse and comparison (None: no limit). A
      limit works only in the main thread (math-verify raises ValueError elsewhere, which
      counts as False here: `MathTask.is_correct` checks the thread first).

  Returns:
    True when math-verify parses both and finds them equal; False otherwise, and on any
    error or timeout. Never raises.
  """
  math_verify, config, timeout_error = _math_verify()
  try:
    gold, prediction = (
        math_verify.parse(
            "\\boxed{" + answer + "}", extraction_config=config, parsing_timeout=timeout_seconds
        )
        for answer in (reference, predicted)
    )
    return bool(
        gold
        and prediction
        and math_verify.verify(gold, prediction, timeout_seconds=timeout_seconds)
    )
  except (Exception, timeout_error):  # math-verify's TimeoutException is a BaseException.
    return False


class MathBuilder(base.ManualJsonlBuilder):
  """TFDS builder of MATH-style problems from manually placed JSONL files."""

  name = "gmpo_math"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Place `train.jsonl` and `test.jsonl` in the manual directory, one JSON object per line
  with a str "problem" and a str "solution" (with the final answer in \\boxed{}) and/or
  "answer" (the layout of MATH-500, e.g. its test.jsonl; MATH's own problems converted to
  JSONL lines for train.jsonl).
  """
  TEXT_FEATURES = ("problem", "solution", "answer")
  HOMEPAGE = "https://github.com/hendrycks/math"
  CITATION = (
      "Hendrycks et al. 2021, Measuring Mathematical Problem Solving With the MATH "
      "Dataset, arXiv 2103.03874"
  )

  def _example(self, record: Mapping[str, Any]) -> dict[str, str]:
    problem, solution, answer = (record.get(key) for key in ("problem", "solution", "answer"))
    if not isinstance(problem, str):
      raise ValueError("expected a str 'problem'")
    if not isinstance(solution, (str, type(None))) or not isinstance(answer, (str, type(None))):
      raise ValueError("'solution' and 'answer' must be str when present")
    if answer is None:
      answer = last_boxed(solution) if solution is not None else None
      if answer is None:
        raise ValueError("no 'answer', and no closed \\boxed{} in 'solution'")
    if not answer.strip():
      raise ValueError("the reference answer is blank")
    return {"problem": problem, "solution": solution or "", "answer": answer.strip()}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MathTask(base.WeightedReward, base.ManualJsonlTask):
  r"""MATH-style problems; reward for a `\boxed{}` answer equivalent to the reference.

  Attributes:
    manual_dir: directory holding train.jsonl and test.jsonl (see `base.ManualJsonlTask`).
    prompt_template: the prompt, with '{problem}' replaced by the problem. Only that
      placeholder is substituted: other braces are literal, so LaTeX such as '\boxed{}' is
      written as is (unlike gsm8k's str.format template).
    correct_reward: added for an answer equivalent to the reference.
    format_reward: added when the last `\boxed{}` is closed and not blank.
    min_reward: given to every completion.
    timeout_seconds: limit, in whole seconds, of each math-verify parse and comparison;
      None disables it (then nothing bounds a reward's time: `9^{9^{9^{9}}}` never ends).
    max_answer_chars: longer predicted answers are not compared (incorrect); the
      reference's own length is always allowed.
  """

  name: ClassVar[str] = "math"
  builder_cls: ClassVar[type[base.ManualJsonlBuilder]] = MathBuilder

  prompt_template: str = DEFAULT_PROMPT_TEMPLATE
  timeout_seconds: int | None = 2
  max_answer_chars: int = 1000

  def __post_init__(self):
    if not isinstance(self.prompt_template, str) or "{problem}" not in self.prompt_template:
      raise ValueError(f"prompt_template must contain '{{problem}}', got {self.prompt_template!r}")
    self.check_weights()
    if self.timeout_seconds is not None:
      base.check_int("timeout_seconds", self.timeout_seconds, minimum=1)
    base.check_int("max_answer_chars", self.max_answer_chars, minimum=1)

  def prompt(self, example: Mapping[str, Any]) -> str:
    return self.prompt_template.replace("{problem}", example["problem"])

  def solution(self, example: Mapping[str, Any]) -> str:
    r"""The reference solution with the reference answer in its last box.

    The solution's last `\boxed{}` gets the reference answer as its content (they are the
    same when the answer was taken from it); a solution without a closed box, or a
    missing one, gets 'The final answer is $\boxed{answer}$.' appended.
    """
    text, answer = example["solution"], example["answer"]
    span = _box_span(text)
    if span is not None:
      return text[: span[0]] + answer + text[span[1] :]
    ending = f"The final answer is $\\boxed{{{answer}}}$."
    return f"{text.rstrip()}\n\n{ending}" if text.strip() else ending

  def extract_answer(self, completion: str) -> str | None:
    """The stripped content of the last closed box, for majority voting; None: no vote.

    Equivalent forms ('0.5', '\\frac{1}{2}') are different votes.
    """
    answer = last_boxed(completion)
    return answer.strip() if answer is not None and answer.strip() else None

  def _check_thread(self) -> None:
    if self.timeout_seconds is not None and (
        threading.current_thread() is not threading.main_thread()
    ):
      raise RuntimeError(
          "the math task's timeout (math-verify's SIGALRM) works only in the main thread; "
          "compute rewards there, or set timeout_seconds=None and bound the time yourself"
      )

  def is_correct(self, answer: str | None, example: Mapping[str, Any]) -> bool:
    """Whether a box's content `answer` is equivalent to the example's reference answer.

    Raises:
      RuntimeError: a timeout is set and this is not the main thread (see `reward`).
    """
    self._check_thread()
    reference = example["answer"]
    if answer is None or not answer.strip():
      return False
    if len(answer) > max(self.max_answer_chars, len(reference)):
      return False
    return answers_equivalent(answer, reference, timeout_seconds=self.timeout_seconds)

  def reward(self, completion: str, example: Mapping[str, Any]) -> float:
    """min_reward + format_reward·[closed, non-blank last box] + correct_reward·[equivalent].

    Never raises on any str. Raises RuntimeError, whatever the completion, when a timeout
    is set and this is not the main thread, where math-verify's signal-based timeout
    cannot work: compute rewards in the main thread (the runner does), or set
    timeout_seconds=None and bound the time yourself.
    """
    self._check_thread()
    answer = last_boxed(completion)
    formatted = answer is not None and bool(answer.strip())
    correct = formatted and self.is_correct(answer, example)
    return self.weighted_reward(well_formed=formatted, correct=correct)
