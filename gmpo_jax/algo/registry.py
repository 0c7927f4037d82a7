"""Functions by name: filled by a decorator while their module imports, read-only after.

`advantages.ADVANTAGE_ESTIMATORS` and `losses.POLICY_LOSSES` are registries. A function
enters one where it is defined (`@ADVANTAGE_ESTIMATORS.register('gmpo')`), so the name
sits next to the code; the defining module calls `freeze()` at its end, and from then on
the registry is an immutable `Mapping` (a late `register` raises). `bind` is the one
lookup the runner uses: it binds a function's keyword-only hyperparameters by name and
rejects unknown or missing ones with the valid names in the message.
"""

import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

F = TypeVar('F', bound=Callable)


class Registry(Mapping[str, F], Generic[F]):
  """An immutable-once-frozen mapping from names to functions of one kind.

  Args:
    kind: what the functions are, for error messages ('advantage estimator').
    per_call: keyword-only arguments that change with every call (per-batch data),
      so `bind` neither accepts nor requires them.
  """

  def __init__(self, kind: str, *, per_call: frozenset[str] = frozenset()):
    self._kind = kind
    self._per_call = per_call
    self._functions: dict[str, F] = {}
    self._frozen = False

  def register(self, name: str) -> Callable[[F], F]:
    """Decorator: registers the function under `name` and returns it unchanged."""

    def decorate(fn: F) -> F:
      if self._frozen:
        raise RuntimeError(
            f'the {self._kind} registry is frozen once its module has imported; '
            f'{name!r} cannot be added'
        )
      if name in self._functions:
        raise ValueError(f'{self._kind} {name!r} is registered twice')
      self._functions[name] = fn
      return fn

    return decorate

  def freeze(self) -> None:
    self._frozen = True

  def __getitem__(self, name: str) -> F:
    return self._functions[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._functions)

  def __len__(self) -> int:
    return len(self._functions)

  def __repr__(self) -> str:
    return f'Registry({self._kind!r}, {sorted(self._functions)})'

  def bind(self, name: str, **hyperparameters) -> Callable:
    """`functools.partial(self[name], **hyperparameters)`, checked.

    Raises:
      ValueError: unknown name; a hyperparameter the function does not take (per-call
        arguments included); a required keyword-only one missing. Each message lists the
        valid names.
    """
    if name not in self._functions:
      raise ValueError(f'Unknown {self._kind} {name!r}; valid names: {sorted(self)}.')
    fn = self._functions[name]
    options = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in self._per_call
    ]
    accepted = [p.name for p in options]
    unknown = sorted(set(hyperparameters) - set(accepted))
    if unknown:
      raise ValueError(
          f'{self._kind} {name!r} takes no hyperparameter(s) {unknown}; '
          f'valid: {accepted or "none"}.'
      )
    missing = [
        p.name
        for p in options
        if p.default is inspect.Parameter.empty and p.name not in hyperparameters
    ]
    if missing:
      raise ValueError(f'{self._kind} {name!r} needs hyperparameter(s) {missing}.')
    return functools.partial(fn, **hyperparameters)
