"""Tests for the decode loop of gmpo_jax.rollout.sampling: k steps per finish check and the cache
read window by window give the same outputs, stop early, select one program each, and write the
KV cache in place."""

import contextlib
import dataclasses
import re

import jax
import numpy as np
import pytest
from flax import nnx
from model_fixtures import CONTEXT_CONFIG as _CONFIG
from model_fixtures import context_model as _model

from gmpo_jax.rollout import sampling

N = 14  # (N − 1) mod k is 1, 5, 0 and 13 for k = 3, 8, 13, 20: every loop shape occurs.
STEPS_PER_CHECK = (3, 8, 13, 20)


def _random_prompts(batch=8, width=7, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, _CONFIG.vocab_size, (batch, width)).astype(np.int32)
  lengths = rng.integers(1, width + 1, batch)
  mask = np.arange(width)[None, :] < lengths[:, None]
  return tokens, mask


def _eos_with_varied_stops(free_tokens):
  """The token whose first occurrences fall at the most distinct steps, absent from a row."""
  best, best_score = None, -1
  for token in range(_CONFIG.vocab_size):
    hits = free_tokens == token
    if hits.all(axis=1).any() or hits.any(axis=1).all():
      continue  # every row would stop: no row would run to N
    firsts = {int(np.argmax(row)) for row in hits if row.any()}
    if len(firsts) > best_score:
      best, best_score = token, len(firsts)
  return best


@contextlib.contextmanager
def _counting_choices():
  """Counts the token choices the compiled decode program makes (one per executed step)."""
  calls = []
  original = sampling._choose

  def counted(*args):
    jax.debug.callback(lambda: calls.append(1))
    return original(*args)

  # The jit cache ignores module globals: drop the programs traced without the callback.
  sampling._generate_bucketed.clear_cache()
  sampling._choose = counted
  try:
    yield calls
  finally:
    sampling._choose = original
    sampling._generate_bucketed.clear_cache()


@pytest.mark.parametrize('temperature', [0.0, 1.0], ids=['greedy', 'sampled'])
def test_outputs_are_bit_identical_for_every_steps_per_check(temperature):
  model = _model()
  tokens, mask = _random_prompts()
  base = sampling.SamplingConfig(
      max_new_tokens=N, temperature=temperature, pad_id=3, steps_per_check=1
  )
  free = sampling.generate(model, tokens, mask, jax.random.key(1), config=base)
  config = dataclasses.replace(
      base, eos_id=_eos_with_varied_stops(np.asarray(free.completion_tokens))
  )
  want = sampling.generate(model, tokens, mask, jax.random.key(1), config=config)
  lengths = np.asarray(want.lengths)
  # The test means something only if rows stop at several steps and one runs to N.
  assert len(set(lengths.tolist())) >= 3 and want.finished.any() and not want.finished.all()
  for k in STEPS_PER_CHECK:
    got = sampling.generate(
        model,
        tokens,
        mask,
        jax.random.key(1),
        config=dataclasses.replace(config, steps_per_check=k),
    )
    for name, value in want._asdict().items():
      np.testing.assert_array_equal(getattr(got, name), value, err_msg=f'k={k} {name}')


@pytest.mark.parametrize('bucket,k', [(1, 1), (4, 1), (5, 3), (None, 3)])
def test_outputs_do_not_depend_on_the_cache_read_bucket(bucket, k):
  """Reading the cache window by window attends to the same slots as reading all of them."""
  model = _model()
  tokens, mask = _random_prompts(seed=2)
  config = sampling.SamplingConfig(
      max_new_tokens=N, pad_id=3, steps_per_check=k, cache_read_bucket=None
  )
  want = sampling.generate(model, tokens, mask, jax.random.key(4), config=config)
  got = sampling.generate(
      model,
      tokens,
      mask,
      jax.random.key(4),
      config=dataclasses.replace(config, cache_read_bucket=bucket),
  )
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.completion_mask, want.completion_mask)
  np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-6)


def test_read_windows():
  assert sampling.read_windows(16, 14, None) == (30,)
  assert sampling.read_windows(16, 14, 5) == (21, 26, 30)
  assert sampling.read_windows(16, 14, 14) == (30,)
  assert sampling.read_windows(16, 14, 100) == (30,)
  with pytest.raises(ValueError, match='cache_read_bucket'):
    sampling.SamplingConfig(max_new_tokens=4, cache_read_bucket=0)


