"""Prompt datasets (TFDS, built locally) with reward functions on completions."""

from gmpo_jax.tasks.arithmetic import ArithmeticTask
from gmpo_jax.tasks.base import DecodedSource, Task
from gmpo_jax.tasks.competition_math import MathTask, answers_equivalent, last_boxed
from gmpo_jax.tasks.gsm8k import Gsm8kTask, answers_match, extract_final_answer
from gmpo_jax.tasks.minilang import (
    Limits,
    MiniLangError,
    compile_program,
    count_passed,
    run_program,
)
from gmpo_jax.tasks.multiplicative import MultiplicativeTask
from gmpo_jax.tasks.program_tests import ProgramTestsTask
from gmpo_jax.tasks.registry import TASKS, get_task

__all__ = [
    "ArithmeticTask",
    "DecodedSource",
    "Gsm8kTask",
    "Limits",
    "MathTask",
    "MiniLangError",
    "MultiplicativeTask",
    "ProgramTestsTask",
    "TASKS",
    "Task",
    "answers_equivalent",
    "answers_match",
    "compile_program",
    "count_passed",
    "extract_final_answer",
    "get_task",
    "last_boxed",
    "run_program",
]
