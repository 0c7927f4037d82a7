"""Tokenizers: a built-in character tokenizer and a wrapper of Hugging Face ``tokenizer.json``.

Both follow the `Tokenizer` protocol of docs/CONTRACTS.md. ``encode`` never adds special
tokens (the caller decides where BOS/EOS go) and ``decode`` drops them.
"""

from __future__ import annotations

import json
import os
from typing import Protocol, Sequence, runtime_checkable

import tokenizers


@runtime_checkable
class Tokenizer(Protocol):
  """What the rest of gmpo_jax needs from a tokenizer.

  Attributes:
    vocab_size: number of ids, special tokens included (ids are < vocab_size).
    pad_id: id used for padding.
    bos_id: beginning-of-sequence id, or None when the tokenizer has none (Qwen).
    eos_id: end-of-sequence id (generation stops on it).
  """

  vocab_size: int
  pad_id: int
  bos_id: int | None
  eos_id: int

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


class CharTokenizer:
  """One id per character: printable ASCII and newline, plus pad/bos/eos.

  Ids: 0 = pad, 1 = bos, 2 = eos, 3 = '\\n', then ' ' .. '~' (0x20..0x7E) as 4..98, so
  vocab_size = 99 (fits the 'tiny' model's 128). Deterministic: no state, no file.
  """

  PAD, BOS, EOS = 0, 1, 2
  CHARACTERS = "\n" + "".join(chr(c) for c in range(0x20, 0x7F))

  def __init__(self):
    self._offset = 3
    self._ids = {c: i + self._offset for i, c in enumerate(self.CHARACTERS)}

  @property
  def vocab_size(self) -> int:
    return self._offset + len(self.CHARACTERS)

  @property
  def pad_id(self) -> int:
    return self.PAD

  @property
  def bos_id(self) -> int:
    return self.BOS

  @property
  def eos_id(self) -> int:
    return self.EOS

  def encode(self, text: str) -> list[int]:
    """Character ids, no special tokens.

    Raises:
      ValueError: a character outside printable ASCII + newline (named, with its index).
    """
    try:
      return [self._ids[c] for c in text]
    except KeyError:
      index = next(i for i, c in enumerate(text) if c not in self._ids)
      raise ValueError(
          f"CharTokenizer cannot encode {text[index]!r} at index {index}: only printable ASCII "
          "and newline are in its vocabulary."
      ) from None

  def decode(self, ids: Sequence[int]) -> str:
    """The text of the non-special ids (pad/bos/eos are dropped).

    Raises:
      ValueError: an id outside [0, vocab_size).
    """
    out = []
    for i in ids:
      i = int(i)
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"Id {i} is outside CharTokenizer's vocabulary [0, {self.vocab_size}).")
      if i >= self._offset:
        out.append(self.CHARACTERS[i - self._offset])
    return "".join(out)


def _token_content(value) -> str | None:
  """A special token from tokenizer_config.json: a string, or an AddedToken dict."""
  if isinstance(value, dict):
    return value.get("content")
  return value


class HFTokenizer:
  """A Hugging Face ``tokenizers`` tokenizer (tokenizer.json) with its special tokens."""

  def __init__(
      self, tokenizer: tokenizers.Tokenizer, *, pad_id: int, bos_id: int | None, eos_id: int
  ):
    self._tokenizer = tokenizer
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    for name, value in (("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)):
      if value is not None and not 0 <= value < self.vocab_size:
        raise ValueError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size}).")
    self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

  @classmethod
  def from_file(
      cls,
      path: str | os.PathLike,
      *,
      pad_token: str | None = None,
      bos_token: str | None = None,
      eos_token: str | None = None,
  ) -> HFTokenizer:
    """Loads tokenizer.json; special tokens from the files next to it, or the arguments.

    Special tokens come from the arguments if given, else ``tokenizer_config.json``, else
    ``special_tokens_map.json`` in the same directory. Without a pad token, pad = eos
    (Llama has none; padding is always masked). Without a bos token, bos_id is None.

    Args:
      path: tokenizer.json, or the directory holding it.
      pad_token / bos_token / eos_token: override the special tokens (their strings).

    Returns:
      The tokenizer.

    Raises:
      FileNotFoundError: no tokenizer.json at path (named).
      ValueError: no eos token can be found, or a special token is not in the vocabulary.
    """
    path = os.fspath(path)
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
      raise FileNotFoundError(f"No tokenizer.json at {file!r}.")
    tokenizer = tokenizers.Tokenizer.from_file(file)
    directory = os.path.dirname(file)
    declared = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later file wins
      side_file = os.path.join(directory, name)
      if os.path.isfile(side_file):
        with open(side_file) as f:
          side = json.load(f)
        for key in ("pad_token", "bos_token", "eos_token"):
          if _token_content(side.get(key)) is not None:
            declared[key] = _token_content(side[key])
    explicit = {"pad_token": pad_token, "bos_token": bos_token, "eos_token": eos_token}
    declared.update({k: v for k, v in explicit.items() if v is not None})

    def token_id(key: str) -> int | None:
      if key not in declared:
        return None
      token = declared[key]
      token_id = tokenizer.token_to_id(token)
      if token_id is None:
        raise ValueError(f"{key} {token!r} of {file!r} is not in its vocabulary.")
      return token_id

    eos_id = token_id("eos_token")
    if eos_id is None:
      raise ValueError(
          f"No eos token for {file!r}: none in tokenizer_config.json / special_tokens_map.json; "
          "pass eos_token=..."
      )
    pad_id = token_id("pad_token")
    return cls(
        tokenizer,
        pad_id=eos_id if pad_id is None else pad_id,
        bos_id=token_id("bos_token"),
        eos_id=eos_id,
    )

  def encode(self, text: str) -> list[int]:
    """Token ids of text, without the special tokens a post-processor would add."""
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    """The text of ids, special tokens dropped."""
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(path_or_name: str | os.PathLike) -> Tokenizer:
  """'char' → `CharTokenizer`; a tokenizer.json file or a directory holding one → `HFTokenizer`.

  Raises:
    ValueError: neither 'char' nor an existing path (no hub access).
  """
  if path_or_name == "char":
    return CharTokenizer()
  if os.path.exists(path_or_name):
    return HFTokenizer.from_file(path_or_name)
  raise ValueError(
      f"Unknown tokenizer {path_or_name!r}: use 'char' or a local tokenizer.json / directory."
  )
