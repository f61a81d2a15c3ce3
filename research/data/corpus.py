"""Reads a pretraining text corpus (.txt, .jsonl/.json, .parquet files, directories or globs) into documents.

Files are checked first with a light pass of our own, so a bad input fails with one `DataError`
naming the file, line and field; then the `datasets` library reads them (offline, quietly).
"""

from __future__ import annotations

import codecs
import glob
import json
import os
from typing import Iterator

os.environ["HF_DATASETS_OFFLINE"] = "1"

import datasets  # noqa: E402  (must come after the offline switch)

from research.errors import DataError  # noqa: E402

TEXT_EXTENSIONS = (".txt",)
JSON_EXTENSIONS = (".jsonl", ".json")
PARQUET_EXTENSIONS = (".parquet",)
SUPPORTED_EXTENSIONS = TEXT_EXTENSIONS + JSON_EXTENSIONS + PARQUET_EXTENSIONS
_GLOB_CHARS = "*?["


def read_corpus(paths: list[str] | str, text_field: str = "text",
                cache_dir: str | None = None) -> list[str]:
  """Returns the corpus documents as a list of strings, in file order then record order.

  `paths` are files, directories (their supported files, recursively, sorted by path) or glob
  patterns (matches sorted). A `.txt` file is one document; each line of a `.jsonl` file (or
  each record of a `.json` array) and each row of a `.parquet` file is one document, taken from
  `text_field`. Empty documents are dropped; a corpus left with none raises `DataError`.
  `cache_dir` is where `datasets` keeps its Arrow cache (None: its default).
  """
  files = resolve_corpus_files([paths] if isinstance(paths, str) else list(paths))
  # Files without a single record are left out: `datasets` refuses them instead of reading zero.
  nonempty_files = [path for path in files if _validate_file(path, text_field) > 0]

  datasets.config.HF_DATASETS_OFFLINE = True
  datasets.disable_progress_bars()
  datasets.logging.set_verbosity_error()
  documents: list[str] = []
  for builder, group in _builder_groups(nonempty_files):
    documents.extend(_load_group(builder, group, text_field, cache_dir))

  documents = [d for d in documents if d]
  if not documents:
    raise DataError(f"the corpus is empty: {', '.join(files)} hold no non-empty document in "
                    f"field {text_field!r}; add text or point to other files")
  return documents


def resolve_corpus_files(paths: list[str]) -> list[str]:
  """Expands files, directories and globs into the ordered list of corpus files (no duplicates)."""
  if not paths:
    raise DataError("no corpus paths given: pass at least one file, directory or glob")
  files: list[str] = []
  for path in paths:
    path = os.fspath(path)
    if any(c in path for c in _GLOB_CHARS) and not os.path.exists(path):
      matches = sorted(glob.glob(path, recursive=True))
      if not matches:
        raise DataError(f"corpus glob {path} matches no file: check the pattern")
      for match in matches:
        if os.path.isdir(match):
          files.extend(_supported_files_under(match))
        else:
          files.append(_checked_extension(match))
    elif os.path.isdir(path):
      files.extend(_supported_files_under(path))
    elif os.path.isfile(path):
      files.append(_checked_extension(path))
    else:
      raise DataError(f"corpus path {path} does not exist: check the path (files, directories "
                      "and glob patterns are accepted)")
  seen: set[str] = set()
  unique = []
  for f in files:
    key = os.path.realpath(f)
    if key not in seen:
      seen.add(key)
      unique.append(f)
  return unique


def _supported_files_under(directory: str) -> list[str]:
  found = []
  for root, dirs, names in os.walk(directory):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    found.extend(os.path.join(root, n) for n in names
                 if not n.startswith(".") and n.lower().endswith(SUPPORTED_EXTENSIONS))
  if not found:
    raise DataError(f"corpus directory {directory} holds no {'/'.join(SUPPORTED_EXTENSIONS)} "
                    "file: add some or point to another directory")
  return sorted(found)


def _checked_extension(path: str) -> str:
  if not path.lower().endswith(SUPPORTED_EXTENSIONS):
    ext = os.path.splitext(path)[1] or "(none)"
    raise DataError(f"corpus file {path} has unsupported extension {ext}: use one of "
                    f"{', '.join(SUPPORTED_EXTENSIONS)} (rename it or convert it)")
  return path


def _validate_file(path: str, text_field: str) -> int:
  """Raises DataError for the first problem in the file; returns how many records it holds."""
  lower = path.lower()
  if lower.endswith(TEXT_EXTENSIONS):
    return _validate_text(path)
  if lower.endswith(JSON_EXTENSIONS):
    return _validate_json(path, text_field)
  return _validate_parquet(path, text_field)


