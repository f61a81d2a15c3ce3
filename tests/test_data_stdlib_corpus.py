"""The built-in standard-library corpus: deterministic, real Python source, under the byte cap."""

import ast
import json

import pytest

from research.data.corpus import read_corpus
from research.data.stdlib_corpus import EXCLUDED_DIRS, write_stdlib_corpus
from research.errors import DataError


def test_deterministic_real_python_under_the_cap(tmp_path):
  first = write_stdlib_corpus(str(tmp_path / "a" / "stdlib.jsonl"), max_bytes=300_000)
  second = write_stdlib_corpus(str(tmp_path / "b.jsonl"), max_bytes=300_000)
  assert first == str(tmp_path / "a" / "stdlib.jsonl")
  raw = (tmp_path / "a" / "stdlib.jsonl").read_bytes()
  assert raw == (tmp_path / "b.jsonl").read_bytes()

  records = [json.loads(line) for line in raw.decode("utf-8").splitlines()]
  paths = [r["path"] for r in records]
  assert len(records) > 3 and paths == sorted(paths)
  assert sum(len(r["text"].encode("utf-8")) for r in records) <= 300_000
  assert not any(set(p.split("/")[:-1]) & EXCLUDED_DIRS for p in paths)
  assert all(p.endswith(".py") for p in paths)
  for record in records:
    ast.parse(record["text"], filename=record["path"])  # real, parseable Python source
  assert any("def " in r["text"] for r in records)


def test_the_corpus_reader_reads_it(tmp_path):
  path = write_stdlib_corpus(str(tmp_path / "stdlib.jsonl"), max_bytes=100_000)
  docs = read_corpus([path], cache_dir=str(tmp_path / "cache"))
  assert docs == [json.loads(line)["text"] for line in open(path, encoding="utf-8")]


def test_bad_arguments(tmp_path):
  with pytest.raises(DataError, match="must end in .jsonl"):
    write_stdlib_corpus(str(tmp_path / "stdlib.txt"), max_bytes=100_000)
  with pytest.raises(DataError, match="raise it"):
    write_stdlib_corpus(str(tmp_path / "stdlib.jsonl"), max_bytes=10)
