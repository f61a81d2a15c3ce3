"""Supervised fine-tuning data: alpaca or chat records -> token ids with per-token loss flags ->
padded or packed rows in the pretraining batch contract (`research.data.packing.BATCH_KEYS`).

Length convention: an example of `n` tokens gives `n - 1` (input, target) pairs, so it fits a row
of `seq_len` columns when `n <= seq_len + 1`; `tokenize_sft(..., max_len=seq_len)` keeps to that.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterator, Sequence

import numpy as np
import transformers

from research.data.chat_template import KNOWN_ROLES, render_segments
from research.data.corpus import json_array_records, resolve_corpus_files
from research.data.loader import holdout_split, tokenize_corpus
from research.data.packing import empty_rows
from research.errors import ConfigError, DataError

SFT_EXTENSIONS = (".json", ".jsonl", ".parquet")
FORMATS = ("auto", "alpaca", "chat")
OVERFLOW_POLICIES = ("truncate_prompt_left", "drop")
Record = dict
Example = tuple[np.ndarray, np.ndarray]  # (token ids int32 [n], loss_on bool [n])
Rows = dict[str, np.ndarray]


def read_sft_records(paths: list[str] | str, format: str = "auto") -> list[Record]:  # noqa: A002
  """Reads SFT records from .json (one array, or JSON lines), .jsonl and .parquet files.

  `paths` are files, directories or globs as for `read_corpus`. `format="auto"` decides per file
  from its first record: `messages` means chat, else alpaca. Alpaca records hold `instruction`,
  optional `input` and `system`, and `output`; the user turn is instruction and input joined by
  "\\n\\n". Chat records hold `messages`: `{"role": "system"|"user"|"assistant", "content": str}`
  ending with an assistant turn. Every record comes back in chat form,
  `{"messages": [...], "source": "<file> record <n>"}`; a bad record raises `DataError` naming the
  file, its 1-based record number and the field.
  """
  if format not in FORMATS:
    raise ConfigError(f"SFT format={format!r} is not one of {', '.join(FORMATS)}")
  files = resolve_corpus_files([paths] if isinstance(paths, str) else list(paths))
  records: list[Record] = []
  for path in files:
    if not path.lower().endswith(SFT_EXTENSIONS):
      raise DataError(f"SFT file {path} is not {'/'.join(SFT_EXTENSIONS)}: convert it to JSON "
                      "lines with instruction/input/output or messages fields")
    file_format = format
    for n, (where, record) in enumerate(_raw_records(path)):
      if n == 0 and file_format == "auto":
        file_format = detect_format(record, where)
      records.append(normalize_record(record, file_format, where))
  if not records:
    raise DataError(f"the SFT data is empty: {', '.join(files)} hold no record; add records or "
                    "point to other files")
  return records


def detect_format(record: object, where: str) -> str:
  """'chat' for a record with `messages`, 'alpaca' for one with `instruction` or `output`."""
  if not isinstance(record, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
  if "messages" in record:
    return "chat"
  if "instruction" in record or "output" in record:
    return "alpaca"
  raise DataError(f"{where}: has neither field 'messages' (chat) nor 'instruction'/'output' "
                  f"(alpaca), only {sorted(record)}; rename the fields or convert the file")


def normalize_record(record: object, format: str, where: str) -> Record:  # noqa: A002
  """Checks one record and returns it in chat form `{"messages": [...], "source": where}`."""
  if format == "auto":
    format = detect_format(record, where)
  if not isinstance(record, dict):
    raise DataError(f"{where}: expected a JSON object with {format} fields, got "
                    f"{type(record).__name__}")
  if format == "alpaca":
    messages = _alpaca_messages(record, where)
  else:
    messages = _chat_messages(record, where)
  return {"messages": messages, "source": where}


def _alpaca_messages(record: dict, where: str) -> list[dict[str, str]]:
  for field in ("instruction", "output"):
    if field not in record:
      raise DataError(f"{where}: missing field {field!r} (has {sorted(record)}); alpaca records "
                      f"need instruction, output and optionally input{_one_format(record)}")
  fields = {}
  for field in ("system", "instruction", "input", "output"):
    value = record.get(field)
    if value is None and field in ("system", "input"):
      value = ""  # optional; parquet writes a missing value as null
    if not isinstance(value, str):
      raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    fields[field] = value
  if not fields["output"].strip():
    raise DataError(f"{where}: field 'output' is empty: there is no response to train on; fill "
                    "it in or drop the record")
  user = "\n\n".join(p for p in (fields["instruction"], fields["input"]) if p.strip())
  messages = [{"role": "system", "content": fields["system"]}] if fields["system"].strip() else []
  return messages + [{"role": "user", "content": user},
                     {"role": "assistant", "content": fields["output"]}]


def _chat_messages(record: dict, where: str) -> list[dict[str, str]]:
  if "messages" not in record:
    raise DataError(f"{where}: missing field 'messages' (has {sorted(record)}); chat records need "
                    "messages: a list of {role, content} ending with an assistant turn"
                    f"{_one_format(record)}")
  messages = record["messages"]
  if not isinstance(messages, list) or not messages:
    raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} "
                    f"objects, got {type(messages).__name__} {_short(messages)}")
  checked = []
  for i, message in enumerate(messages):
    field = f"messages[{i}]"
    if not isinstance(message, dict):
      raise DataError(f"{where}: field {field} must be an object with role and content, got "
                      f"{type(message).__name__}")
    for key in ("role", "content"):
      if key not in message:
        raise DataError(f"{where}: missing field {field}.{key} (has {sorted(message)})")
    role, content = message["role"], message["content"]
    if role not in KNOWN_ROLES:
      raise DataError(f"{where}: field {field}.role is {_short(role)}, which the chat template "
                      f"does not know; use one of {', '.join(KNOWN_ROLES)}")
    if not isinstance(content, str):
      raise DataError(f"{where}: field {field}.content must be a string, got "
                      f"{type(content).__name__}")
    if role == "assistant" and not content.strip():
      raise DataError(f"{where}: field {field}.content is empty: an assistant turn must hold "
                      "the response to train on; fill it in or drop the turn")
    checked.append({"role": role, "content": content})
  if checked[-1]["role"] != "assistant":
    raise DataError(f"{where}: field messages[{len(checked) - 1}].role is "
                    f"{checked[-1]['role']!r}: the conversation must end with an assistant turn "
                    "(the response to train on); drop the trailing turns")
  return checked


def _one_format(record: dict) -> str:
  if "messages" in record or "instruction" in record or "output" in record:
    return (" (a file's format is that of its first record, or format=; keep one format per "
            "file)")
  return ""


def _short(value: object, width: int = 40) -> str:
  text = repr(value)
  return text if len(text) <= width else text[:width] + "..."


def _raw_records(path: str) -> Iterator[tuple[str, object]]:
  """Yields `(where, record)` per record; `where` names the file and 1-based record number."""
  lower = path.lower()
  if lower.endswith(".parquet"):
    yield from _parquet_records(path)
    return
  if lower.endswith(".json"):
    with open(path, "rb") as f:
      head = f.read(4096).lstrip()
    if head.startswith(b"["):
      yield from json_array_records(path, "SFT")
      return
    if head.startswith(b"{") and _is_single_object(path):
      raise DataError(f"{path}: holds one JSON object, not records: write an array of records "
                      "or one record per line (JSON lines)")
  number = 0
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      number += 1
      where = f"{path} record {number} (line {line_no})"
      try:
        yield where, json.loads(raw.decode("utf-8"))
      except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text; re-encode the file as UTF-8") from e
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line "
                        "must be one JSON object") from e


def _is_single_object(path: str) -> bool:
  try:
    with open(path, encoding="utf-8") as f:
      return isinstance(json.load(f), dict)
  except (UnicodeDecodeError, json.JSONDecodeError):
    return False  # JSON lines (or broken JSON, reported line by line)


def _parquet_records(path: str) -> Iterator[tuple[str, object]]:
  import pyarrow as pa
  import pyarrow.parquet as pq

  try:
    table = pq.read_table(path)
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"SFT file {path} is not a readable parquet file: {e}") from e
  for number, record in enumerate(table.to_pylist(), start=1):
    yield f"{path} record {number}", record


@dataclasses.dataclass
class SftReport:
  """What `tokenize_sft` did to fit examples into `max_len + 1` tokens; log `str(report)`."""
  max_len: int
  overflow: str
  total: int = 0
  truncated: int = 0
  dropped: int = 0
  max_tokens: int = 0  # the longest example before any cut

  @property
  def kept(self) -> int:
    return self.total - self.dropped

  def __str__(self) -> str:
    why = ("longer than" if self.overflow == "drop" else "the last response alone too long for")
    return (f"SFT examples: {self.total} total, {self.kept} kept, {self.truncated} truncated "
            f"(prompt cut from the left), {self.dropped} dropped ({why} max_len={self.max_len} "
            f"+ 1 tokens); longest {self.max_tokens} tokens")


def tokenize_sft(records: Sequence[Record], tokenizer: transformers.PreTrainedTokenizerBase,
                 max_len: int, overflow: str = "truncate_prompt_left",
                 ) -> tuple[list[Example], SftReport]:
  """Tokenizes records (chat form from `read_sft_records`, or raw alpaca/chat dicts) into
  `(ids int32 [n], loss_on bool [n])` examples; `loss_on[j]` says token j is a response token,
  trained as the target predicted at position j - 1. Each text segment of the template is
  tokenized on its own (as the prompt is at generation time), so masks follow segment bounds.

  An example fits when `n <= max_len + 1`. Longer ones: `overflow="drop"` drops them;
  `"truncate_prompt_left"` drops tokens from the left of everything before the last response
  (a partly cut earlier response loses its loss) and keeps the last response whole, dropping the
  example instead when that response and one token of prompt do not fit. The report counts both.
  """
  if overflow not in OVERFLOW_POLICIES:
    raise ConfigError(f"overflow={overflow!r} is not one of {', '.join(OVERFLOW_POLICIES)}")
  if max_len < 1:
    raise ConfigError(f"max_len={max_len} must be positive")
  if tokenizer.eos_token_id is None:
    raise DataError("the tokenizer has no eos_token: load it with "
                    "research.data.tokenizer.load_tokenizer")
  segment_lists = []
  for number, record in enumerate(records, start=1):
    where = f"record {number}"
    if isinstance(record, dict) and isinstance(record.get("source"), str):
      where = record["source"]
    chat = normalize_record(record, "auto", where)
    segment_lists.append((where, render_segments(chat["messages"], tokenizer, where)))
  ids_s = tokenize_corpus([s.text for _, segs in segment_lists for s in segs], tokenizer)

  report = SftReport(max_len=max_len, overflow=overflow, total=len(segment_lists))
  examples: list[Example] = []
  eos_1 = np.array([tokenizer.eos_token_id], np.int32)
  k = 0
  for where, segments in segment_lists:
    parts_ids, parts_loss, last_start, length = [], [], 0, 0
    for segment in segments:
      seg_ids = np.concatenate([ids_s[k], eos_1]) if segment.eos else ids_s[k]
      k += 1
      if segment.response:
        last_start = length
      parts_ids.append(seg_ids)
      parts_loss.append(np.full(len(seg_ids), segment.response))
      length += len(seg_ids)
    ids_n = np.concatenate(parts_ids).astype(np.int32)
    loss_n = np.concatenate(parts_loss).astype(bool)
    if not loss_n[1:].any():
      raise DataError(f"{where}: the response tokenizes to no token that can be trained on; "
                      "check the tokenizer and the record")
    report.max_tokens = max(report.max_tokens, len(ids_n))
    if len(ids_n) <= max_len + 1:
      examples.append((ids_n, loss_n))
      continue
    cut = len(ids_n) - (max_len + 1)
    if overflow == "drop" or cut >= last_start:
      report.dropped += 1
      continue
    if loss_n[cut]:
      # An earlier response cut in the middle would train on a fragment without its question.
      tail = loss_n[cut:last_start]
      run_end = cut + (int(np.argmin(tail)) if not tail.all() else len(tail))
      loss_n[cut:run_end] = False
    examples.append((ids_n[cut:], loss_n[cut:]))
    report.truncated += 1
  return examples, report


def sft_rows(examples: Sequence[Example], seq_len: int, pad_id: int, pack: bool) -> Rows:
  """Examples -> the 5-key `[rows, seq_len]` batch dict of `research.data.packing`.

  Row inputs are `ids[:-1]`, targets `ids[1:]` and loss_mask `loss_on[1:]` of each example.
  `pack=False`: one example per row, right-padded. `pack=True`: whole examples placed greedily
  first-fit in order (never split), each its own segment (ids 1, 2, ...) with positions from 0.
  Padding has inputs `pad_id`, targets 0, loss_mask 0, segment_ids 0, positions 0; the mask comes
  from positions, never from ids, so an EOS equal to `pad_id` still trains.
  """
  if seq_len < 1:
    raise ConfigError(f"seq_len={seq_len} must be positive")
  lengths_e = np.array([len(ids) - 1 for ids, _ in examples], np.int64)
  for i, ((ids, loss), length) in enumerate(zip(examples, lengths_e)):
    if not 1 <= length <= seq_len or len(loss) != len(ids):
      raise ConfigError(f"SFT example {i} has {length + 1} tokens and {len(loss)} loss flags: "
                        f"each needs 2..seq_len+1={seq_len + 1} tokens, one flag per token; "
                        f"tokenize with max_len={seq_len}")
  if pack:
    row_e, col_e = _first_fit(lengths_e, seq_len)
  else:
    row_e, col_e = np.arange(len(examples)), np.zeros(len(examples), np.int64)
  num_rows = int(row_e.max()) + 1 if len(examples) else 0
  rows = empty_rows(num_rows, seq_len)
  rows["inputs"][:] = pad_id
  next_segment_r = np.ones(num_rows, np.int32)
  for (ids, loss), row, col, length in zip(examples, row_e, col_e, lengths_e):
    span = slice(col, col + length)
    rows["inputs"][row, span] = ids[:-1]
    rows["targets"][row, span] = ids[1:]
    rows["loss_mask"][row, span] = loss[1:]
    rows["segment_ids"][row, span] = next_segment_r[row]
    rows["positions"][row, span] = np.arange(length)
    next_segment_r[row] += 1
  return rows


def _first_fit(lengths_e: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Row and start column per example: the first open row with room, else a new row."""
  free_r = np.empty(len(lengths_e), np.int64)  # at most one row per example
  num_open = 0
  row_e = np.empty(len(lengths_e), np.int64)
  col_e = np.empty(len(lengths_e), np.int64)
  for i, length in enumerate(lengths_e):
    fits = np.flatnonzero(free_r[:num_open] >= length)
    if fits.size:
      row = int(fits[0])
    else:
      row, num_open = num_open, num_open + 1
      free_r[row] = seq_len
    row_e[i], col_e[i] = row, seq_len - free_r[row]
    free_r[row] -= length
  return row_e, col_e


def split_records(records: Sequence[Record], eval_fraction: float | None = None,
                  eval_count: int | None = None, seed: int = 0) -> tuple[list, list]:
  """Holds out whole records for eval, before tokenization (see `loader.holdout_split`)."""
  return holdout_split(records, eval_fraction, eval_count, seed, "the SFT data", "record")
