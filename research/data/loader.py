"""Turns corpus documents into pretraining rows and feeds them: tokenize, split, pack, iterate.

`BatchIterator` yields each process its slice of deterministic, resumable global batches;
`eval_batches` gives fixed, statically shaped held-out batches.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import transformers

from research.data.packing import num_rows, pack_documents
from research.errors import ConfigError, DataError

Rows = dict[str, np.ndarray]


def tokenize_corpus(texts: Sequence[str], tokenizer: transformers.PreTrainedTokenizerBase,
                    batch_size: int = 1000) -> list[np.ndarray]:
  """Encodes each document to an int32 id array with no special tokens (packing adds EOS).

  Batches of `batch_size` documents go through the tokenizer's batch encoding; a fast tokenizer
  spreads each batch over its own threads.
  """
  token_arrays = []
  for start in range(0, len(texts), batch_size):
    # verbose=False: documents longer than model_max_length are fine, packing cuts them.
    ids = tokenizer(list(texts[start:start + batch_size]), add_special_tokens=False,
                    return_attention_mask=False, verbose=False)["input_ids"]
    token_arrays.extend(np.asarray(x, np.int32) for x in ids)
  return token_arrays


def holdout_split(items: Sequence, eval_fraction: float | None = None,
                  eval_count: int | None = None, seed: int = 0,
                  what: str = "the data", unit: str = "item", fold: int = 0,
                  ) -> tuple[list, list]:
  """Holds out whole items (documents, records) for eval before tokenization, so none has text on
  both sides: `eval_count` of them, or `max(1, round(eval_fraction * n))` (none for 0), picked at
  random from `seed`; give at most one of the two. Both parts keep the input order.

  `fold` i holds out the i-th block of that many items of the seeded permutation (fold 0 is the
  first block), so folds 0..k-1 are disjoint and, with k * eval_count = n, k-fold
  cross-validation."""
  if eval_fraction is not None and eval_count is not None:
    raise ConfigError("give eval_fraction or eval_count, not both")
  n = len(items)
  if eval_count is not None:
    if eval_count < 0:
      raise ConfigError(f"eval_count={eval_count} must be >= 0")
    num_eval = eval_count
  else:
    fraction = eval_fraction or 0.0
    if not 0.0 <= fraction < 1.0:
      raise ConfigError(f"eval_fraction={fraction} must lie in [0, 1)")
    num_eval = max(1, round(fraction * n)) if fraction > 0 else 0
  if fold < 0:
    raise ConfigError(f"eval_fold={fold} must be >= 0")
  if num_eval == 0:
    if fold:
      raise ConfigError(f"eval_fold={fold} with no held-out {unit}s: set eval_count")
    return list(items), []
  if num_eval >= n:
    raise DataError(f"{what} has {n} {unit}(s): too few to hold out {num_eval} for eval and "
                    f"still train; add {unit}s or lower eval_fraction/eval_count (0: no eval)")
  if (fold + 1) * num_eval > n:
    raise DataError(f"{what} has {n} {unit}(s): eval_fold={fold} holds out {unit}s "
                    f"{fold * num_eval + 1}..{(fold + 1) * num_eval} of its shuffled order; with "
                    f"eval_count={num_eval} the folds are 0..{n // num_eval - 1}")
  is_eval = np.zeros(n, bool)
  is_eval[np.random.default_rng(seed).permutation(n)[fold * num_eval:(fold + 1) * num_eval]] = True
  return ([x for x, e in zip(items, is_eval) if not e],
          [x for x, e in zip(items, is_eval) if e])


def split_train_eval(documents: Sequence, eval_fraction: float,
                     seed: int) -> tuple[list, list]:
  """Holds out whole documents before packing (see `holdout_split`)."""
  return holdout_split(documents, eval_fraction, None, seed, "the corpus", "document")


def pretraining_rows(texts: Sequence[str], tokenizer: transformers.PreTrainedTokenizerBase,
                     seq_len: int, eval_fraction: float, seed: int) -> tuple[Rows, Rows]:
  """Corpus documents -> packed `(train_rows, eval_rows)`, split by document before packing."""
  if tokenizer.eos_token_id is None:
    raise DataError("the tokenizer has no eos_token: load it with "
                    "research.data.tokenizer.load_tokenizer")
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  train_docs, eval_docs = split_train_eval(tokenize_corpus(texts, tokenizer), eval_fraction, seed)
  pack = lambda docs: pack_documents(docs, seq_len, tokenizer.eos_token_id, pad_id)  # noqa: E731
  return pack(train_docs), pack(eval_docs)


class BatchIterator:
  """Endless, deterministic, resumable global batches of packed rows, sliced per process.

  Epoch `e` visits the rows in the order `np.random.default_rng([seed, e]).permutation(n_rows)`,
  cut into `n_rows // global_batch` batches (the remainder of each epoch is dropped). `position`
  counts the batches produced so far; a new iterator built with `start_position=position`
  yields exactly the batches the old one would have yielded next. Process `i` of `p` gets rows
  `[i * global_batch // p, (i + 1) * global_batch // p)` of every global batch, so the
  processes' slices in process order concatenate to the global batch.
  """

  def __init__(self, rows: Rows, global_batch: int, seed: int, start_position: int = 0,
               process_index: int = 0, process_count: int = 1):
    n_rows = num_rows(rows)
    if global_batch < 1 or global_batch % process_count:
      raise ConfigError(f"global_batch={global_batch} must be a positive multiple of "
                        f"process_count={process_count}")
    if not 0 <= process_index < process_count:
      raise ConfigError(f"process_index={process_index} must lie in [0, {process_count})")
    if start_position < 0:
      raise ConfigError(f"start_position={start_position} must be >= 0")
    if n_rows < global_batch:
      shape = next(iter(rows.values())).shape
      raise DataError(f"the training data makes {n_rows} rows of shape {shape[1:]}, fewer than "
                      f"global_batch={global_batch}: lower train.global_batch (or seq_len), or "
                      "add data")
    self._rows = rows
    self._n_rows = n_rows
    self.global_batch = global_batch
    self.seed = seed
    self.position = start_position
    self.batches_per_epoch = n_rows // global_batch
    per_process = global_batch // process_count
    self._local = slice(process_index * per_process, (process_index + 1) * per_process)
    self._order_epoch = -1
    self._order = np.empty(0, np.int64)

  @property
  def epoch(self) -> int:
    """The epoch the next batch comes from."""
    return self.position // self.batches_per_epoch

  def _epoch_order(self, epoch: int) -> np.ndarray:
    if epoch != self._order_epoch:
      self._order = np.random.default_rng([self.seed, epoch]).permutation(self._n_rows)
      self._order_epoch = epoch
    return self._order

  def __iter__(self) -> Iterator[Rows]:
    return self

  def __next__(self) -> Rows:
    epoch, step = divmod(self.position, self.batches_per_epoch)
    start = step * self.global_batch
    batch_rows = self._epoch_order(epoch)[start:start + self.global_batch][self._local]
    batch = {k: v[batch_rows] for k, v in self._rows.items()}
    self.position += 1
    return batch

  def state_dict(self) -> dict[str, int]:
    """What a checkpoint stores to resume: pass `position` back as `start_position`."""
    return {"position": self.position, "seed": self.seed, "global_batch": self.global_batch}


def eval_batches(rows: Rows, batch_size: int) -> list[Rows]:
  """Fixed eval batches in row order; the last one is filled up with all-zero rows (loss_mask 0,
  or `valid` False for other stages' rows) so every batch has the static shape `[batch_size, ...]`."""
  if batch_size < 1:
    raise ConfigError(f"eval batch_size={batch_size} must be positive")
  n_rows = num_rows(rows)
  batches = []
  for start in range(0, n_rows, batch_size):
    batch = {k: v[start:start + batch_size] for k, v in rows.items()}
    missing = batch_size - len(next(iter(batch.values())))
    if missing:
      filler = {k: np.zeros((missing, *v.shape[1:]), v.dtype) for k, v in batch.items()}
      batch = {k: np.concatenate([batch[k], filler[k]]) for k in batch}
    batches.append(batch)
  return batches
