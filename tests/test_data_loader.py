"""BatchIterator (determinism, resume, per-process slices), eval batches, the document split, tokenizing."""

import itertools

import numpy as np
import pytest

from research.data.loader import (BatchIterator, eval_batches, pretraining_rows,
                                  split_train_eval, tokenize_corpus)
from research.data.packing import BATCH_KEYS, pack_documents
from research.data.tokenizer import train_bpe_tokenizer
from research.errors import ConfigError, DataError


def make_rows(num_docs=60, seq_len=8, seed=0):
  rng = np.random.default_rng(seed)
  docs = [rng.integers(3, 100, size=rng.integers(1, 20)) for _ in range(num_docs)]
  return pack_documents(docs, seq_len, eos_id=2, pad_id=1)


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def assert_batches_equal(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert set(g) == set(BATCH_KEYS)
    for k in BATCH_KEYS:
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def test_same_seed_same_batches_other_seed_differs():
  rows = make_rows()
  a = take(BatchIterator(rows, 4, seed=3), 10)
  assert_batches_equal(a, take(BatchIterator(rows, 4, seed=3), 10))
  b = take(BatchIterator(rows, 4, seed=4), 10)
  assert any((x["inputs"] != y["inputs"]).any() for x, y in zip(a, b))


def test_epoch_order_is_the_documented_permutation():
  rows = make_rows()
  n_rows = rows["inputs"].shape[0]
  iterator = BatchIterator(rows, 4, seed=5)
  per_epoch = n_rows // 4
  batches = take(iterator, 2 * per_epoch + 1)
  for epoch in range(2):
    order = np.random.default_rng([5, epoch]).permutation(n_rows)[:per_epoch * 4]
    got = np.concatenate([b["inputs"] for b in batches[epoch * per_epoch:(epoch + 1) * per_epoch]])
    np.testing.assert_array_equal(got, rows["inputs"][order])
  assert iterator.position == 2 * per_epoch + 1 and iterator.epoch == 2


def test_resume_from_position_gives_the_same_next_batches():
  rows = make_rows()
  running = BatchIterator(rows, 4, seed=1)
  take(running, 5)
  state = running.state_dict()
  assert state["position"] == 5
  resumed = BatchIterator(rows, 4, seed=1, start_position=state["position"])
  assert running.batches_per_epoch < 25  # so the 20 batches below cross an epoch boundary
  assert_batches_equal(take(resumed, 20), take(running, 20))


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(process_count):
  rows = make_rows()
  whole = take(BatchIterator(rows, 8, seed=2), 12)
  parts = [take(BatchIterator(rows, 8, seed=2, process_index=i, process_count=process_count), 12)
           for i in range(process_count)]
  for step, batch in enumerate(whole):
    for k in BATCH_KEYS:
      local = [parts[i][step][k] for i in range(process_count)]
      assert all(x.shape[0] == 8 // process_count for x in local)
      np.testing.assert_array_equal(np.concatenate(local), batch[k])


def test_iterator_errors():
  rows = make_rows(num_docs=4)
  with pytest.raises(DataError, match="fewer than global_batch=64"):
    BatchIterator(rows, 64, seed=0)
  with pytest.raises(ConfigError, match="multiple of process_count"):
    BatchIterator(rows, 3, seed=0, process_count=2)
  with pytest.raises(ConfigError, match="process_index"):
    BatchIterator(rows, 2, seed=0, process_index=2, process_count=2)


def test_eval_batches_pad_the_last_batch():
  rows = make_rows(num_docs=20)
  n_rows = rows["inputs"].shape[0]
  batches = eval_batches(rows, 4)
  assert len(batches) == -(-n_rows // 4)
  for k in BATCH_KEYS:
    stacked = np.concatenate([b[k] for b in batches])
    assert stacked.shape == (len(batches) * 4, 8) and stacked.dtype == rows[k].dtype
    np.testing.assert_array_equal(stacked[:n_rows], rows[k])
    assert not stacked[n_rows:].any()
  assert eval_batches(pack_documents([], 8, 2, 1), 4) == []


def test_split_train_eval_holds_out_whole_documents():
  docs = [f"doc {i}" for i in range(100)]
  train, held_out = split_train_eval(docs, 0.1, seed=0)
  assert len(held_out) == 10 and len(train) == 90
  assert sorted(train + held_out) == sorted(docs)
  assert train == [d for d in docs if d in train]  # corpus order is kept
  assert split_train_eval(docs, 0.1, seed=0) == (train, held_out)
  assert split_train_eval(docs, 0.1, seed=1) != (train, held_out)
  assert split_train_eval(docs, 0.0, seed=0) == (docs, [])
  with pytest.raises(DataError, match="too few"):
    split_train_eval(["only one"], 0.1, seed=0)
  with pytest.raises(ConfigError):
    split_train_eval(docs, 1.0, seed=0)


def test_tokenize_and_pack_a_corpus(tmp_path):
  texts = ["hello world, this is text number %d. 你好" % i for i in range(50)]
  tokenizer = train_bpe_tokenizer(texts, 300, str(tmp_path))
  token_arrays = tokenize_corpus(texts, tokenizer, batch_size=7)
  assert len(token_arrays) == 50 and all(a.dtype == np.int32 for a in token_arrays)
  assert tokenizer.eos_token_id not in np.concatenate(token_arrays)  # packing adds EOS, not this
  assert tokenizer.decode(token_arrays[3]) == texts[3]

  train_rows, eval_rows = pretraining_rows(texts, tokenizer, seq_len=32, eval_fraction=0.1,
                                           seed=0)
  eos = tokenizer.eos_token_id
  assert int((train_rows["inputs"] == eos).sum()) == 45
  assert int((eval_rows["inputs"] == eos).sum()) == 5
  batch = next(BatchIterator(train_rows, 4, seed=0))
  assert batch["inputs"].shape == (4, 32)
