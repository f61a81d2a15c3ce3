"""Byte-level BPE: exact round trips (English, Chinese, emoji), the saved directory, determinism, errors."""

import json

import pytest
import transformers

from research.data.tokenizer import EOS_TOKEN, PAD_TOKEN, load_tokenizer, train_bpe_tokenizer
from research.errors import ConfigError, DataError

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 5,
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "今天天气很好，我们去公园散步吧。机器学习需要大量的数据。",
    "Mixed: 你好, world! Ünïcödé ümlauts and tabs\tand newlines\n",
] * 4

UNSEEN = [
    "hello world",
    "这是训练集中没有出现过的句子：深度学习框架。",
    "emoji 🙂🚀 and rare bytes \x00\x7f and  double  spaces ,  .",
    "  leading spaces and trailing newline\n",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("tok")
  return train_bpe_tokenizer(TEXTS, 400, str(out_dir)), out_dir


def test_round_trip_english_and_chinese(trained):
  tokenizer, _ = trained
  for text in TEXTS[:4] + UNSEEN:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert all(0 <= i < len(tokenizer) for i in ids)
    assert tokenizer.decode(ids) == text


def test_auto_tokenizer_loads_saved_dir(trained):
  tokenizer, out_dir = trained
  assert (out_dir / "tokenizer_config.json").is_file()
  loaded = transformers.AutoTokenizer.from_pretrained(str(out_dir))
  assert loaded.eos_token == EOS_TOKEN and loaded.bos_token == EOS_TOKEN
  assert loaded.pad_token == PAD_TOKEN
  assert (loaded.eos_token_id, loaded.pad_token_id) == (0, 1)
  assert len(loaded) == 400
  for text in UNSEEN:
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text
  # No special token is added on encode: packing is the only place EOS goes in.
  assert loaded("hi")["input_ids"] == loaded("hi", add_special_tokens=False)["input_ids"]


def test_load_tokenizer(trained):
  _, out_dir = trained
  loaded = load_tokenizer(str(out_dir))
  assert loaded.eos_token_id == 0 and loaded.pad_token_id == 1


def test_training_is_deterministic(trained, tmp_path):
  _, out_dir = trained
  train_bpe_tokenizer(iter(TEXTS), 400, str(tmp_path))  # a one-shot iterator works too
  first = json.loads((out_dir / "tokenizer.json").read_text())["model"]
  again = json.loads((tmp_path / "tokenizer.json").read_text())["model"]
  assert first["vocab"] == again["vocab"] and first["merges"] == again["merges"]


def test_missing_pad_falls_back_to_eos(tmp_path):
  train_bpe_tokenizer(TEXTS, 300, str(tmp_path))
  config_path = tmp_path / "tokenizer_config.json"
  config = json.loads(config_path.read_text())
  del config["pad_token"]
  config_path.write_text(json.dumps(config))
  assert transformers.AutoTokenizer.from_pretrained(str(tmp_path)).pad_token_id is None
  loaded = load_tokenizer(str(tmp_path))
  assert loaded.pad_token_id == loaded.eos_token_id == 0


def test_load_errors(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    load_tokenizer(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="holds none of"):
    load_tokenizer(str(tmp_path / "empty"))


def test_train_errors(tmp_path):
  with pytest.raises(ConfigError, match="vocab_size >= 258"):
    train_bpe_tokenizer(TEXTS, 100, str(tmp_path))
  with pytest.raises(DataError, match="training texts are empty"):
    train_bpe_tokenizer(["", ""], 300, str(tmp_path))
