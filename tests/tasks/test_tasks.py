"""Tests of gmpo_jax.tasks: the mini-language, the five tasks' data and rewards."""

import ast
import dataclasses
import errno
import json
import logging
import math
import operator
import os
import threading
import time

import hypothesis
import ml_collections
import numpy as np
import pytest
from etils import epath
from hypothesis import strategies as st

from gmpo_jax import tasks
from gmpo_jax.tasks import (
    arithmetic,
    base,
    competition_math,
    gsm8k,
    minilang,
    multiplicative,
    program_tests,
)

SMALL = {
    "arithmetic": dict(num_train=40, num_test=15),
    "program_tests": dict(num_train=30, num_test=10),
    "multiplicative": dict(num_train=40, num_test=15),
}

# Completions no reward function may raise on or return a non-finite value for.
ADVERSARIAL = [
    "",
    " ",
    "\n\t",
    "9" * 5000,
    "-" + "9" * 5000,
    "#### " + "9" * 5000,
    "1" * 100_000,
    "\x00\x01\ufffd",
    "٤٢",  # Arabic-Indic digits.
    "４２",  # Full-width digits.
    "1_000",
    "1e400",
    "nan",
    "inf",
    "-0",
    "x//0",
    "x%(x-x)",
    "(" * 5000 + "x" + ")" * 5000,
    "-" * 5000 + "x",
    "x" + "+x" * 999,
    "abs(" * 40 + "x" + ")" * 40,
    "__import__('os').system('true')",
    ",,,,",
    "1,2,3," * 1000,
    "😀 #### 😀",
    "\\boxed{",
    "\\boxed{" * 2000,
    "\\boxed{}",
    "\\boxed{\\frac{1}{2}",
    "}" * 1000 + "\\boxed{" + "{" * 1000,
    "\\boxed{" + "(" * 3000 + "}",  # Longer than max_answer_chars: not compared.
    "\\boxed{\\}",
    "\\boxed{\\x00\ufffd}",
    "\\boxed{\\\\}",
]


def _evaluate_reference(node: ast.AST, x: int, magnitude: list[int]) -> int:
  """Python-semantics evaluation of a parsed expression, tracking the largest |value|."""
  if isinstance(node, ast.Expression):
    return _evaluate_reference(node.body, x, magnitude)
  if isinstance(node, ast.Constant):
    value = node.value
  elif isinstance(node, ast.Name):
    value = x
  elif isinstance(node, ast.UnaryOp):
    value = -_evaluate_reference(node.operand, x, magnitude)
  elif isinstance(node, ast.Call):
    args = [_evaluate_reference(arg, x, magnitude) for arg in node.args]
    value = {"abs": abs, "min": min, "max": max}[node.func.id](*args)
  else:
    left = _evaluate_reference(node.left, x, magnitude)
    right = _evaluate_reference(node.right, x, magnitude)
    ops = {
        ast.Add: operator.add,
        ast.Sub: operator.sub,
        ast.Mult: operator.mul,
        ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod,
    }
    value = ops[type(node.op)](left, right)
  magnitude[0] = max(magnitude[0], abs(value))
  return value


def _reference_or_error(source: str, x: int, limits: minilang.Limits) -> int | None:
  """The reference value, or None where the interpreter must raise a runtime error."""
  magnitude = [abs(x)]
  try:
    value = _evaluate_reference(ast.parse(source, mode="eval"), x, magnitude)
  except ZeroDivisionError:
    return None
  return value if magnitude[0] <= limits.max_magnitude else None


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def gsm8k_manual_dir(tmp_path_factory):
  manual = tmp_path_factory.mktemp("gsm8k_manual")
  records = {
      "train": [
          {
              "question": "Ann has 3 apples and buys 4. How many?",
              "answer": "3+4=<<3+4=7>>7\n#### 7",
          },
          {"question": "A car costs $1,200 twice. Total?", "answer": "2*1200=2400\n#### 2,400"},
          {"question": "Half of 5?", "answer": "5/2=2.5\n#### 2.5"},
      ],
      "test": [{"question": "10 minus 13?", "answer": "10-13=-3\n#### -3"}],
  }
  for split, rows in records.items():
    lines = [json.dumps(row) for row in rows]
    (manual / f"{split}.jsonl").write_text("\n".join(lines) + "\n\n")  # Blank line skipped.
  return str(manual)


# A MATH-500-layout fixture: 'answer' and 'solution' (extra fields ignored), 'solution' only
# (the answer is its last box: nested and escaped braces), 'answer' only.
MATH_RECORDS = {
    "train": [
        {
            "problem": "Write $0.5$ as a fraction.",
            "solution": "It is $\\boxed{\\frac{1}{2}}$.",
            "answer": "\\frac{1}{2}",
            "subject": "Prealgebra",
            "level": 1,
            "unique_id": "t/1.json",
        },
        {
            "problem": "Compute $\\sin 60^\\circ$.",
            "solution": "First $\\boxed{1}$? No: $\\boxed{\\frac{\\sqrt{3}}{2}}$.",
        },
        {
            "problem": "Which set solves $x^2 = 3x - 2$?",
            "solution": "Factor: $\\boxed{\\{1, 2\\}}$",
        },
        {"problem": "What is $2 + 3$?", "answer": " 5 "},
    ],
    "test": [
        {
            "problem": "Simplify $\\dfrac{6}{4}$.",
            "solution": "$\\boxed{\\dfrac{3}{2}}$",
            "answer": "\\frac{3}{2}",
        }
    ],
}


@pytest.fixture(scope="module")
def math_manual_dir(tmp_path_factory):
  manual = tmp_path_factory.mktemp("math_manual")
  for split, rows in MATH_RECORDS.items():
    (manual / f"{split}.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n")
  return str(manual)


# ----------------------------------------------------------------------- mini-language