def _validate_text(path: str) -> int:
  # Decode in chunks so a large file is never held twice; the decoder keeps split characters.
  with open(path, "rb") as f:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        decoder.decode(chunk)
        offset += len(chunk)
      decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
      raise DataError(f"corpus file {path} is not UTF-8 text (bad byte near offset "
                      f"{offset + e.start}): re-encode it as UTF-8") from e
  return 1


def _validate_json(path: str, text_field: str) -> int:
  if path.lower().endswith(".json"):
    with open(path, "rb") as f:
      head = f.read(4096).lstrip()
    if head.startswith(b"["):
      return _validate_json_array(path, text_field)
  num_records = 0
  for line_no, line in _numbered_lines(path):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path} line {line_no}: not valid JSON ({e.msg} at column {e.colno}); "
                      "each line must be one JSON object") from e
    _check_record(record, text_field, f"{path} line {line_no}")
    num_records += 1
  return num_records


def _validate_json_array(path: str, text_field: str) -> int:
  num_records = 0
  for where, record in json_array_records(path, "corpus"):
    _check_record(record, text_field, where)
    num_records += 1
  return num_records


def json_array_records(path: str, kind: str) -> Iterator[tuple[str, object]]:
  """(where, record) for each object of a .json file holding one array; `kind` names the file
  in errors ("corpus", "SFT"). A broken file is one DataError with its line."""
  try:
    with open(path, encoding="utf-8") as f:
      records = json.load(f)
  except UnicodeDecodeError as e:
    raise DataError(f"{kind} file {path} is not UTF-8: re-encode it as UTF-8") from e
  except json.JSONDecodeError as e:
    raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                    "fix the file or write it as JSON lines (.jsonl)") from e
  if not isinstance(records, list):
    raise DataError(f"{path}: expected JSON lines or one array of objects, got a "
                    f"{type(records).__name__}; write one object per line")
  for number, record in enumerate(records, start=1):
    yield f"{path} record {number}", record


def _numbered_lines(path: str) -> Iterator[tuple[int, str]]:
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      try:
        yield line_no, raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"{path} line {line_no}: not UTF-8 text; re-encode the file as "
                        "UTF-8") from e


def _check_record(record: object, text_field: str, where: str) -> None:
  if not isinstance(record, dict):
    raise DataError(f"{where}: expected a JSON object with a {text_field!r} field, got "
                    f"{type(record).__name__}")
  if text_field not in record:
    raise DataError(f"{where}: missing field {text_field!r} (has {sorted(record)}); add it or "
                    "pass text_field= naming the field that holds the text")
  if not isinstance(record[text_field], str):
    raise DataError(f"{where}: field {text_field!r} must be a string, got "
                    f"{type(record[text_field]).__name__}")


def _validate_parquet(path: str, text_field: str) -> int:
  import pyarrow as pa
  import pyarrow.parquet as pq

  try:
    metadata = pq.read_metadata(path)
    schema = metadata.schema.to_arrow_schema()
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"corpus file {path} is not a readable parquet file: {e}") from e
  if text_field not in schema.names:
    raise DataError(f"{path}: missing column {text_field!r} (has {schema.names}); add it or "
                    "pass text_field= naming the column that holds the text")
  field_type = schema.field(text_field).type
  if not (pa.types.is_string(field_type) or pa.types.is_large_string(field_type)):
    raise DataError(f"{path}: column {text_field!r} must hold strings, got {field_type}")
  return metadata.num_rows


def _builder_groups(files: list[str]) -> Iterator[tuple[str, list[str]]]:
  """Runs of consecutive .txt files share one `datasets` call; each json/parquet file gets its own
  call, so files whose extra columns differ never have to be cast to one schema."""
  run: list[str] = []
  for path in files:
    if path.lower().endswith(TEXT_EXTENSIONS):
      run.append(path)
      continue
    if run:
      yield "text", run
      run = []
    yield ("json" if path.lower().endswith(JSON_EXTENSIONS) else "parquet"), [path]
  if run:
    yield "text", run


def _load_group(builder: str, files: list[str], text_field: str,
                cache_dir: str | None) -> list[str]:
  kwargs: dict = {}
  if builder == "text":
    kwargs["sample_by"] = "document"
    field = "text"
  elif builder == "parquet":
    kwargs["columns"] = [text_field]
    field = text_field
  else:
    field = text_field
  try:
    dataset = datasets.load_dataset(builder, data_files=files, split="train",
                                    cache_dir=cache_dir, **kwargs)
  except Exception as e:  # noqa: BLE001 - any reader failure is reported against its file
    cause = e.__cause__ or e.__context__ or e
    hint = ("give every other field one type across lines and drop blank lines"
            if builder == "json" else "check that the file is complete and not corrupted")
    raise DataError(f"datasets could not read {', '.join(files)}: {cause}; {hint}") from e
  texts = dataset[field][:]
  for row, text in enumerate(texts, start=1):
    if text is None:
      raise DataError(f"{files[0]} row {row}: field {text_field!r} is null; fill or drop "
                      "that row")
  return texts
