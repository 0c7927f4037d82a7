"""The prompt stream and the text <-> token batches the runner feeds the sampler and learner."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gmpo_jax.models import tokenization
from gmpo_jax.rollout.backends import Rollout


class PromptStream:
  """Train examples in a seeded order, one permutation per pass; `position` counts prompts."""

  def __init__(self, examples: Sequence[Mapping[str, Any]], *, seed: int, position: int = 0):
    if not len(examples):
      raise ValueError("the train split is empty")
    self._examples = examples
    self._seed = seed
    self.position = position

  def take(self, n: int) -> list[Mapping[str, Any]]:
    out = []
    size = len(self._examples)
    for _ in range(n):
      epoch, index = divmod(self.position, size)
      order = np.random.default_rng([self._seed, epoch]).permutation(size)
      out.append(self._examples[int(order[index])])
      self.position += 1
    return out


def encode_batch(
    texts: Sequence[str], tokenizer: tokenization.Tokenizer, *, add_bos: bool = True
) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded [N, P] token ids and mask (the sampler aligns and buckets them)."""
  ids = [
      ([tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else [])
      + list(tokenizer.encode(t))
      for t in texts
  ]
  width = max(1, max(len(x) for x in ids))
  tokens = np.full((len(ids), width), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(ids), width), bool)
  for i, row in enumerate(ids):
    tokens[i, : len(row)] = row
    mask[i, : len(row)] = True
  return tokens, mask


def decode_completions(
    rollout: Rollout, tokenizer: tokenization.Tokenizer, stop_ids: Sequence[int]
) -> list[str]:
  """The completion text of every row, stop tokens removed."""
  tokens = np.asarray(rollout.tokens)
  mask = np.asarray(rollout.completion_mask)
  stops = set(stop_ids)
  return [
      tokenizer.decode([int(t) for t in row[m] if int(t) not in stops])
      for row, m in zip(tokens, mask)
  ]