class TestMiniLang:

  @pytest.mark.parametrize(
      "source, x, expected",
      [
          ("2+3*x", 4, 14),
          ("(2+3)*x", 4, 20),
          ("x-3-2", 10, 5),  # Left associative.
          ("x//2//2", 17, 4),
          ("-x*2", 3, -6),
          ("--x", 5, 5),
          ("2*-x", 5, -10),
          ("x//3", -7, -3),  # Floor division.
          ("x%3", -7, 2),  # Remainder takes the divisor's sign.
          ("x%-3", 7, -2),
          ("abs(x-5)", 2, 3),
          ("min(x, 3)", 9, 3),
          ("max(x, -x)", -4, 4),
          ("max(min(x,10),0)", 42, 10),
          (" 1 +\n x ", 1, 2),
          ("x", -1000000, -1000000),
          ("999999999999", 0, 10**12 - 1),
      ],
  )
  def test_known_programs(self, source, x, expected):
    assert minilang.run_program(minilang.compile_program(source), x) == expected

  @hypothesis.settings(max_examples=100, deadline=None)
  @hypothesis.given(
      a=st.integers(-60, 60),
      b=st.integers(-60, 60),
      op=st.sampled_from(["+", "-", "*", "//", "%"]),
  )
  def test_binary_operations_match_python(self, a, b, op):
    program = minilang.compile_program(f"x {op} ({b})")
    python = {
        "+": operator.add,
        "-": operator.sub,
        "*": operator.mul,
        "//": operator.floordiv,
        "%": operator.mod,
    }[op]
    if b == 0 and op in ("//", "%"):
      with pytest.raises(minilang.MiniLangRuntimeError, match="division by zero"):
        minilang.run_program(program, a)
    else:
      assert minilang.run_program(program, a) == python(a, b)

  @hypothesis.settings(max_examples=150, deadline=None)
  @hypothesis.given(
      source=st.recursive(
          st.sampled_from(["x", "0", "1", "2", "7", "13", "999999"]),
          lambda inner: st.one_of(
              st.tuples(inner, st.sampled_from(["+", "-", "*", "//", "%"]), inner).map(
                  lambda t: f"({t[0]} {t[1]} {t[2]})"
              ),
              inner.map(lambda e: f"-{e}"),
              inner.map(lambda e: f"abs({e})"),
              st.tuples(st.sampled_from(["min", "max"]), inner, inner).map(
                  lambda t: f"{t[0]}({t[1]},{t[2]})"
              ),
          ),
          max_leaves=12,
      ),
      x=st.integers(-(10**6), 10**6),
  )
  def test_matches_python_semantics(self, source, x):
    limits = minilang.Limits(max_magnitude=10**9)
    expected = _reference_or_error(source, x, limits)
    program = minilang.compile_program(source, limits=limits)
    if expected is None:
      with pytest.raises(minilang.MiniLangRuntimeError):
        minilang.run_program(program, x, limits=limits)
    else:
      assert minilang.run_program(program, x, limits=limits) == expected

  @pytest.mark.parametrize(
      "source",
      [
          "",
          "   ",
          "x x",
          "2x",
          "x**2",
          "x^2",
          "1.5",
          "1e3",
          "0x10",
          "x;1",
          "y",
          "abs x",
          "abs(x",
          "min(x)",
          "max(x,1,2)",
          "(x",
          "x)",
          "+x",
          "x+",
          "ｘ",
          "x\x00",
          "__import__('os')",
          "9" * 13,
          "9" * 5000,
      ],
  )
  def test_syntax_errors(self, source):
    with pytest.raises(minilang.MiniLangSyntaxError):
      minilang.compile_program(source)

  def test_nesting_bound(self):
    limits = minilang.Limits(max_depth=10)
    assert (
        minilang.run_program(minilang.compile_program("(" * 9 + "x" + ")" * 9, limits=limits), 3)
        == 3
    )
    for deep in [
        "(" * 10 + "x" + ")" * 10,
        "-" * 11 + "x",
        "abs(" * 10 + "x" + ")" * 10,
        "(" * 5000 + "x" + ")" * 5000,
    ]:
      with pytest.raises(minilang.MiniLangSyntaxError, match="max_depth|max_length"):
        minilang.compile_program(deep, limits=limits)

  def test_length_bound(self):
    with pytest.raises(minilang.MiniLangSyntaxError, match="max_length"):
      minilang.compile_program("x" + " " * 1000)

  def test_step_bound(self):
    # n terms x+x+...+x compile to 2n - 1 instructions: 100 terms fit max_steps = 200.
    assert minilang.Limits().max_steps == 200
    within = minilang.compile_program("+".join(["x"] * 100))
    assert len(within.code) == 199
    assert minilang.run_program(within, 2) == 200
    beyond = minilang.compile_program("+".join(["x"] * 101))
    with pytest.raises(minilang.MiniLangRuntimeError, match="max_steps"):
      minilang.run_program(beyond, 2)
    assert minilang.run_program(beyond, 2, limits=minilang.Limits(max_steps=201)) == 202

  @pytest.mark.parametrize(
      "source, x",
      [("x//0", 5), ("x%(x-x)", 5), ("1//(x-3)", 3), ("x*x*x*x*x", 1000), ("999999999999+x", 2)],
  )
  def test_runtime_errors(self, source, x):
    with pytest.raises(minilang.MiniLangRuntimeError):
      minilang.run_program(minilang.compile_program(source), x)

  def test_input_beyond_magnitude(self):
    with pytest.raises(minilang.MiniLangRuntimeError):
      minilang.run_program(minilang.compile_program("x"), 10**13)

  def test_count_passed(self):
    inputs, outputs = list(range(10)), [2 * x for x in range(10)]
    assert minilang.count_passed("x+x", inputs, outputs) == 10
    assert minilang.count_passed("x*x", inputs, outputs) == 2  # x = 0 and x = 2.
    # Division by zero at x = 3 fails that test only.
    assert minilang.count_passed("2*x + 0*(1//(x-3))", inputs, outputs) == 9
    assert minilang.count_passed("2*x)", inputs, outputs) == 0
    with pytest.raises(ValueError, match="outputs"):
      minilang.count_passed("x", inputs, outputs[:3])

  def test_limits_validation(self):
    for bad in [dict(max_steps=0), dict(max_depth=-1), dict(max_length=1.5)]:
      with pytest.raises(ValueError, match="positive int"):
        minilang.Limits(**bad)

  def test_non_string_source(self):
    with pytest.raises(TypeError):
      minilang.compile_program(b"x")


# ---------------------------------------------------------------------------- shared


