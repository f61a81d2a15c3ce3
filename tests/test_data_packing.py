"""pack_documents against a plain per-token Python loop, plus the invariants the train step relies on."""

import numpy as np
import pytest

from research.data.packing import BATCH_KEYS, num_rows, pack_documents

EOS, PAD = 2, 1


def reference_pack(docs, seq_len, eos_id, pad_id):
  """The packing rule written out token by token: (token, document) cells, then row fields."""
  cells_rows, row = [], []
  for d, doc in enumerate(docs):
    for token in list(doc) + [eos_id]:
      row.append((token, d))
      if len(row) == seq_len:
        cells_rows.append(row)
        row = []
  if row:
    cells_rows.append(row + [(pad_id, -1)] * (seq_len - len(row)))
  out = {k: [] for k in BATCH_KEYS}
  for cells in cells_rows:
    inputs, targets, mask, segs, pos = [], [], [], [], []
    seg, p = 0, 0
    for t, (token, doc) in enumerate(cells):
      if doc == -1:
        segs.append(0)
        pos.append(0)
      else:
        if t == 0 or cells[t - 1][1] != doc:
          seg, p = seg + 1, 0
        segs.append(seg)
        pos.append(p)
        p += 1
      inputs.append(token)
      has_next = doc != -1 and t + 1 < seq_len and cells[t + 1][1] == doc
      targets.append(cells[t + 1][0] if has_next else 0)
      mask.append(1.0 if has_next else 0.0)
    for k, v in zip(BATCH_KEYS, (inputs, targets, mask, segs, pos)):
      out[k].append(v)
  return {k: np.array(v).reshape(len(cells_rows), seq_len) for k, v in out.items()}


def random_docs(rng, num_docs, max_len):
  return [list(rng.integers(3, 50, size=rng.integers(0, max_len + 1))) for _ in range(num_docs)]


@pytest.mark.parametrize("seq_len", [1, 2, 7, 16, 33])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_loop(seq_len, seed):
  docs = random_docs(np.random.default_rng(seed), num_docs=40, max_len=40)
  got = pack_documents(docs, seq_len, EOS, PAD)
  want = reference_pack(docs, seq_len, EOS, PAD)
  assert set(got) == set(BATCH_KEYS)
  for k in BATCH_KEYS:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_dtypes_and_shapes():
  got = pack_documents([[5, 6, 7], [8]], 4, EOS, PAD)
  assert num_rows(got) == 2
  for k in BATCH_KEYS:
    assert got[k].shape == (2, 4)
    assert got[k].dtype == (np.float32 if k == "loss_mask" else np.int32)


def test_every_document_and_eos_appear_in_order():
  docs = random_docs(np.random.default_rng(7), num_docs=100, max_len=90)
  got = pack_documents(docs, 32, EOS, PAD)
  stream = got["inputs"][got["segment_ids"] > 0]
  want = np.concatenate([np.array(d + [EOS], np.int64) for d in docs])
  np.testing.assert_array_equal(stream, want)


def test_small_example_exactly():
  # Documents [3 4 5] and [6 7 8 9 10] in rows of 4: the second one splits across rows 0 and 1.
  got = pack_documents([[3, 4, 5], [6, 7, 8, 9, 10]], 4, EOS, PAD)
  np.testing.assert_array_equal(got["inputs"], [[3, 4, 5, 2], [6, 7, 8, 9], [10, 2, 1, 1]])
  np.testing.assert_array_equal(got["targets"], [[4, 5, 2, 0], [7, 8, 9, 0], [2, 0, 0, 0]])
  np.testing.assert_array_equal(got["loss_mask"], [[1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(got["segment_ids"], [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
  np.testing.assert_array_equal(got["positions"], [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 0, 0]])


def test_segments_restart_positions_within_a_row():
  got = pack_documents([[3, 4], [5], [6, 7, 8]], 16, EOS, PAD)
  np.testing.assert_array_equal(got["segment_ids"][0, :10], [1, 1, 1, 2, 2, 3, 3, 3, 3, 0])
  np.testing.assert_array_equal(got["positions"][0, :10], [0, 1, 2, 0, 1, 0, 1, 2, 3, 0])
  # The last token of each segment (its EOS) predicts nothing.
  np.testing.assert_array_equal(got["loss_mask"][0, :10], [1, 1, 0, 1, 0, 1, 1, 1, 0, 0])


def test_exact_fit_has_no_padding_and_empty_input_has_no_rows():
  got = pack_documents([[3, 4, 5], [6, 7, 8]], 4, EOS, PAD)
  assert (got["segment_ids"] > 0).all()
  assert num_rows(pack_documents([], 8, EOS, PAD)) == 0


def test_large_corpus_is_fast():
  # A few million tokens must pack in well under a second or two (no per-token Python loop).
  rng = np.random.default_rng(0)
  docs = [rng.integers(3, 30000, size=n, dtype=np.int32) for n in rng.integers(1, 4000, 2000)]
  got = pack_documents(docs, 1024, EOS, PAD)
  assert int((got["segment_ids"] > 0).sum()) == sum(len(d) + 1 for d in docs)


def test_out_of_range_ids_raise():
  with pytest.raises(ValueError, match="token ids"):
    pack_documents([[-3, 4]], 4, EOS, PAD)


def test_lm_rows_may_carry_extra_columns_on_their_row_axis():
  packed = pack_documents([[5, 6, 7]] * 4, 8, EOS, PAD)
  n = num_rows(packed)
  rows = {**packed, "prompt_tokens": np.zeros((n, 3))}
  assert num_rows(rows) == n
  with pytest.raises(ValueError, match="extra row columns"):
    num_rows({**rows, "prompt_tokens": np.zeros((n + 1, 3))})
  with pytest.raises(ValueError, match="must hold all of"):
    num_rows({k: v for k, v in rows.items() if k != "positions"})
