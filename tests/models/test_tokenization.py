"""Tests for gmpo_jax.models.tokenization: CharTokenizer and HFTokenizer on a tokenizer.json the test
trains itself with the `tokenizers` library (no hub)."""

import json
import string

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from gmpo_jax.models import tokenization
from gmpo_jax.models.transformer import TransformerConfig

SPECIALS = ["<pad>", "<s>", "</s>", "<unused>"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "12 + 30 = 42",
    "def f(x):\n  return x",
    "Ünïcödé text, émojis 🙂 and tabs\tare bytes too",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  """A byte-level BPE tokenizer.json with a BOS-adding post-processor, and a
  tokenizer_config.json declaring its specials (eos as an AddedToken dict)."""
  directory = tmp_path_factory.mktemp("tok")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  tok.train_from_iterator(CORPUS * 5, trainer)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(
      json.dumps(
          {
              "bos_token": "<s>",
              "pad_token": "<pad>",
              "eos_token": {"content": "</s>", "lstrip": False, "rstrip": False, "special": True},
          }
      )
  )
  return directory


class TestCharTokenizer:

  def test_ids_are_fixed_and_fit_the_tiny_model(self):
    tok = tokenization.CharTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 99 <= TransformerConfig.from_name("tiny").vocab_size
    assert tok.encode("\n ~a") == [3, 4, 98, 4 + ord("a") - 0x20]
    assert isinstance(tok, tokenization.Tokenizer)

  def test_roundtrip_random_text(self):
    tok = tokenization.CharTokenizer()
    alphabet = np.array(
        list(
            string.printable.replace("\t", "")
            .replace("\r", "")
            .replace("\x0b", "")
            .replace("\x0c", "")
        )
    )
    rng = np.random.default_rng(0)
    for _ in range(20):
      text = "".join(rng.choice(alphabet, rng.integers(0, 40)))
      ids = tok.encode(text)
      assert all(3 <= i < tok.vocab_size for i in ids)
      assert tok.decode(ids) == text
      # Specials are dropped wherever they sit.
      assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id, tok.pad_id]) == text

  def test_bad_inputs_are_errors(self):
    tok = tokenization.CharTokenizer()
    with pytest.raises(ValueError, match="'é' at index 2"):
      tok.encode("caé")
    with pytest.raises(ValueError, match="outside"):
      tok.decode([5, 99])


class TestHFTokenizer:

  def test_special_tokens_from_tokenizer_config(self, tokenizer_dir):
    tok = tokenization.HFTokenizer.from_file(tokenizer_dir / "tokenizer.json")
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 300
    assert isinstance(tok, tokenization.Tokenizer)

  def test_roundtrip_and_no_special_tokens_added(self, tokenizer_dir):
    tok = tokenization.load_tokenizer(str(tokenizer_dir))
    raw = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    for text in CORPUS + ["unseen words, 7 * 6 = 42\n"]:
      ids = tok.encode(text)
      assert ids == raw.encode(text).ids[1:]  # the post-processor's <s> is not added
      assert tok.bos_id not in ids
      assert tok.decode(ids) == text
      assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text

  def test_fallbacks_and_overrides(self, tokenizer_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text((tokenizer_dir / "tokenizer.json").read_text())
    with pytest.raises(ValueError, match="No eos token"):
      tokenization.HFTokenizer.from_file(tmp_path)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    tok = tokenization.HFTokenizer.from_file(tmp_path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (2, None, 2)  # pad falls back to eos
    tok = tokenization.HFTokenizer.from_file(tmp_path, pad_token="<unused>", bos_token="<s>")
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (3, 1, 2)
    with pytest.raises(ValueError, match="not in its vocabulary"):
      tokenization.HFTokenizer.from_file(tmp_path, eos_token="<|im_end|>")


def test_load_tokenizer_dispatch_and_errors(tmp_path):
  assert isinstance(tokenization.load_tokenizer("char"), tokenization.CharTokenizer)
  with pytest.raises(ValueError, match="Unknown tokenizer 'gpt2'"):
    tokenization.load_tokenizer("gpt2")
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    tokenization.load_tokenizer(str(tmp_path))