class TestShared:

  @pytest.mark.parametrize(
      "text, expected",
      [
          ("12", 12),
          ("-7", -7),
          ("007", 7),
          ("9" * 18, 10**18 - 1),
          ("9" * 19, None),
          ("-" + "9" * 5000, None),
          ("+1", None),
          (" 1", None),
          ("1_0", None),
          ("٤", None),
          ("", None),
          ("-", None),
      ],
  )
  def test_parse_integer(self, text, expected):
    assert base.parse_integer(text) == expected

  def test_config_name(self):
    assert base.config_name(a=3, b=-20, ops="add.sub") == "a3_bm20_opsadd.sub"
    with pytest.raises(ValueError, match="cannot encode"):
      base.config_name(ops="a/b")

  def test_get_task_errors(self):
    with pytest.raises(ValueError, match="valid tasks.*arithmetic"):
      tasks.get_task("nope")
    with pytest.raises(ValueError, match="unknown hyperparameters.*num_digits"):
      tasks.get_task("arithmetic", digits=3)
    with pytest.raises(ValueError, match="num_digits"):
      tasks.get_task("arithmetic", num_digits=0)
    assert sorted(tasks.TASKS) == ["arithmetic", "gsm8k", "math", "multiplicative", "program_tests"]

  @pytest.mark.parametrize("name", ["arithmetic", "program_tests", "multiplicative"])
  def test_default_task_uses_the_predefined_config(self, name, tmp_path):
    task = tasks.get_task(name)
    builder = task.builder(data_dir=str(tmp_path))
    assert builder.builder_config is task.builder_cls.BUILDER_CONFIGS[0]
    other = tasks.get_task(name, seed=1).builder(data_dir=str(tmp_path))
    assert other.builder_config.name != builder.builder_config.name
    assert not list(tmp_path.iterdir())  # Nothing is built before `load`.

  @pytest.mark.parametrize(
      "name, kwargs, config_name",
      [
          ("arithmetic", {}, "digits2_opsadd.sub_train10000_test1000_seed0"),
          (
              "arithmetic",
              dict(num_digits=3, operations=("*", "//", "%"), num_train=5, num_test=7, seed=3),
              "digits3_opsmul.floordiv.mod_train5_test7_seed3",
          ),
          (
              "multiplicative",
              {},
              "steps3_start20_operand9_opsadd.sub.mul_train10000_test1000_seed0",
          ),
          (
              "program_tests",
              dict(x_min=-20, x_max=-1, num_shown=2, num_tests=3, max_depth=3, seed=4),
              "shown2_tests3_x_minm20_x_maxm1_depth3_train3000_test300_seed4",
          ),
      ],
  )
  def test_config_names_are_stable(self, name, kwargs, config_name):
    # The names are the cache directories of datasets already built: they must not change.
    task = tasks.get_task(name, **kwargs)
    assert task.builder_config().name == config_name
    params = task.builder_config().params
    assert type(params) is task.builder_cls.params_cls and isinstance(task, type(params))
    # The builder config carries the data parameters only, with the task's values.
    data_fields = {field.name for field in dataclasses.fields(params)}
    assert params.data_params() == {key: getattr(task, key) for key in data_fields}
    assert not data_fields & {"min_reward", "correct_reward", "step_floor", "limits"}

  def test_decoded_source(self):
    source = base.DecodedSource(
        [
            {"a": b"x", "b": np.int64(3), "c": np.arange(2)},
            {"a": b"y", "b": np.int64(4), "c": np.arange(3)},
        ]
    )
    assert len(source) == 2
    assert source[0] == {"a": "x", "b": 3, "c": (0, 1)}
    assert type(source[0]["b"]) is int
    assert source[-1]["a"] == "y"
    assert [e["b"] for e in source[::-1]] == [4, 3]
    assert [e["b"] for e in source] == [3, 4]
    with pytest.raises(IndexError):
      source[2]


ALL_TASKS = ["arithmetic", "program_tests", "multiplicative", "gsm8k", "math"]


@pytest.fixture(scope="module")
def loaded(data_dir, gsm8k_manual_dir, math_manual_dir):
  """name -> (small task, its first test example read back through TFDS)."""
  result = {}
  for name in ALL_TASKS:
    if name == "gsm8k":
      task = tasks.get_task("gsm8k", manual_dir=gsm8k_manual_dir)
    elif name == "math":
      task = tasks.get_task("math", manual_dir=math_manual_dir)
    else:
      task = tasks.get_task(name, **SMALL[name])
    result[name] = (task, task.load("test", data_dir=data_dir)[0])
  return result


@pytest.mark.parametrize("name", ALL_TASKS)
@pytest.mark.parametrize("completion", ADVERSARIAL)
def test_rewards_never_raise_and_stay_in_range(name, completion, loaded):
  task, example = loaded[name]
  reward = task.reward(completion, example)
  assert type(reward) is float and math.isfinite(reward)
  low, high = task.reward_range
  assert low <= reward <= high


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    completion=st.text(alphabet=st.sampled_from("0123456789-+*/%(), x#.$amin\n "), max_size=60)
    | st.text(max_size=60)
)
def test_rewards_on_any_text(completion, loaded):
  for name, (task, example) in loaded.items():
    reward = task.reward(completion, example)
    assert math.isfinite(reward) and task.reward_range[0] <= reward <= task.reward_range[1]
    if name not in ("gsm8k", "math"):  # Their default rewards are 0/1.
      assert reward > 0


@pytest.mark.parametrize("name", ALL_TASKS)
def test_solution_earns_the_maximum(name, loaded, data_dir):
  task, _ = loaded[name]
  for split in ("train", "test"):
    for example in task.load(split, data_dir=data_dir):
      assert task.reward(task.solution(example), example) == task.reward_range[1]
  assert isinstance(task.solution(example), str)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_the_cache_directory_is_known_before_the_builder_reads_it(name, loaded, data_dir):
  task, _ = loaded[name]
  assert task.cache_dir(data_dir=data_dir) == epath.Path(task.builder(data_dir=data_dir).data_dir)
  assert (task.cache_dir(data_dir=data_dir) / base.CACHE_MANIFEST).exists()