@pytest.mark.parametrize('k', [1, 3, 8])
def test_decoding_stops_within_k_steps_of_the_last_row_stopping(k):
  model = _model()
  tokens, mask = _random_prompts(seed=1)
  # Half the vocabulary ends a completion: every row stops within a few steps.
  config = sampling.SamplingConfig(max_new_tokens=30, stop_ids=tuple(range(25)), steps_per_check=k)
  with _counting_choices() as calls:
    out = sampling.generate(model, tokens, mask, jax.random.key(0), config=config)
    jax.effects_barrier()
  longest = int(np.max(out.lengths))
  assert out.finished.all() and longest <= 30 - 10
  # One choice after the prefill, one per decode step; the last check can come k − 1 late.
  assert longest <= len(calls) <= longest + k - 1, (len(calls), longest)
  if k == 1:
    assert len(calls) == longest


def test_default_steps_per_check_by_backend():
  assert [sampling.default_steps_per_check(b) for b in ('cpu', 'gpu', 'cuda', 'rocm', 'tpu')] == [
      1,
      8,
      8,
      8,
      1,
  ]
  assert sampling.default_steps_per_check() == sampling.default_steps_per_check(
      jax.default_backend()
  )


@pytest.mark.parametrize('value', [0, -2, 2.0, True])
def test_bad_steps_per_check(value):
  with pytest.raises(ValueError, match='steps_per_check'):
    sampling.SamplingConfig(max_new_tokens=4, steps_per_check=value)


def test_one_compile_per_steps_per_check_and_none_per_step(backend_compiles):
  model = _model()
  tokens, mask = _random_prompts(batch=3, width=5, seed=2)
  base = sampling.SamplingConfig(max_new_tokens=11, steps_per_check=4)
  configs = [
      base,
      dataclasses.replace(base, eos_id=7, temperature=0.0),
      dataclasses.replace(base, steps_per_check=5),
  ]
  counts = []
  for config in configs:
    sampling.generate(model, tokens, mask, jax.random.key(0), config=config)
    counts.append(sum('_generate_bucketed' in name for name in backend_compiles))
  # The N − 1 steps run inside one program; other knobs reuse it, another k is another one.
  assert counts[0] <= 1 and [c - counts[0] for c in counts] == [0, 0, 1]


def _computations(hlo_text):
  """{name: body lines} of an HLO module's text."""
  computations, name = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r'^(?:ENTRY )?%(\S+) .*\{$', line)
    if header:
      name = header.group(1)
      computations[name] = []
    elif name is not None:
      computations[name].append(line)
  return computations


def _reachable(computations, root):
  seen, todo = set(), [root]
  while todo:
    name = todo.pop()
    if name not in seen:
      seen.add(name)
      todo += [
          callee
          for line in computations[name]
          for callee in re.findall(r'%([\w.\-]+)', line)
          if callee in computations
      ]
  return seen


@pytest.mark.parametrize('k,bucket', [(1, None), (3, None), (1, 2)])
def test_decode_loop_writes_the_kv_cache_in_place(k, bucket):
  model = _model()
  graphdef, state = nnx.split(model)
  batch, prompt, new = 8, 16, 6
  knobs = sampling._Knobs(
      inverse_temperature=np.float32(1.0),
      greedy=np.bool_(False),
      top_k=np.int32(0),
      top_p=np.float32(1.0),
      is_stop=np.zeros(_CONFIG.vocab_size, bool),
      pad_id=np.int32(0),
  )
  compiled = sampling._generate_bucketed.lower(
      graphdef,
      state,
      np.zeros((batch, prompt), np.int32),
      np.ones((batch, prompt), bool),
      jax.random.key(0),
      knobs,
      max_new_tokens=new,
      cache_dtype=None,
      steps_per_check=k,
      cache_read_bucket=bucket,
  ).compile()
  computations = _computations(compiled.as_text())
  cache = re.escape(
      f'[{_CONFIG.num_layers},{batch},{_CONFIG.num_kv_heads},{prompt + new},' f'{_CONFIG.head_dim}]'
  )  # the K or V buffer's shape, any dtype
  # The decode loops are the while loops whose trip count XLA cannot know (it stops on the
  # data); the layer scans and the k-step inner loop have a known trip count.
  decode_bodies = [
      re.search(r'body=%([\w.\-]+)', line).group(1)
      for lines in computations.values()
      for line in lines
      if ' while(' in line and 'known_trip_count' not in line
  ]
  windows = sampling.read_windows(prompt, new, bucket)
  assert len(decode_bodies) == len(windows) + (0 if (new - 1) % k == 0 else 1)
  for body in decode_bodies:
    lines = [line for name in _reachable(computations, body) for line in computations[name]]
    writes = [
        line
        for line in lines
        if re.search(rf'= [a-z0-9]+{cache}\{{[^}}]*\}} (fusion|dynamic-update-slice)\(', line)
    ]
    copies = [line for line in lines if re.search(rf'= [a-z0-9]+{cache}\{{[^}}]*\}} copy\(', line)]
    assert writes, 'no update of a K/V buffer found: the check would be vacuous'
    assert not copies, copies
