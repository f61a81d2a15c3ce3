"""Packs tokenized documents into fixed-length rows for pretraining: the batch-dict contract.

Every row dict holds exactly `BATCH_KEYS`, each `[rows, seq_len]`: the model runs
`Decoder.apply(params, inputs, segment_ids, positions)` and the loss is the cross entropy of the
logits against `targets`, weighted by `loss_mask`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def empty_rows(num_rows: int, seq_len: int) -> dict[str, np.ndarray]:
  """All-padding rows (segment 0, loss_mask 0): what a batch is filled up with to keep its shape."""
  rows = {k: np.zeros((num_rows, seq_len), np.int32) for k in BATCH_KEYS}
  rows["loss_mask"] = rows["loss_mask"].astype(np.float32)
  return rows


def pack_documents(token_lists: Sequence[Sequence[int]], seq_len: int, eos_id: int,
                   pad_id: int) -> dict[str, np.ndarray]:
  """Greedily packs documents (each followed by EOS) into rows of `seq_len` tokens.

  Documents follow each other in the given order; one that does not fit in the rest of a row
  continues at the start of the next row as a new segment there. Attention never crosses a
  segment, so the last token of a chunk that continues in the next row has no visible next token:
  that one prediction per split is lost (loss_mask 0) instead of leaking context across rows.

  Returns int32 `inputs`, `targets`, `segment_ids`, `positions` and float32 `loss_mask`, all
  `[rows, seq_len]`:
    inputs       the tokens; `pad_id` in the tail of the final row.
    targets      the next token of the same segment; 0 where there is none.
    loss_mask    1 where `targets` is a real next token; 0 at each segment's last position and
                 at padding.
    segment_ids  1, 2, 3, ... per segment within a row; 0 marks padding.
    positions    0, 1, 2, ... restarting at each segment start; 0 at padding.
  """
  # Name suffixes give shapes: _d per document, _n the flat token stream, _rt [rows, seq_len].
  if seq_len < 1:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  lengths_d = np.fromiter((len(t) + 1 for t in token_lists), np.int64, len(token_lists))
  total = int(lengths_d.sum())
  if total == 0:
    return empty_rows(0, seq_len)

  # One flat stream of documents, each closed by EOS; a loop per document, not per token.
  stream_n = np.full(total, eos_id, np.int64)
  ends_d = np.cumsum(lengths_d)
  for tokens, end, length in zip(token_lists, ends_d, lengths_d):
    if length > 1:
      stream_n[end - length:end - 1] = np.asarray(tokens, np.int64)
  if stream_n.min() < 0 or stream_n.max() > np.iinfo(np.int32).max:
    raise ValueError("token ids must lie in [0, 2**31); got "
                     f"{stream_n.min()}..{stream_n.max()}")

  num_rows = -(-total // seq_len)
  padded = num_rows * seq_len
  inputs_n = np.full(padded, pad_id, np.int64)
  inputs_n[:total] = stream_n
  doc_n = np.full(padded, -1, np.int64)  # -1 marks padding
  doc_n[:total] = np.repeat(np.arange(len(lengths_d)), lengths_d)

  inputs_rt = inputs_n.reshape(num_rows, seq_len)
  doc_rt = doc_n.reshape(num_rows, seq_len)
  real_rt = doc_rt >= 0

  # A segment starts at column 0 and wherever the document changes within a row.
  starts_rt = np.ones_like(real_rt)
  starts_rt[:, 1:] = doc_rt[:, 1:] != doc_rt[:, :-1]
  segment_ids_rt = np.where(real_rt, np.cumsum(starts_rt, axis=1), 0)

  cols_rt = np.broadcast_to(np.arange(seq_len), (num_rows, seq_len))
  start_col_rt = np.maximum.accumulate(np.where(starts_rt, cols_rt, 0), axis=1)
  positions_rt = np.where(real_rt, cols_rt - start_col_rt, 0)

  has_next_rt = np.zeros_like(real_rt)
  has_next_rt[:, :-1] = real_rt[:, :-1] & (doc_rt[:, 1:] == doc_rt[:, :-1])
  targets_rt = np.zeros_like(inputs_rt)
  targets_rt[:, :-1] = np.where(has_next_rt[:, :-1], inputs_rt[:, 1:], 0)

  return {
      "inputs": inputs_rt.astype(np.int32),
      "targets": targets_rt.astype(np.int32),
      "loss_mask": has_next_rt.astype(np.float32),
      "segment_ids": segment_ids_rt.astype(np.int32),
      "positions": positions_rt.astype(np.int32),
  }


def num_rows(rows: dict[str, np.ndarray]) -> int:
  """Rows in a batch dict. LM rows must hold all the contract keys with one `[rows, seq]` shape,
  and may carry other columns on the same row axis (on-policy distillation's prompts); other
  stages' rows (preference arrays, ...) need only share the leading row axis."""
  if "inputs" in rows:
    if not set(BATCH_KEYS) <= set(rows):
      raise ValueError(f"row dict must hold all of {BATCH_KEYS}, got {sorted(rows)}")
    shapes = {rows[k].shape for k in BATCH_KEYS}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
      raise ValueError(f"row arrays must share one [rows, seq] shape, got {shapes}")
    n = next(iter(shapes))[0]
    if any(len(v) != n for v in rows.values()):
      raise ValueError(f"extra row columns must have the LM rows' {n} rows, got "
                       f"{ {k: len(v) for k, v in rows.items()} }")
    return n
  lengths = {len(v) for v in rows.values()}
  if len(lengths) != 1:
    raise ValueError(f"row arrays must share their leading row axis, got lengths {lengths}")
  return lengths.pop()