def _flip(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


_CACHE_DAMAGE = {
    "records truncated": lambda d: os.truncate(next(d.glob("*train.array_record*")), 60000),
    "record byte flipped": lambda d: _flip(next(d.glob("*train.array_record*"))),
    "dataset_info.json garbage": lambda d: (d / "dataset_info.json").write_text("{garbage"),
    "features.json deleted": lambda d: (d / "features.json").unlink(),
    "manifest deleted": lambda d: (d / base.CACHE_MANIFEST).unlink(),
    "manifest garbage": lambda d: (d / base.CACHE_MANIFEST).write_text("[]"),
}


@pytest.mark.parametrize("damage", list(_CACHE_DAMAGE))
def test_a_damaged_dataset_cache_is_built_again_with_a_warning_naming_the_file(
    damage, tmp_path, caplog
):
  task = tasks.get_task("arithmetic", **SMALL["arithmetic"])
  reference = list(task.load("train", data_dir=str(tmp_path)))
  directory = task.cache_dir(data_dir=str(tmp_path))
  _CACHE_DAMAGE[damage](directory)
  with caplog.at_level(logging.WARNING, logger="gmpo_jax.tasks.base"):
    assert list(task.load("train", data_dir=str(tmp_path))) == reference
  named = {
      "records truncated": "train.array_record",
      "record byte flipped": "train.array_record",
      "dataset_info.json garbage": "dataset_info.json",
      "features.json deleted": "features.json",
      "manifest deleted": base.CACHE_MANIFEST,
      "manifest garbage": base.CACHE_MANIFEST,
  }[damage]
  [warning] = [r.getMessage() for r in caplog.records if r.name == base.logger.name]
  assert warning.startswith(f"The dataset cache {directory} is damaged ({directory}/")
  assert named in warning and warning.endswith("; building it again.")
  # Verified again, and intact: read without a word.
  caplog.clear()
  assert list(task.load("test", data_dir=str(tmp_path)))
  assert not [r for r in caplog.records if r.name == base.logger.name]


def test_a_build_that_fails_to_write_names_the_cache(tmp_path, monkeypatch):
  task = tasks.get_task("arithmetic", **SMALL["arithmetic"])

  def full_disk(self, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(arithmetic.ArithmeticBuilder, "download_and_prepare", full_disk)
  with pytest.raises(OSError) as raised:
    task.load("train", data_dir=str(tmp_path))
  assert raised.value.errno == errno.ENOSPC
  assert raised.value.filename == str(task.cache_dir(data_dir=str(tmp_path)))


def _check_builder(task, data_dir, tmp_path, generated, key):
  """Splits read back through TFDS equal the generator's, deterministically and disjointly."""
  train, test = task.load("train", data_dir=data_dir), task.load("test", data_dir=data_dir)
  assert (len(train), len(test)) == (len(generated["train"]), len(generated["test"]))
  for split, loaded in (("train", train), ("test", test)):
    assert sorted(map(key, loaded)) == sorted(map(key, generated[split]))
  assert not set(map(key, train)) & set(map(key, test))
  # Rebuilt elsewhere: the same records in the same order; reloaded: served from cache.
  again = task.load("train", data_dir=str(tmp_path))
  assert list(again) == list(train)
  assert list(task.load("train", data_dir=data_dir)) == list(train)
  assert task.load("train[:5]", data_dir=data_dir)[:] == train[:5]
  return train, test


# ------------------------------------------------------------------------ arithmetic


class TestArithmetic:

  TASK = tasks.get_task("arithmetic", **SMALL["arithmetic"])
  EXAMPLE = {"question": "23+58=", "answer": "81"}

  @pytest.mark.parametrize(
      "completion, expected",
      [
          ("81", 1.11),
          (" 81\n", 1.11),
          ("081", 0.11),
          ("82", 0.11),
          ("-81", 0.11),
          ("9" * 5000, 0.11),
          ("+81", 0.01),
          ("8 1", 0.01),
          ("81.0", 0.01),
          ("٨١", 0.01),
          ("81 apples", 0.01),
          ("", 0.01),
      ],
  )
  def test_reward(self, completion, expected):
    assert self.TASK.reward(completion, self.EXAMPLE) == pytest.approx(expected, abs=1e-12)

  def test_reward_weights(self):
    task = tasks.get_task("arithmetic", correct_reward=2.0, format_reward=0.0, min_reward=0.5)
    assert [task.reward(c, self.EXAMPLE) for c in ("81", "7", "x")] == [2.5, 0.5, 0.5]
    assert task.reward_range == (0.5, 2.5)
    assert self.TASK.reward_range == pytest.approx((0.01, 1.11))

  @pytest.mark.parametrize(
      "predicted, reference, credit",
      [
          ("81", "81", 1.0),
          ("71", "81", 0.5),
          ("80", "81", 0.5),
          ("18", "81", 0.0),
          ("181", "81", 2 / 3),
          ("1", "81", 0.5),
          ("-12", "12", 2 / 3),
          ("", "5", 0.0),
          ("", "", 0.0),
      ],
  )
  def test_digit_credit(self, predicted, reference, credit):
    assert arithmetic.digit_credit(predicted, reference) == pytest.approx(credit)

  @pytest.mark.parametrize(
      "a, b, expected",
      [(58, 23, 71), (99, 99, 88), (5, 5, 0), (0, 0, 0), (123, 9, 122), (40, 7, 47)],
  )
  def test_carry_less_sum(self, a, b, expected):
    assert arithmetic.carry_less_sum(a, b) == expected

  def test_teacher_drops_carries_at_its_rate_and_rewards_check_the_truth(self):
    splits = arithmetic.generate_arithmetic(
        num_digits=2, operations=("+",), num_train=2000, num_test=0, seed=0
    )
    examples = splits["train"]
    small = {"num_digits": 2, "operations": ("+",), "num_train": 100, "num_test": 10}
    exact = tasks.get_task("arithmetic", **small)
    assert all(exact.demonstration(e) == e["answer"] for e in examples)
    teacher = tasks.get_task("arithmetic", **small, teacher_carry_drop=0.6)
    carries = [
        e
        for e in examples
        if e["answer"] != str(arithmetic.carry_less_sum(*map(int, e["question"][:-1].split("+"))))
    ]
    dropped = [e for e in carries if teacher.demonstration(e) != e["answer"]]
    assert len(dropped) / len(carries) == pytest.approx(0.6, abs=0.05)
    assert all(teacher.demonstration(e) == e["answer"] for e in examples if e not in carries)
    assert [teacher.demonstration(e) for e in dropped] == [
        teacher.demonstration(e) for e in dropped
    ]
    e = dropped[0]
    assert teacher.reward(teacher.demonstration(e), e) < teacher.reward(e["answer"], e)
    assert teacher.reward(e["answer"], e) == teacher.reward_range[1]
    with pytest.raises(ValueError, match="teacher_carry_drop"):
      tasks.get_task("arithmetic", **small, teacher_carry_drop=1.5)

  def test_digit_reward_is_partial_credit_and_passing_stays_exact(self):
    task = tasks.get_task("arithmetic", **SMALL["arithmetic"], digit_reward=0.5)
    assert task.reward_range == pytest.approx((0.01, 1.61))
    rewards = {c: task.reward(c, self.EXAMPLE) for c in ("81", "71", "18", "x1", "181")}
    assert rewards == pytest.approx(
        {"81": 1.61, "71": 0.36, "18": 0.11, "x1": 0.01, "181": 0.11 + 0.5 * 2 / 3}
    )
    assert [c for c, r in rewards.items() if r >= task.reward_range[1] - 1e-6] == ["81"]
    with pytest.raises(ValueError, match="digit_reward"):
      tasks.get_task("arithmetic", digit_reward=-1.0)

  @pytest.mark.parametrize("operations", [("+", "-", "*", "//", "%")])
  def test_generated_answers(self, operations):
    splits = arithmetic.generate_arithmetic(
        num_digits=2, operations=operations, num_train=300, num_test=100, seed=3
    )
    symbols = {
        "+": operator.add,
        "-": operator.sub,
        "*": operator.mul,
        "//": operator.floordiv,
        "%": operator.mod,
    }
    seen_ops = set()
    for problem in splits["train"] + splits["test"]:
      question = problem["question"]
      assert question.endswith("=")
      op = next(s for s in ("//", "+", "-", "*", "%") if s in question)
      a, b = map(int, question[:-1].split(op))
      assert 0 <= a < 100 and 0 <= b < 100 and (b > 0 or op not in ("//", "%"))
      assert problem["answer"] == str(symbols[op](a, b))
      seen_ops.add(op)
    assert seen_ops == set(operations)

  def test_generation_is_deterministic_and_disjoint(self):
    params = dict(num_digits=1, operations=("+",), num_test=20, seed=0)
    first = arithmetic.generate_arithmetic(num_train=50, **params)
    assert first == arithmetic.generate_arithmetic(num_train=50, **params)
    # The test split does not depend on num_train; the whole space can be used.
    full = arithmetic.generate_arithmetic(num_train=80, **params)
    assert full["test"] == first["test"]
    questions = [p["question"] for p in full["train"] + full["test"]]
    assert len(set(questions)) == 100
    other_seed = arithmetic.generate_arithmetic(num_train=50, **{**params, "seed": 1})
    assert other_seed["test"] != first["test"]

  def test_capacity(self):
    with pytest.raises(ValueError, match="only 100 distinct"):
      tasks.get_task("arithmetic", num_digits=1, operations=("+",), num_train=90, num_test=11)
    with pytest.raises(ValueError, match="operations"):
      tasks.get_task("arithmetic", operations="+-")
    with pytest.raises(ValueError, match="operations"):
      tasks.get_task("arithmetic", operations=("+", "+"))

  def test_builder(self, data_dir, tmp_path):
    generated = arithmetic.generate_arithmetic(
        num_digits=2, operations=("+", "-"), num_train=40, num_test=15, seed=0
    )
    train, _ = _check_builder(self.TASK, data_dir, tmp_path, generated, key=lambda e: e["question"])
    example = train[0]
    assert self.TASK.prompt(example) == example["question"]
    assert self.TASK.reward(example["answer"], example) == pytest.approx(1.11)


# --------------------------------------------------------------------- program_tests


class TestProgramTests:

  TASK = tasks.get_task("program_tests", **SMALL["program_tests"])
  EXAMPLE = {
      "question": "f(x)=",
      "test_inputs": tuple(range(10)),
      "test_outputs": tuple(2 * x for x in range(10)),
  }

  @pytest.mark.parametrize(
      "completion, passed",
      [
          ("2*x", 10),
          ("x + x", 10),
          ("x*x", 2),
          ("2*x + 0*(1//(x-3))", 9),
          ("x//0", 0),
          ("", 0),
          ("2*x)", 0),
          ("x" + "+0" * 400, 0),
          ("(" * 40 + "2*x" + ")" * 40, 0),
          ("9" * 5000, 0),
      ],
  )
  def test_reward(self, completion, passed):
    assert self.TASK.reward(completion, self.EXAMPLE) == pytest.approx(passed + 0.01)

  def test_step_bound_is_the_reason(self):
    # x+0+...+0 computes 2x correctly only with a step bound that admits it.
    long_program = "2*x" + "+0" * 400
    assert self.TASK.reward(long_program, self.EXAMPLE) == pytest.approx(0.01)
    roomy = tasks.get_task("program_tests", limits=minilang.Limits(max_steps=1000))
    assert roomy.reward(long_program, self.EXAMPLE) == pytest.approx(10.01)

  def test_rewards_span_orders_of_magnitude(self):
    task = tasks.get_task("program_tests", num_tests=100, num_shown=0, x_min=0, x_max=99)
    example = {"test_inputs": tuple(range(100)), "test_outputs": tuple(range(100))}
    rewards = [task.reward(c, example) for c in ("garbage", "0", "min(x,9)", "x")]
    assert rewards == pytest.approx([0.01, 1.01, 10.01, 100.01])
    assert task.reward_range == (0.01, 100.01)

  def test_generation(self):
    params = dict(num_shown=3, num_tests=10, x_min=-15, x_max=15, max_depth=2, num_test=10, seed=5)
    splits = program_tests.generate_programs(num_train=40, **params)
    assert splits == program_tests.generate_programs(num_train=40, **params)
    assert splits["test"] == program_tests.generate_programs(num_train=5, **params)["test"]
    functions = {}
    for split, problems in splits.items():
      for problem in problems:
        program = minilang.compile_program(problem["solution"])
        inputs = list(problem["shown_inputs"]) + list(problem["test_inputs"])
        outputs = list(problem["shown_outputs"]) + list(problem["test_outputs"])
        assert len(set(inputs)) == 13 and all(-15 <= x <= 15 for x in inputs)
        assert [minilang.run_program(program, int(x)) for x in inputs] == outputs
        values = tuple(minilang.run_program(program, x) for x in range(-15, 16))
        assert len(set(values)) > 1
        functions.setdefault(values, set()).add(split)
        shown = "; ".join(
            f"f({x})={y}" for x, y in zip(problem["shown_inputs"], problem["shown_outputs"])
        )
        assert problem["question"] == shown + "; f(x)="
    assert all(len(s) == 1 for s in functions.values())  # Disjoint as functions.
    assert len(functions) == 50

  def test_generation_exhausted(self):
    with pytest.raises(ValueError, match="distinct functions"):
      program_tests.generate_programs(
          num_shown=1, num_tests=1, x_min=0, x_max=1, max_depth=1, num_train=50, num_test=0, seed=0
      )

  def test_validation(self):
    with pytest.raises(ValueError, match="distinct inputs"):
      tasks.get_task("program_tests", num_tests=100, x_min=0, x_max=50)
    assert tasks.get_task("program_tests", limits={"max_steps": 3}).limits == minilang.Limits(
        max_steps=3
    )
    config = ml_collections.ConfigDict({"limits": {"max_depth": 4}})
    assert tasks.get_task("program_tests", **config).limits == minilang.Limits(max_depth=4)
    with pytest.raises(ValueError, match="limits"):
      tasks.get_task("program_tests", limits=[3])
    with pytest.raises(ValueError, match="positive int"):
      tasks.get_task("program_tests", limits={"max_steps": 0})

  def test_builder(self, data_dir, tmp_path):
    generated = program_tests.generate_programs(
        num_shown=4,
        num_tests=20,
        x_min=-50,
        x_max=50,
        max_depth=2,
        num_train=30,
        num_test=10,
        seed=0,
    )
    train, test = _check_builder(
        self.TASK, data_dir, tmp_path, generated, key=lambda e: e["question"]
    )
    for example in list(train) + list(test):
      assert self.TASK.reward(example["solution"], example) == pytest.approx(20.01)
      assert len(example["test_inputs"]) == 20 and len(example["shown_inputs"]) == 4


# -------------------------------------------------------------------- multiplicative


def _reference_truth(start, ops, operands):
  values, value = [], start
  for op, c in zip(ops, operands):
    value = {"+": value + c, "-": value - c, "*": value * c}[op]
    values.append(value)
  return values


def _reference_scores(values_text, start, ops, operands, floor):
  """Per-step scores written from the task definition, independently of the task code."""
  pieces = [p.strip() for p in values_text.strip().split(",")]
  truth = _reference_truth(start, ops, operands)
  scores, previous = [], start
  for k, (op, c) in enumerate(zip(ops, operands)):
    target = {"+": previous + c, "-": previous - c, "*": previous * c}[op]
    piece = pieces[k] if k < len(pieces) else ""
    digits = piece[1:] if piece.startswith("-") else piece
    if 1 <= len(digits) <= 18 and all(ch in "0123456789" for ch in digits):
      scores.append(max(floor, 1.0 / (1.0 + abs(int(piece) - target))))
      previous = int(piece)
    else:
      scores.append(floor)
      previous = truth[k]
  return scores


class TestMultiplicative:

  TASK = tasks.get_task("multiplicative", **SMALL["multiplicative"])
  EXAMPLE = {
      "question": "7 +3 *2 -5 =",
      "start": 7,
      "operations": "+*-",
      "operands": (3, 2, 5),
      "values": (10, 20, 15),
      "answer": "10,20,15",
  }

  @pytest.mark.parametrize(
      "completion, scores",
      [
          ("10,20,15", [1, 1, 1]),
          (" 10 , 20 , 15 \n", [1, 1, 1]),
          ("10,20,16", [1, 1, 0.5]),
          ("11,22,17", [0.5, 1, 1]),  # Steps 2 and 3 are judged from the model's own 11.
          ("10,20", [1, 1, 0.01]),
          ("10,x,15", [1, 0.01, 1]),  # After a malformed step, the reference value is used.
          ("10,20,1000", [1, 1, 0.01]),  # 1 / (1 + 985) is below the floor.
          ("10,20,15,99", [1, 1, 1]),  # Extra values are ignored.
          ("", [0.01, 0.01, 0.01]),
          ("9" * 5000, [0.01, 0.01, 0.01]),
          ("٫١٠,20,15", [0.01, 1, 1]),
      ],
  )
  def test_step_scores_and_reward(self, completion, scores):
    assert self.TASK.step_scores(completion, self.EXAMPLE) == pytest.approx(scores)
    assert self.TASK.reward(completion, self.EXAMPLE) == pytest.approx(float(np.prod(scores)))

  @hypothesis.settings(max_examples=100, deadline=None)
  @hypothesis.given(
      # Per step: an offset from the true running value, or a malformed/huge piece.
      pieces=st.lists(
          st.integers(-2, 2) | st.sampled_from(["", "x", "1.5", " 3", "9" * 19]), max_size=5
      ),
      start=st.integers(0, 20),
      steps=st.lists(st.tuples(st.sampled_from("+-*"), st.integers(1, 9)), min_size=1, max_size=4),
      floor=st.sampled_from([0.01, 0.2, 1.0]),
  )
  def test_matches_reference(self, pieces, start, steps, floor):
    ops = "".join(op for op, _ in steps)
    operands = tuple(c for _, c in steps)
    task = tasks.get_task(
        "multiplicative", num_steps=len(steps), step_floor=floor, num_train=10, num_test=0
    )
    example = {"start": start, "operations": ops, "operands": operands}
    truth = [int(v) for v in _reference_truth(start, ops, operands)]
    text = ",".join(
        str(truth[k] + piece) if isinstance(piece, int) and k < len(truth) else str(piece)
        for k, piece in enumerate(pieces)
    )
    expected = _reference_scores(text, start, ops, operands, floor)
    assert task.step_scores(text, example) == pytest.approx(expected, rel=1e-12)
    reward = task.reward(text, example)
    assert reward == pytest.approx(float(np.prod(np.asarray(expected, np.float64))), rel=1e-12)
    assert task.reward_range[0] <= reward <= 1.0

  def test_reward_range_spans_orders_of_magnitude(self):
    assert self.TASK.reward_range == pytest.approx((1e-6, 1.0))
    assert self.TASK.reward("", self.EXAMPLE) == pytest.approx(1e-6)

  def test_generation(self):
    params = dict(
        num_steps=3, max_start=20, max_operand=9, operations=("+", "-", "*"), num_test=15, seed=2
    )
    splits = multiplicative.generate_chains(num_train=40, **params)
    assert splits == multiplicative.generate_chains(num_train=40, **params)
    assert splits["test"] == multiplicative.generate_chains(num_train=3, **params)["test"]
    questions = [c["question"] for c in splits["train"] + splits["test"]]
    assert len(set(questions)) == 55
    for chain in splits["train"] + splits["test"]:
      assert self.TASK.reward(chain["answer"], chain) == 1.0
      value = chain["start"]
      for op, c, v in zip(chain["operations"], chain["operands"], chain["values"]):
        value = {"+": value + c, "-": value - c, "*": value * c}[op]
        assert value == v and 1 <= c <= 9
      tokens = chain["question"].split()
      assert tokens[0] == str(chain["start"]) and tokens[-1] == "="

  def test_validation(self):
    with pytest.raises(ValueError, match="step_floor"):
      tasks.get_task("multiplicative", step_floor=0.0)
    with pytest.raises(ValueError, match="underflows"):
      tasks.get_task("multiplicative", num_steps=200, step_floor=1e-2, max_operand=1)
    with pytest.raises(ValueError, match="digits"):
      tasks.get_task("multiplicative", num_steps=30)
    with pytest.raises(ValueError, match="operations"):
      tasks.get_task("multiplicative", operations=("//",))
    with pytest.raises(ValueError, match="only 18 distinct chains"):
      tasks.get_task(
          "multiplicative", num_steps=1, max_start=2, max_operand=2, num_train=19, num_test=0
      )

  def test_builder(self, data_dir, tmp_path):
    generated = multiplicative.generate_chains(
        num_steps=3,
        max_start=20,
        max_operand=9,
        operations=("+", "-", "*"),
        num_train=40,
        num_test=15,
        seed=0,
    )
    train, _ = _check_builder(self.TASK, data_dir, tmp_path, generated, key=lambda e: e["question"])
    assert all(self.TASK.reward(e["answer"], e) == 1.0 for e in train)
    assert isinstance(train[0]["operands"], tuple) and isinstance(train[0]["start"], int)


# ---------------------------------------------------------------------------- gsm8k


class TestGsm8k:

  @pytest.mark.parametrize(
      "text, expected",
      [
          ("The answer is 42.", "42"),
          ("so 5 apples\n#### 7", "7"),
          ("#### 1,234", "1234"),
          ("It costs $1,234.50 in total", "1234.50"),
          ("#### $5", "5"),
          ("#### -3", "-3"),
          ("-$12 loss", "-12"),
          ("#### 12 dollars, then 13", "12"),  # The first number after the marker.
          ("first #### 1 then #### 2", "2"),  # The last marker.
          ("we get 12 ####", "12"),  # Nothing after the marker: the last number.
          ("#### none", None),
          ("3,4", "4"),
          ("1,2345", "2345"),
          ("no numbers here", None),
          ("", None),
          ("٤٢", None),
          ("9" * 5000, "9" * 5000),
      ],
  )
  def test_extract_final_answer(self, text, expected):
    assert gsm8k.extract_final_answer(text) == expected

  @pytest.mark.parametrize(
      "predicted, reference, match",
      [
          ("42", "42", True),
          ("42.0", "42", True),
          ("42.0000001", "42", True),
          ("42.01", "42", False),
          ("-3", "3", False),
          (None, "3", False),
          ("9" * 5000, "5", False),
          ("2.50", "2.5", True),
      ],
  )
  def test_answers_match(self, predicted, reference, match):
    assert gsm8k.answers_match(predicted, reference, tolerance=1e-6) is match

  def test_reward(self):
    example = {"question": "q", "answer": "... #### 1,200", "final_answer": "1200"}
    task = tasks.get_task("gsm8k")
    assert [task.reward(c, example) for c in ("#### 1,200", "so 1200", "#### 12", "")] == [
        1.0,
        1.0,
        0.0,
        0.0,
    ]
    assert task.reward_range == (0.0, 1.0)
    credited = tasks.get_task("gsm8k", format_reward=0.1, min_reward=0.01)
    rewards = [credited.reward(c, example) for c in ("#### $1200", "so 1200", "#### 12", "")]
    assert rewards == pytest.approx([1.11, 1.01, 0.11, 0.01])
    assert credited.reward_range == pytest.approx((0.01, 1.11))

  def test_prompt_template(self):
    task = tasks.get_task("gsm8k", prompt_template="Q: {question}\nA ({{steps}}):")
    assert task.prompt({"question": "2+2?"}) == "Q: 2+2?\nA ({steps}):"
    for bad in ["no field", "{question} {other}", "{question", "{question} {0}", "{question.real}"]:
      with pytest.raises(ValueError, match="prompt_template"):
        tasks.get_task("gsm8k", prompt_template=bad)

  def test_builder(self, data_dir, gsm8k_manual_dir, tmp_path):
    task = tasks.get_task("gsm8k", manual_dir=gsm8k_manual_dir)
    train, test = task.load("train", data_dir=data_dir), task.load("test", data_dir=data_dir)
    assert sorted(e["final_answer"] for e in train) == ["2.5", "2400", "7"]
    assert list(test) == [
        {"question": "10 minus 13?", "answer": "10-13=-3\n#### -3", "final_answer": "-3"}
    ]
    assert task.prompt(test[0]) == "Question: 10 minus 13?\nAnswer:\n"
    assert task.solution(train[0]) in (
        "3+4=7\n#### 7",
        "2*1200=2400\n#### 2,400",
        "5/2=2.5\n#### 2.5",
    )
    assert task.reward("It is 10 - 13 = -3.\n#### -3", test[0]) == 1.0
    for example in train:
      assert task.reward(example["answer"], example) == 1.0
    assert list(task.load("train", data_dir=str(tmp_path))) == list(train)

  def test_builder_errors(self, tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "train.jsonl").write_text(json.dumps({"question": "q", "answer": "a #### 1"}) + "\n")
    task = tasks.get_task("gsm8k", manual_dir=str(manual))
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
      task.load("train", data_dir=str(tmp_path / "a"))
    (manual / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl:1: .*'####'"):
      task.load("train", data_dir=str(tmp_path / "b"))
    (manual / "test.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"test.jsonl:1: not JSON"):
      task.load("train", data_dir=str(tmp_path / "c"))


# ----------------------------------------------------------------------------- math


class TestMath:

  TASK = tasks.get_task("math", format_reward=0.1, min_reward=0.01)
  HALF = {"problem": "p", "solution": "", "answer": "\\frac{1}{2}"}

  @pytest.mark.parametrize(
      "text, expected",
      [
          ("so $\\boxed{5}$.", "5"),
          ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # Nested braces.
          ("\\boxed{1} then \\boxed{ 2 }", " 2 "),  # The last box, unstripped.
          ("\\boxed {7}", "7"),
          ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # Escaped braces do not count.
          ("\\boxed{a\\\\}", "a\\\\"),  # '\\' is a line break, then '}' closes.
          ("\\boxed{\\boxed{3}}", "3"),  # The last '\boxed{' is the inner one.
          ("\\boxed{1} and \\boxed{2", None),  # The last box never closes: no answer.
          ("\\boxed{\\}", None),
          ("\\boxed{3}}}", "3"),
          ("\\boxed3", None),
          ("no box", None),
          ("", None),
          ("\\boxed{", None),
          ("\\boxed{x\\", None),
      ],
  )
  def test_last_boxed(self, text, expected):
    assert competition_math.last_boxed(text) == expected

  @pytest.mark.parametrize(
      "completion",
      [
          "\\boxed{\\frac{1}{2}}",
          "\\boxed{0.5}",
          "\\boxed{1/2}",
          "\\boxed{\\dfrac{1}{2}}",
          "\\boxed{\\tfrac12}",
          "\\boxed{ \\frac { 1 } { 2 } }",
          "\\boxed{.5}",
          "\\boxed{0.50}",
          "\\boxed{\\frac{2}{4}}",
          "Thus the answer is $\\boxed{\\frac{1}{2}}$.",
          "\\boxed{3} is wrong, so \\boxed{0.5}",
      ],
  )
  def test_equivalent_forms_are_correct(self, completion):
    assert self.TASK.reward(completion, self.HALF) == pytest.approx(1.11)
    # The reference's form does not matter either.
    assert self.TASK.reward(completion, {**self.HALF, "answer": "0.5"}) == pytest.approx(1.11)

  @pytest.mark.parametrize(
      "completion, reward",
      [
          ("\\boxed{0.51}", 0.11),
          ("\\boxed{2}", 0.11),
          ("\\boxed{\\frac{1}{3}}", 0.11),
          ("\\boxed{x}", 0.11),
          ("\\boxed{\\text{half}}", 0.11),
          ("\\boxed{0.5} then \\boxed{3}", 0.11),  # Only the last box counts.
          ("1/2", 0.01),
          ("", 0.01),
          ("   ", 0.01),
          ("\\boxed{}", 0.01),
          ("\\boxed{  }", 0.01),
          ("\\boxed{\\frac{1}{2}", 0.01),  # Unbalanced.
          ("\\boxed{0.5} and \\boxed{", 0.01),  # The last box never closes.
          ("\\boxed{\\frac{1}{2}}}", 1.11),  # A stray '}' after a closed box is harmless.
          ("\\boxed{\\frac{1}{2}\\}", 0.01),
          ("\\boxed{}{}}", 0.01),
          ("\\boxed{\\frac{}{}}", 0.11),
          ("\\boxed{\\sqrt{}}", 0.11),
          ("\\boxed{{{{}}}}", 0.11),
          ("\\boxed{$}", 0.11),
          ("\\boxed{\\begin{pmatrix}}", 0.11),
      ],
  )
  def test_wrong_and_malformed(self, completion, reward):
    assert self.TASK.reward(completion, self.HALF) == pytest.approx(reward)

  def test_extract_answer(self):
    assert self.TASK.extract_answer("so \\boxed{ \\frac{1}{2} }.") == "\\frac{1}{2}"
    for completion in ("0.5", "\\boxed{ }", "\\boxed{0.5"):
      assert self.TASK.extract_answer(completion) is None

  def test_default_reward_and_range(self):
    task = tasks.get_task("math")
    assert task.reward_range == (0.0, 1.0)
    rewards = [task.reward(c, self.HALF) for c in ("\\boxed{0.5}", "\\boxed{2}", "0.5")]
    assert rewards == [1.0, 0.0, 0.0]
    assert self.TASK.reward_range == pytest.approx((0.01, 1.11))

  def test_other_answer_kinds(self):
    cases = [
        ("\\{1, 2\\}", "\\{2,1\\}"),
        ("(1, 2)", "(1,2)"),
        ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2"),
        ("x^2 + 1", "1 + x^2"),
        ("\\text{(C)}", "\\text{(C)}"),
        ("5", "x = 5"),
        ("10\\%", "10"),
    ]
    for reference, predicted in cases:
      reward = self.TASK.reward(f"\\boxed{{{predicted}}}", {"answer": reference})
      assert reward == pytest.approx(1.11), (reference, predicted)

  def test_slow_answers_time_out(self):
    # sympy cannot decide 9^(9^(9^9)) = 3 in any reasonable time: the timeout cuts it off.
    task = tasks.get_task("math", timeout_seconds=1)
    start = time.monotonic()
    assert task.reward("\\boxed{9^{9^{9^{9}}}}", {"answer": "3"}) == 0.0
    assert time.monotonic() - start < 10  # Without the timeout it never returns.
    long = tasks.get_task("math", max_answer_chars=10, format_reward=0.5)
    assert long.reward("\\boxed{0.500000000000}", self.HALF) == 0.5  # Not compared.
    assert long.reward("\\boxed{0.5}", self.HALF) == 1.5

  @hypothesis.settings(max_examples=25, deadline=None)
  @hypothesis.given(
      content=st.text(alphabet=st.sampled_from("0123456789+-*/.,=x()[]{}\\ fracqt$%"), max_size=24)
  )
  def test_any_box_content(self, content):
    task = tasks.get_task("math", timeout_seconds=1, min_reward=0.01, format_reward=0.1)
    reward = task.reward(f"so \\boxed{{{content}}}.", self.HALF)
    assert reward in (pytest.approx(0.01), pytest.approx(0.11), pytest.approx(1.11))

  def test_timeout_needs_the_main_thread(self):
    results = {}

    def score(task, key):
      try:
        results[key] = task.reward("\\boxed{0.5}", self.HALF)
      except RuntimeError as error:
        results[key] = error
      try:
        results[key + "_unboxed"] = task.reward("0.5", self.HALF)
      except RuntimeError as error:
        results[key + "_unboxed"] = error

    for key, task in [
        ("timeout", tasks.get_task("math")),
        ("no_timeout", tasks.get_task("math", timeout_seconds=None)),
    ]:
      thread = threading.Thread(target=score, args=(task, key))
      thread.start()
      thread.join()
    # A clear error for any completion, not a silent 0 for boxed ones.
    for key in ("timeout", "timeout_unboxed"):
      assert isinstance(results[key], RuntimeError) and "main thread" in str(results[key])
    assert (results["no_timeout"], results["no_timeout_unboxed"]) == (1.0, 0.0)

  def test_prompt_template(self):
    example = {"problem": "What is $\\frac{1}{2}$?"}
    assert self.TASK.prompt(example) == (
        "What is $\\frac{1}{2}$?\n\nPlease reason step by step, and put your final answer "
        "within \\boxed{}."
    )
    task = tasks.get_task("math", prompt_template="<user>{problem} Use \\boxed{}.<assistant>")
    assert task.prompt(example) == "<user>What is $\\frac{1}{2}$? Use \\boxed{}.<assistant>"
    for bad in ["no field", "{question}", 3]:
      with pytest.raises(ValueError, match="prompt_template"):
        tasks.get_task("math", prompt_template=bad)

  def test_validation(self):
    for bad in [
        dict(timeout_seconds=0),
        dict(timeout_seconds=1.5),
        dict(max_answer_chars=0),
        dict(correct_reward=-1.0),
        dict(min_reward=math.nan),
    ]:
      with pytest.raises(ValueError):
        tasks.get_task("math", **bad)

  @pytest.mark.parametrize(
      "example, expected",
      [
          ({"solution": "So $\\boxed{ \\frac{1}{2} }$.", "answer": "0.5"}, "So $\\boxed{0.5}$."),
          (
              {"solution": "It is one half.", "answer": "0.5"},
              "It is one half.\n\nThe final answer is $\\boxed{0.5}$.",
          ),
          ({"solution": "", "answer": "0.5"}, "The final answer is $\\boxed{0.5}$."),
      ],
  )
  def test_solution(self, example, expected):
    assert self.TASK.solution(example) == expected
    assert self.TASK.reward(expected, example) == self.TASK.reward_range[1]

  def test_builder(self, data_dir, math_manual_dir, tmp_path):
    task = tasks.get_task("math", manual_dir=math_manual_dir)
    train, test = task.load("train", data_dir=data_dir), task.load("test", data_dir=data_dir)
    by_problem = {e["problem"]: e for e in train}
    assert len(train) == 4 and len(by_problem) == 4
    assert set(by_problem["Write $0.5$ as a fraction."]) == {"problem", "solution", "answer"}
    assert [by_problem[r["problem"]]["answer"] for r in MATH_RECORDS["train"]] == [
        "\\frac{1}{2}",
        "\\frac{\\sqrt{3}}{2}",
        "\\{1, 2\\}",
        "5",
    ]
    assert by_problem["What is $2 + 3$?"]["solution"] == ""
    assert list(test) == [
        {
            "problem": "Simplify $\\dfrac{6}{4}$.",
            "solution": "$\\boxed{\\dfrac{3}{2}}$",
            "answer": "\\frac{3}{2}",
        }
    ]
    assert task.prompt(test[0]).startswith("Simplify $\\dfrac{6}{4}$.\n\nPlease reason")
    assert task.reward("6/4 = \\boxed{1.5}", test[0]) == 1.0
    assert task.reward("\\boxed{\\frac{6}{4}}", test[0]) == 1.0
    assert task.reward("\\boxed{\\frac{2}{3}}", test[0]) == 0.0
    assert list(task.load("train", data_dir=str(tmp_path))) == list(train)

  def test_builder_errors(self, tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "train.jsonl").write_text(json.dumps({"problem": "p", "answer": "1"}) + "\n")
    task = tasks.get_task("math", manual_dir=str(manual))
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
      task.load("train", data_dir=str(tmp_path / "a"))
    for n, (line, message) in enumerate(
        [
            (json.dumps({"problem": "p", "solution": "no box"}), "no 'answer', and no closed"),
            (json.dumps({"problem": "p", "solution": "\\boxed{1"}), "no 'answer', and no closed"),
            (json.dumps({"problem": "p"}), "no 'answer'"),
            (json.dumps({"problem": "p", "answer": "  "}), "blank"),
            (json.dumps({"problem": 3, "answer": "1"}), "str 'problem'"),
            (json.dumps({"problem": "p", "answer": 1}), "must be str"),
            (json.dumps(["p"]), "JSON object"),
            ("{not json", "not JSON"),
        ]
    ):
      (manual / "test.jsonl").write_text("\n" + line + "\n")
      with pytest.raises(ValueError, match=f"test.jsonl:2: .*{message}"):
        task.load("train", data_dir=str(tmp_path / str(n)))


# -------------------------------------------------------------------------- configs


def test_qwen2_5_math_config():
  from configs import qwen2_5_math
  from gmpo_jax.config import AlgorithmConfig

  config = qwen2_5_math.get_config()
  algorithm = AlgorithmConfig.from_config(config.algorithm)
  # The GMPO paper's hyperparameters (arXiv 2507.20673).
  assert (algorithm.advantage, algorithm.objective) == ("gmpo", "geometric")
  assert dict(algorithm.objective_kwargs) == {"epsilon_low": 0.4, "epsilon_high": 0.4}
  assert algorithm.num_generations == 8 and algorithm.beta == 0.0
  assert config.optim.learning_rate == 1e-6
  assert config.sampling.max_new_tokens >= 1024
  assert config.model.hf_path is None and config.task.kwargs.manual_dir is None  # Set at launch.
  # The task section builds the math task, whose prompt is Qwen's chat format.
  config.task.kwargs.manual_dir = "/data/math"
  task = tasks.get_task(config.task.name, **config.task.kwargs)
  assert isinstance(task, competition_math.MathTask) and task.manual_dir == "/data/math"
  assert task.reward_range[0] > 0  # The log-reward baseline needs positive rewards.
  prompt = task.prompt({"problem": "What is $1+1$?"})
  assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
  assert "What is $1+1$?\nPlease reason step by step" in prompt and "\\boxed{}" in prompt
