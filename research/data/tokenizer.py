"""Trains a byte-level BPE tokenizer on a corpus and loads tokenizers saved in the Hugging Face layout.

Byte-level means every Unicode string (Chinese, emoji, code) encodes without an unknown token and
decodes back exactly.
"""

from __future__ import annotations

import os
from typing import Iterable

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from research.errors import ConfigError, DataError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_NUM_BYTES = 256


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str,
                        special_tokens: tuple[str, ...] = (EOS_TOKEN, PAD_TOKEN),
                        ) -> transformers.PreTrainedTokenizerFast:
  """Trains a byte-level BPE on `texts`, saves it into `out_dir` and returns it.

  The special tokens take ids 0, 1, ... in the order given; the first is EOS (and BOS), the one
  named `<|pad|>` (else the last) is PAD. The result reloads with
  `transformers.AutoTokenizer.from_pretrained(out_dir)`. Training is deterministic: the trainer
  breaks count ties by pair id, and ids follow the sorted byte alphabet.
  """
  special_tokens = tuple(special_tokens)
  if not special_tokens:
    raise ConfigError("special_tokens is empty: give at least an end-of-text token, e.g. "
                      f"({EOS_TOKEN!r}, {PAD_TOKEN!r})")
  min_vocab = _NUM_BYTES + len(special_tokens)
  if vocab_size < min_vocab:
    raise ConfigError(f"vocab_size={vocab_size} is below the {_NUM_BYTES} byte tokens plus "
                      f"{len(special_tokens)} special tokens: set vocab_size >= {min_vocab}")

  bpe = tokenizers.Tokenizer(models.BPE())
  # No normalizer: decoding must give back the exact input text.
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  bpe.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  seen = _CountingIterator(texts)
  bpe.train_from_iterator(seen, trainer)
  if seen.nonempty == 0:
    raise DataError(f"cannot train a tokenizer for {out_dir}: the training texts are empty "
                    "(no documents, or only empty ones); pass a corpus with text in it")

  pad_token = PAD_TOKEN if PAD_TOKEN in special_tokens else special_tokens[-1]
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=bpe, eos_token=special_tokens[0], bos_token=special_tokens[0],
      pad_token=pad_token, clean_up_tokenization_spaces=False)
  os.makedirs(out_dir, exist_ok=True)
  tokenizer.save_pretrained(out_dir)
  if not os.path.isfile(os.path.join(out_dir, "tokenizer_config.json")):
    raise RuntimeError(f"transformers did not write tokenizer_config.json into {out_dir}")
  return tokenizer


def load_tokenizer(path: str) -> transformers.PreTrainedTokenizerBase:
  """Loads a tokenizer saved in the Hugging Face layout, making sure it has EOS and PAD ids.

  A tokenizer without a pad token gets EOS as its pad token (padding is masked out anyway).
  """
  if not os.path.isdir(path):
    raise DataError(f"tokenizer directory {path} does not exist: train one with "
                    "research.data.tokenizer.train_bpe_tokenizer or point to a saved tokenizer")
  if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
    raise DataError(f"tokenizer directory {path} holds none of {', '.join(_TOKENIZER_FILES)}: "
                    "point to the directory that save_pretrained wrote")
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  except (OSError, ValueError) as e:
    raise DataError(f"cannot load the tokenizer in {path}: {e}") from e
  return ensure_special_ids(tokenizer, path)


def ensure_special_ids(tokenizer: transformers.PreTrainedTokenizerBase,
                       name: str = "tokenizer") -> transformers.PreTrainedTokenizerBase:
  """Checks the tokenizer has an EOS id and falls back to EOS for a missing PAD id."""
  if tokenizer.eos_token_id is None:
    raise DataError(f"tokenizer {name} has no eos_token: set eos_token in its "
                    "tokenizer_config.json (packing closes every document with it)")
  if tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer


class _CountingIterator:
  """Passes texts through to the trainer while counting non-empty ones (an iterable may be one-shot)."""

  def __init__(self, texts: Iterable[str]):
    self._texts = iter(texts)
    self.nonempty = 0

  def __iter__(self):
    return self

  def __next__(self) -> str:
    text = next(self._texts)
    if not isinstance(text, str):
      raise DataError(f"tokenizer training texts must be str, got {type(text).__name__}: "
                      "pass the documents read by research.data.corpus.read_corpus")
    if text:
      self.nonempty += 1
    return text
