"""A tiny, safe expression language over one integer variable `x`.

Completions of the `program_tests` task are programs in this language. Model output is
never handed to Python's `eval`/`exec`: it is tokenized and parsed here into postfix code
for a small stack machine, and every resource is bounded (source length, nesting depth,
instructions executed, integer magnitude), so any string costs at most
O(max_length + max_steps) work and either yields an integer or raises `MiniLangError`.

Grammar (usual precedence; binary operators associate to the left):

    expr   := term (('+' | '-') term)*
    term   := factor (('*' | '//' | '%') factor)*
    factor := '-' factor | atom
    atom   := INT | 'x' | '(' expr ')' | 'abs' '(' expr ')'
            | ('min' | 'max') '(' expr ',' expr ')'

`//` and `%` are floor division and the matching modulo (the remainder takes the sign of
the divisor, as in Python: -7 // 2 == -4, -7 % 2 == 1); a zero divisor is a runtime error.
Whitespace is ignored; any other character is a syntax error.
"""

import dataclasses
import re
from collections.abc import Sequence


class MiniLangError(ValueError):
  """A program that cannot be parsed or that fails at run time."""


class MiniLangSyntaxError(MiniLangError):
  """The source is not a program of the language or exceeds a static limit."""


class MiniLangRuntimeError(MiniLangError):
  """Division by zero, an out-of-range integer, or the step bound was hit."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Limits:
  """Resource bounds of the interpreter.

  Attributes:
    max_length: longest accepted source, in characters (checked before tokenizing).
    max_depth: deepest accepted nesting of parentheses, function calls and unary minus.
    max_steps: most instructions executed per run; the language has no loops, so a
      program whose postfix code is longer than this fails on every input. Scoring a
      completion costs at most K * max_steps instructions (K test cases).
    max_magnitude: largest |value| of any constant or intermediate result.
  """

  max_length: int = 1000
  max_depth: int = 32
  max_steps: int = 200
  max_magnitude: int = 10**12

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"Limits.{field.name} must be a positive int, got {value!r}.")


# One alternative per token kind; `\s+` is skipped. Everything else falls through to
# the final catch-all and is reported as a syntax error.
_TOKEN_RE = re.compile(
    r"(?P<space>\s+)|(?P<int>[0-9]+)|(?P<name>[A-Za-z_]+)|(?P<op>//|[-+*%(),])|(?P<bad>.)",
    re.DOTALL,
)
_FUNCTION_ARITY = {"abs": 1, "min": 2, "max": 2}
_BINARY_OPCODES = {"+": "add", "-": "sub", "*": "mul", "//": "floordiv", "%": "mod"}


@dataclasses.dataclass(frozen=True)
class Program:
  """Postfix code: a tuple of (opcode, constant-or-None) instructions."""

  code: tuple[tuple[str, int | None], ...]
  source: str


def _tokenize(source: str, limits: Limits) -> list[tuple[str, str]]:
  if len(source) > limits.max_length:
    raise MiniLangSyntaxError(
        f"program has {len(source)} characters, more than max_length={limits.max_length}"
    )
  max_digits = len(str(limits.max_magnitude))
  tokens = []
  for match in _TOKEN_RE.finditer(source):
    kind, text = match.lastgroup, match.group()
    if kind == "space":
      continue
    if kind == "bad":
      raise MiniLangSyntaxError(f"unexpected character {text!r} at {match.start()}")
    if kind == "name" and text != "x" and text not in _FUNCTION_ARITY:
      raise MiniLangSyntaxError(f"unknown name {text!r} at {match.start()}")
    # Reject long digit strings before int(): Python refuses to convert strings of
    # more than 4300 digits, and anything past max_magnitude is out of range anyway.
    if kind == "int" and (len(text) > max_digits or int(text) > limits.max_magnitude):
      raise MiniLangSyntaxError(f"constant at {match.start()} exceeds max_magnitude")
    tokens.append((kind, text))
  return tokens


class _Parser:
  """Recursive-descent parser that emits postfix code as it goes.

  Recursion depth is bounded by `max_depth` nesting levels (4 Python frames per level);
  long flat chains such as x+x+...+x are parsed by loops, not recursion.
  """

  def __init__(self, tokens: list[tuple[str, str]], limits: Limits):
    self._tokens = tokens
    self._position = 0
    self._depth = 0
    self._limits = limits
    self.code: list[tuple[str, int | None]] = []

  def _peek(self) -> str | None:
    if self._position < len(self._tokens):
      return self._tokens[self._position][1]
    return None

  def _take(self, expected: str | None = None) -> tuple[str, str]:
    if self._position >= len(self._tokens):
      raise MiniLangSyntaxError("unexpected end of program")
    token = self._tokens[self._position]
    if expected is not None and token[1] != expected:
      raise MiniLangSyntaxError(f"expected {expected!r}, got {token[1]!r}")
    self._position += 1
    return token

  def parse(self) -> list[tuple[str, int | None]]:
    if not self._tokens:
      raise MiniLangSyntaxError("empty program")
    self._expr()
    if self._position != len(self._tokens):
      raise MiniLangSyntaxError(f"unexpected {self._peek()!r} after the expression")
    return self.code

  def _expr(self) -> None:
    self._term()
    while self._peek() in ("+", "-"):
      op = self._take()[1]
      self._term()
      self.code.append((_BINARY_OPCODES[op], None))

  def _term(self) -> None:
    self._factor()
    while self._peek() in ("*", "//", "%"):
      op = self._take()[1]
      self._factor()
      self.code.append((_BINARY_OPCODES[op], None))

  def _factor(self) -> None:
    self._depth += 1
    if self._depth > self._limits.max_depth:
      raise MiniLangSyntaxError(f"nesting deeper than max_depth={self._limits.max_depth}")
    if self._peek() == "-":
      self._take()
      self._factor()
      self.code.append(("neg", None))
    else:
      self._atom()
    self._depth -= 1

  def _atom(self) -> None:
    kind, text = self._take()
    if kind == "int":
      self.code.append(("const", int(text)))
    elif text == "x":
      self.code.append(("x", None))
    elif text == "(":
      self._expr()
      self._take(")")
    elif kind == "name":
      self._take("(")
      self._expr()
      for _ in range(_FUNCTION_ARITY[text] - 1):
        self._take(",")
        self._expr()
      self._take(")")
      self.code.append((text, None))
    else:
      raise MiniLangSyntaxError(f"unexpected {text!r}")


def compile_program(source: str, *, limits: Limits = Limits()) -> Program:
  """Parses `source` into postfix code.

  Args:
    source: program text, e.g. "2*x + abs(x - 3) // 2".
    limits: resource bounds (`max_length`, `max_depth` and `max_magnitude` apply here).

  Returns:
    The compiled `Program`.

  Raises:
    TypeError: `source` is not a str.
    MiniLangSyntaxError: the source is not a program, or breaks a static limit.
  """
  if not isinstance(source, str):
    raise TypeError(f"source must be a str, got {type(source).__name__}")
  return Program(code=tuple(_Parser(_tokenize(source, limits), limits).parse()), source=source)


def run_program(program: Program, x: int, *, limits: Limits = Limits()) -> int:
  """Runs compiled code on the stack machine with the variable bound to `x`.

  Args:
    program: from `compile_program`.
    x: the input; |x| must not exceed `limits.max_magnitude`.
    limits: resource bounds (`max_steps` and `max_magnitude` apply here).

  Returns:
    The program's value at `x`.

  Raises:
    MiniLangRuntimeError: division or modulo by zero, a value beyond max_magnitude,
      or more than max_steps instructions.
  """
  if abs(x) > limits.max_magnitude:
    raise MiniLangRuntimeError(f"input {x} exceeds max_magnitude")
  stack: list[int] = []
  for step, (opcode, constant) in enumerate(program.code, start=1):
    if step > limits.max_steps:
      raise MiniLangRuntimeError(f"more than max_steps={limits.max_steps} instructions")
    if opcode == "const":
      value = constant
    elif opcode == "x":
      value = x
    elif opcode == "neg":
      value = -stack.pop()
    elif opcode == "abs":
      value = abs(stack.pop())
    else:
      right = stack.pop()
      left = stack.pop()
      if opcode in ("floordiv", "mod") and right == 0:
        raise MiniLangRuntimeError("division by zero")
      if opcode == "add":
        value = left + right
      elif opcode == "sub":
        value = left - right
      elif opcode == "mul":
        value = left * right
      elif opcode == "floordiv":
        value = left // right
      elif opcode == "mod":
        value = left % right
      elif opcode == "min":
        value = min(left, right)
      else:
        value = max(left, right)
    # Both operands are bounded by max_magnitude, so a product is at most its square:
    # cheap to compute exactly before the check.
    if abs(value) > limits.max_magnitude:
      raise MiniLangRuntimeError(f"intermediate value exceeds max_magnitude={limits.max_magnitude}")
    stack.append(value)
  return stack.pop()


def count_passed(
    source: str, inputs: Sequence[int], outputs: Sequence[int], *, limits: Limits = Limits()
) -> int:
  """Number of test cases (inputs[k] -> outputs[k]) that the program `source` passes.

  Never raises on any `source` string: a program that does not compile passes no test,
  and a run that fails (division by zero, overflow, step bound) fails that test only.

  Args:
    source: program text (model output).
    inputs: K test inputs.
    outputs: K expected outputs.
    limits: resource bounds.

  Returns:
    An int in [0, K].
  """
  if len(inputs) != len(outputs):
    raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
  try:
    program = compile_program(source, limits=limits)
  except MiniLangSyntaxError:
    return 0
  passed = 0
  for x, expected in zip(inputs, outputs):
    try:
      passed += run_program(program, int(x), limits=limits) == int(expected)
    except MiniLangRuntimeError:
      continue
  return passed
