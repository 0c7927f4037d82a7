"""The persistent compilation cache and the compile-time measurement."""

import platform
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import pytest

from gmpo_jax.infra import compilation

DURATION_EVENT = "/jax/core/compile/backend_compile_duration"


def test_compile_time_is_the_union_of_the_spans_within_the_window():
  timer = compilation.CompileTimer()
  for start, end in [(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.2, 5.4)]:
    timer._record(DURATION_EVENT, start, end)
  timer._record("/jax/some/other_event", 3.0, 5.0)  # not a compile phase
  assert timer.seconds(0.0, 10.0) == pytest.approx(4.0)
  assert timer.seconds(1.5, 5.5) == pytest.approx(1.5 + 0.5)
  # The spans that end before a window's start are gone: (0, 2) and (1, 3) end before 4.
  assert timer.seconds(4.0, 10.0) == pytest.approx(1.0)
  assert timer.seconds(0.0, 10.0) == pytest.approx(1.0)


def test_compile_time_of_a_fresh_program_with_a_nested_jit():
  inner = jax.jit(lambda y: jnp.sin(y) * 3.0)
  outer = jax.jit(lambda x: inner(x) + jnp.cos(x).sum())
  with compilation.CompileTimer() as timer:
    start = time.time()
    outer(jnp.arange(7.0)).block_until_ready()
    first = timer.seconds(start)
    wall = time.time() - start
    again = time.time()
    outer(jnp.arange(7.0)).block_until_ready()  # cached in memory: nothing is compiled
    assert timer.seconds(again) == 0.0
  assert 0 < first <= wall


def test_a_second_process_reads_the_programs_the_first_compiled(tmp_path):
  script = textwrap.dedent(f"""
      import jax, jax.numpy as jnp
      from jax import monitoring
      from gmpo_jax.infra import compilation
      hits = []
      monitoring.register_event_listener(
          lambda event, **_: hits.append(1) if event.endswith("cache_hits") else None)
      compilation.enable_persistent_cache({str(tmp_path / "cache")!r})
      jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((5, 5))).block_until_ready()
      print("hits", len(hits))
      """)
  first, second = [
      int(
          subprocess.run(
              [sys.executable, "-c", script], capture_output=True, text=True, check=True
          ).stdout.split()[-1]
      )
      for _ in range(2)
  ]
  # The jitted function and the eager `ones` each hit in the second process, none in the first.
  assert first == 0 and second >= 2
  assert list((tmp_path / "cache").iterdir())


def test_the_heap_is_trimmed_after_each_backend_compile_and_only_inside_the_block():
  calls = []
  with compilation.HeapTrimmer(trim=calls.append):
    jax.jit(lambda x: jnp.sinh(x) * 5.0 + 1.0)(jnp.arange(3.0)).block_until_ready()
    assert calls and all(pad == 0 for pad in calls)
  count = len(calls)
  jax.jit(lambda x: jnp.cosh(x) * 7.0 - 2.0)(jnp.arange(3.0)).block_until_ready()
  assert len(calls) == count  # the listener is gone after the block


def test_the_heap_trimmer_finds_malloc_trim_exactly_on_glibc():
  trim = compilation._malloc_trim()  # pylint: disable=protected-access
  if platform.libc_ver()[0] == "glibc":
    assert trim is not None and trim(0) in (0, 1)  # 1: memory was released
  else:
    assert trim is None
