"""Compiled programs: the persistent cache that lets a second run skip XLA, and compile time.

`enable_persistent_cache(directory)` keeps every compiled program of the process on disk (JAX's
persistent compilation cache, keyed by the program, its devices, flags and the JAX version), so
the next run with the same shapes loads them instead of compiling: the default run's first RL
step then costs what a later step costs plus the cache reads. `CompileTimer` measures the wall
time a process spends making programs (tracing, lowering to StableHLO, and compiling or reading
them from the cache), from the events JAX records around each of these phases. `HeapTrimmer`
hands the memory the compiler freed back to the operating system after every compile, and
`learner_compiler_options` compiles the learner's programs with less memory on the CPU.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time

import jax
from jax import monitoring

# The phases of making a program, each recorded by JAX as a time span. A `jax.jit` called while
# another function is traced records its own span inside the outer one; the timer counts the
# union of the spans, so nothing is counted twice.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # XLA, or the cache read
COMPILE_EVENTS = frozenset(
    {
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        BACKEND_COMPILE_EVENT,
    }
)


def learner_compiler_options(backend: str | None = None) -> dict[str, bool] | None:
  """XLA options for the learner's programs (the update and its rescoring forward pass).

  On the CPU, without XLA's MLIR fusion emitters: compiling the update of the 3.3M-parameter
  Llama of `benchmarks/e2e_peer.py` then takes 62 instead of 247 MiB above the resident set,
  the run's peak, at the same speed (0.99-1.01x, measured in one process) and with the same
  parameters after a step, bit for bit. The sampler keeps the emitters: its decode loop ran
  1.12x slower without them, and its compile peak is lower.

  Args:
    backend: `jax.default_backend()` when None.

  Returns:
    `jax.jit`'s `compiler_options` on 'cpu'; None (XLA's defaults) elsewhere.
  """
  backend = jax.default_backend() if backend is None else backend
  return {"xla_cpu_use_fusion_emitters": False} if backend == "cpu" else None


def enable_persistent_cache(directory: str | os.PathLike[str]) -> str:
  """Caches every compiled program of this process under `directory` (created if missing).

  Call it before the first compilation. All programs are cached, however fast they compiled
  (JAX's default skips those under a second, and a run has dozens of small ones); entries are
  shared by every run that uses the same directory.

  Returns:
    The directory, with `~` expanded.
  """
  directory = os.path.expanduser(os.fspath(directory))
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory


class CompileTimer:
  """Seconds of wall time spent making programs, within a window of `time.time()`.

  Use it as a context manager: it listens to JAX's compile events inside the `with` block and
  keeps only the spans that a later window can still overlap.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._spans: list[tuple[float, float]] = []

  def __enter__(self) -> CompileTimer:
    monitoring.register_event_time_span_listener(self._record)
    return self

  def __exit__(self, *_) -> None:
    monitoring.unregister_event_time_span_listener(self._record)

  def _record(self, event: str, start: float, end: float, **_) -> None:
    if event in COMPILE_EVENTS:
      with self._lock:
        self._spans.append((start, end))

  def seconds(self, since: float, until: float | None = None) -> float:
    """The length of the union of the recorded spans within [since, until] (until: now).

    Spans that end before `since` are dropped: a window never reaches back before the previous
    one's start.
    """
    until = time.time() if until is None else until
    with self._lock:
      self._spans = [span for span in self._spans if span[1] > since]
      spans = sorted((max(start, since), min(end, until)) for start, end in self._spans)
    total, reach = 0.0, since
    for start, end in spans:
      if end > reach:
        total += end - max(start, reach)
        reach = end
    return total


def _malloc_trim():
  """glibc's `malloc_trim`, or None where the C library has none (macOS, musl)."""
  try:
    return ctypes.CDLL(None).malloc_trim
  except (OSError, AttributeError):
    return None


class HeapTrimmer:
  """Returns the heap memory freed by each XLA compile to the operating system (glibc only).

  XLA:CPU compiles through LLVM, whose many small allocations glibc keeps in its arenas once
  freed, so the resident memory of a run carries every compile's peak into the first execution
  of the program it made. `malloc_trim(0)` after each backend compile releases those pages: on
  `benchmarks/e2e_peer.py` the peak RSS of a 6-step run fell from 1159 to 893 MiB (the first update's ~300 MiB
  of activations no longer sit on top of freed compiler memory). A context manager like
  `CompileTimer`; a no-op where the C library has no `malloc_trim`.
  """

  def __init__(self, trim=None):
    self._trim = _malloc_trim() if trim is None else trim

  def __enter__(self) -> HeapTrimmer:
    if self._trim is not None:
      monitoring.register_event_time_span_listener(self._record)
    return self

  def __exit__(self, *_) -> None:
    if self._trim is not None:
      monitoring.unregister_event_time_span_listener(self._record)

  def _record(self, event: str, start: float, end: float, **_) -> None:
    del start, end
    if event == BACKEND_COMPILE_EVENT:
      self._trim(0)
