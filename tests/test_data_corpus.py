"""read_corpus: each supported format, path expansion, and one clear DataError per bad input."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from research.data.corpus import read_corpus, resolve_corpus_files
from research.errors import DataError


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                  encoding="utf-8")
  return path


@pytest.fixture
def cache(tmp_path):
  return str(tmp_path / "hf_cache")


def test_txt_files_are_one_document_each(tmp_path, cache):
  (tmp_path / "a.txt").write_text("line one\nline two\n\n", encoding="utf-8")
  (tmp_path / "b.txt").write_text("第二个文件", encoding="utf-8")
  docs = read_corpus([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], cache_dir=cache)
  assert docs == ["line one\nline two\n\n", "第二个文件"]


def test_jsonl_json_array_and_parquet(tmp_path, cache):
  write_jsonl(tmp_path / "a.jsonl", [{"body": "one", "id": 1}, {"body": "two", "id": 2}])
  (tmp_path / "b.json").write_text(json.dumps([{"body": "three"}, {"body": "four"}]))
  pq.write_table(pa.table({"body": ["five", "six"], "n": [5, 6]}), tmp_path / "c.parquet")
  paths = [str(tmp_path / n) for n in ("a.jsonl", "b.json", "c.parquet")]
  assert read_corpus(paths, text_field="body", cache_dir=cache) == [
      "one", "two", "three", "four", "five", "six"]


def test_files_with_different_extra_columns_read_together(tmp_path, cache):
  write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "meta": 1}])
  write_jsonl(tmp_path / "b.jsonl", [{"text": "y", "other": "s"}])
  assert read_corpus([str(tmp_path)], cache_dir=cache) == ["x", "y"]


def test_directories_recurse_sorted_and_globs_expand(tmp_path, cache):
  (tmp_path / "z").mkdir()
  (tmp_path / "z" / "deep.txt").write_text("deep")
  (tmp_path / "b.txt").write_text("b")
  (tmp_path / "a.txt").write_text("a")
  (tmp_path / "notes.md").write_text("skipped: not a corpus format")
  assert read_corpus([str(tmp_path)], cache_dir=cache) == ["a", "b", "deep"]
  assert read_corpus([str(tmp_path / "*.txt")], cache_dir=cache) == ["a", "b"]
  # The same file named twice is read once.
  files = resolve_corpus_files([str(tmp_path / "a.txt"), str(tmp_path / "*.txt")])
  assert [f.rsplit("/", 1)[-1] for f in files] == ["a.txt", "b.txt"]


def test_empty_documents_are_dropped(tmp_path, cache):
  write_jsonl(tmp_path / "a.jsonl", [{"text": ""}, {"text": "kept"}, {"text": ""}])
  assert read_corpus([str(tmp_path / "a.jsonl")], cache_dir=cache) == ["kept"]


def test_missing_path(tmp_path):
  missing = str(tmp_path / "nope.jsonl")
  with pytest.raises(DataError, match="nope.jsonl does not exist"):
    read_corpus([missing])
  with pytest.raises(DataError, match="matches no file"):
    read_corpus([str(tmp_path / "*.jsonl")])


def test_unsupported_extension(tmp_path):
  (tmp_path / "corpus.csv").write_text("text\nhello\n")
  with pytest.raises(DataError, match=r"corpus\.csv has unsupported extension \.csv"):
    read_corpus([str(tmp_path / "corpus.csv")])


def test_directory_without_supported_files(tmp_path):
  (tmp_path / "readme.md").write_text("hi")
  with pytest.raises(DataError, match="holds no"):
    read_corpus([str(tmp_path)])


def test_empty_corpus_names_the_files(tmp_path, cache):
  (tmp_path / "a.txt").write_text("")
  write_jsonl(tmp_path / "b.jsonl", [{"text": ""}])
  with pytest.raises(DataError, match=r"corpus is empty: .*a\.txt, .*b\.jsonl"):
    read_corpus([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], cache_dir=cache)
  (tmp_path / "c.jsonl").write_text("\n\n")
  with pytest.raises(DataError, match=r"corpus is empty: .*c\.jsonl"):
    read_corpus([str(tmp_path / "c.jsonl")], cache_dir=cache)


def test_jsonl_line_without_the_field(tmp_path):
  path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": "b"}, {"content": "c"}])
  with pytest.raises(DataError) as info:
    read_corpus([str(path)])
  message = str(info.value)
  assert "bad.jsonl" in message and "line 3" in message and "'text'" in message
  assert "text_field=" in message  # says how to fix it


def test_jsonl_invalid_json_and_wrong_type(tmp_path):
  path = tmp_path / "broken.jsonl"
  path.write_text('{"text": "a"}\n{"text": "b",\n')
  with pytest.raises(DataError, match=r"broken\.jsonl line 2: not valid JSON"):
    read_corpus([str(path)])
  write_jsonl(path, [{"text": "a"}, {"text": 5}])
  with pytest.raises(DataError, match=r"broken\.jsonl line 2: field 'text' must be a string"):
    read_corpus([str(path)])
  write_jsonl(path, [["not", "an", "object"]])
  with pytest.raises(DataError, match=r"broken\.jsonl line 1: expected a JSON object"):
    read_corpus([str(path)])


def test_blank_jsonl_lines_keep_line_numbers(tmp_path):
  path = tmp_path / "gaps.jsonl"
  path.write_text('{"text": "a"}\n\n{"txt": "c"}\n')
  with pytest.raises(DataError, match="line 3"):
    read_corpus([str(path)])


def test_json_array_record_without_field(tmp_path):
  path = tmp_path / "arr.json"
  path.write_text(json.dumps([{"text": "a"}, {"body": "b"}]))
  with pytest.raises(DataError, match=r"arr\.json record 2: missing field 'text'"):
    read_corpus([str(path)])


def test_parquet_without_the_column(tmp_path):
  pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
  with pytest.raises(DataError, match=r"c\.parquet: missing column 'text'"):
    read_corpus([str(tmp_path / "c.parquet")])


def test_non_utf8_text(tmp_path):
  (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
  with pytest.raises(DataError, match=r"latin\.txt is not UTF-8"):
    read_corpus([str(tmp_path / "latin.txt")])


def test_shared_real_data(shared_data, cache):
  chosen = read_corpus([str(shared_data / "hh_rlhf_harmless_test_500.jsonl")],
                       text_field="chosen", cache_dir=cache)
  assert len(chosen) == 500 and all("Assistant:" in d for d in chosen)
  outputs = read_corpus([str(shared_data / "huanhuan.json")], text_field="output",
                        cache_dir=cache)
  assert len(outputs) == 3729 and outputs[0].startswith("你放心")
