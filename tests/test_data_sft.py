"""SFT data: reading alpaca/chat files, exact response-only loss masks (plain and tokenizer
chat templates), truncation, padded and packed rows, the record split, errors per record."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers

from research.data.chat_template import has_chat_template, render_segments
from research.data.loader import BatchIterator, eval_batches
from research.data.packing import BATCH_KEYS
from research.data.sft import read_sft_records, sft_rows, split_records, tokenize_sft
from research.data.tokenizer import train_bpe_tokenizer
from research.errors import ConfigError, DataError

TEXTS = [
    "The quick brown fox jumps over the lazy dog. Please translate the sentence.",
    "今天天气很好，我们去公园散步吧。机器学习需要大量的数据。你好，世界！",
    "<|user|>\nWhat is two plus two?\n<|assistant|>\nFour.",
    "皇上万福金安。本宫知道了，你先下去吧。",
    "Machine learning models learn patterns from data; training minimizes a loss function.",
    "def add(a, b):\n    return a + b\n",
    "The assistant answers questions politely and stops when the answer is complete.",
    "娘娘，皇上驾到！臣妾给皇上请安。快传太医来，本宫身子不适。",
    "深度学习框架支持自动微分与并行计算，模型在训练集上收敛得很快。",
    "Good morning! How are you today? I am fine, thank you, and you?",
] * 8

# A ChatML-like template that ends each assistant turn with EOS (transformers renders with
# trim_blocks, so a newline right after a block tag vanishes).
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
          "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}<|im_end|>\n{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

ALPACA = {"instruction": "Translate to Chinese.", "input": "good morning", "output": "早上好！"}
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "今天天气怎么样？"},
        {"role": "assistant", "content": "很好。"}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("sft_tok")
  train_bpe_tokenizer(TEXTS, 600, str(out_dir))
  return str(out_dir)


@pytest.fixture
def tok(tok_dir):
  return transformers.AutoTokenizer.from_pretrained(tok_dir)


def enc(tokenizer, text):
  return tokenizer(text, add_special_tokens=False)["input_ids"]


def expected(tokenizer, parts):
  """Hand-built (ids, loss_on) from (text, is_response, add_eos) parts, each tokenized alone."""
  ids, loss = [], []
  for text, response, eos in parts:
    piece = enc(tokenizer, text) + ([tokenizer.eos_token_id] if eos else [])
    ids += piece
    loss += [response] * len(piece)
  return np.array(ids, np.int32), np.array(loss, bool)


def masked_runs(tokenizer, rows, row=0):
  """Decoded runs of consecutive loss-carrying targets in one row."""
  mask = rows["loss_mask"][row] > 0
  runs, current = [], []
  for target, on in zip(rows["targets"][row], mask):
    if on:
      current.append(int(target))
    elif current:
      runs.append(current)
      current = []
  if current:
    runs.append(current)
  return [tokenizer.decode(r) for r in runs]


def assert_example(got, want):
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  assert got[0].dtype == np.int32


def test_alpaca_plain_template_exact_mask(tok):
  (example,), report = tokenize_sft([ALPACA], tok, max_len=64)
  assert (report.total, report.truncated, report.dropped) == (1, 0, 0)
  prompt = "<|user|>\nTranslate to Chinese.\n\ngood morning\n<|assistant|>\n"
  assert_example(example, expected(tok, [(prompt, False, False), ("早上好！", True, True)]))
  rows = sft_rows([example], 64, tok.pad_token_id, pack=False)
  assert masked_runs(tok, rows) == ["早上好！" + tok.eos_token]


def test_two_turn_chat_trains_every_assistant_turn_and_its_eos(tok):
  (example,), _ = tokenize_sft([{"messages": CHAT}], tok, max_len=128)
  want = expected(tok, [
      ("<|system|>\nYou are terse.\n<|user|>\nWhat is two plus two?\n<|assistant|>\n", False,
       False),
      ("Four.", True, True),
      ("<|user|>\n今天天气怎么样？\n<|assistant|>\n", False, False),
      ("很好。", True, True)])
  assert_example(example, want)
  rows = sft_rows([example], 128, tok.pad_token_id, pack=False)
  assert masked_runs(tok, rows) == ["Four." + tok.eos_token, "很好。" + tok.eos_token]


def test_tokenizer_chat_template_is_used_and_masked(tok):
  tok.chat_template = CHATML
  assert has_chat_template(tok)
  (example,), _ = tokenize_sft([{"messages": CHAT}], tok, max_len=128)
  eos = tok.eos_token
  want = expected(tok, [
      ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is two plus two?"
       "<|im_end|>\n<|im_start|>assistant\n", False, False),
      ("Four." + eos, True, False),
      ("<|im_start|>user\n今天天气怎么样？<|im_end|>\n<|im_start|>assistant\n", False, False),
      ("很好。" + eos, True, False)])
  assert_example(example, want)
  # The template's EOS text became the EOS id, and it carries loss.
  assert (example[0] == tok.eos_token_id).sum() == 2
  assert example[1][example[0] == tok.eos_token_id].all()
  rows = sft_rows([example], 128, tok.pad_token_id, pack=False)
  assert masked_runs(tok, rows) == ["Four." + eos, "很好。" + eos]
  full = tok.apply_chat_template(CHAT, tokenize=False)
  assert "".join(s.text for s in render_segments(CHAT, tok)) == full


def test_non_incremental_chat_template_raises(tok):
  tok.chat_template = ("{{ messages | length }}{% for m in messages %}{{ m['content'] }}"
                       "{% endfor %}")
  with pytest.raises(DataError,
                     match=r"data\.jsonl record 1.*not incremental.*messages\[2\]"):
    tokenize_sft([{"messages": CHAT, "source": "data.jsonl record 1"}], tok, max_len=128)


def test_pad_equal_to_eos_still_trains_on_eos(tok_dir):
  tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
  tokenizer.pad_token = tokenizer.eos_token
  pad_id = tokenizer.pad_token_id
  assert pad_id == tokenizer.eos_token_id
  examples, _ = tokenize_sft([ALPACA, {"messages": CHAT}], tokenizer, max_len=64)
  for pack in (False, True):
    rows = sft_rows(examples, 64, pad_id, pack=pack)
    eos_targets = (rows["targets"] == pad_id) & (rows["segment_ids"] > 0)
    assert eos_targets.sum() == 3 and (rows["loss_mask"][eos_targets] == 1).all()
    padding = rows["segment_ids"] == 0
    assert padding.any() and (rows["loss_mask"][padding] == 0).all()
    assert (rows["inputs"][padding] == pad_id).all()
    assert rows["loss_mask"].sum() == sum(loss[1:].sum() for _, loss in examples)


def long_alpaca(prompt_words, response_words):
  return {"instruction": " ".join(["fox"] * prompt_words), "input": "",
          "output": " ".join(["dog"] * response_words)}


def test_truncate_prompt_left_keeps_last_response_whole(tok):
  records = [ALPACA, long_alpaca(80, 3), long_alpaca(2, 80)]
  full, _ = tokenize_sft(records, tok, max_len=10_000)
  max_len = 40
  examples, report = tokenize_sft(records, tok, max_len=max_len)
  assert (report.total, report.truncated, report.dropped, report.kept) == (3, 1, 1, 2)
  assert report.max_tokens == max(len(ids) for ids, _ in full)
  assert "1 truncated" in str(report) and "1 dropped" in str(report)
  assert_example(examples[0], full[0])
  ids, loss = examples[1]
  assert len(ids) == max_len + 1
  np.testing.assert_array_equal(ids, full[1][0][-(max_len + 1):])
  assert loss.sum() == full[1][1].sum() and not loss[:-full[1][1].sum()].any()
  dropped, report = tokenize_sft(records, tok, max_len=max_len, overflow="drop")
  assert (report.total, report.truncated, report.dropped) == (3, 0, 2)
  assert len(dropped) == 1
  with pytest.raises(ConfigError, match="overflow"):
    tokenize_sft(records, tok, max_len=max_len, overflow="truncate")


def test_truncation_inside_an_earlier_response_drops_its_loss(tok):
  messages = [{"role": "user", "content": "hi"},
              {"role": "assistant", "content": " ".join(["dog"] * 40)},
              {"role": "user", "content": "and?"},
              {"role": "assistant", "content": "Four."}]
  (full,), _ = tokenize_sft([{"messages": messages}], tok, max_len=10_000)
  (cut,), report = tokenize_sft([{"messages": messages}], tok, max_len=25)
  assert report.truncated == 1
  rows = sft_rows([cut], 25, tok.pad_token_id, pack=False)
  assert masked_runs(tok, rows) == ["Four." + tok.eos_token]
  assert cut[1].sum() == len(enc(tok, "Four.")) + 1


def test_packing_keeps_examples_whole_and_matches_unpacked(tok):
  rng = np.random.default_rng(0)
  records = [long_alpaca(int(rng.integers(1, 12)), int(rng.integers(1, 8))) for _ in range(30)]
  examples, _ = tokenize_sft(records + [ALPACA, {"messages": CHAT}], tok, max_len=48)
  flat = sft_rows(examples, 48, tok.pad_token_id, pack=False)
  packed = sft_rows(examples, 48, tok.pad_token_id, pack=True)
  for rows in (flat, packed):
    assert set(rows) == set(BATCH_KEYS)
    assert {rows[k].dtype.name for k in BATCH_KEYS} == {"int32", "float32"}
    assert rows["loss_mask"].dtype == np.float32
  assert packed["inputs"].shape[0] < flat["inputs"].shape[0] == len(examples)
  seen = []
  for r in range(packed["inputs"].shape[0]):
    segs = packed["segment_ids"][r]
    ids_present = [s for s in np.unique(segs) if s > 0]
    assert ids_present == list(range(1, len(ids_present) + 1))
    for s in ids_present:
      cols = np.flatnonzero(segs == s)
      assert (np.diff(cols) == 1).all()  # contiguous
      np.testing.assert_array_equal(packed["positions"][r, cols], np.arange(len(cols)))
      seen.append(tuple(np.concatenate([packed[k][r, cols] for k in
                                        ("inputs", "targets", "loss_mask")]).tolist()))
  want = []
  for r in range(len(examples)):
    cols = np.flatnonzero(flat["segment_ids"][r] == 1)
    np.testing.assert_array_equal(flat["positions"][r, cols], np.arange(len(cols)))
    want.append(tuple(np.concatenate([flat[k][r, cols] for k in
                                      ("inputs", "targets", "loss_mask")]).tolist()))
  assert sorted(seen) == sorted(want)  # every example once, whole, same tokens and masks
  assert packed["loss_mask"].sum() == flat["loss_mask"].sum()
  batch = next(BatchIterator(packed, 2, seed=0))
  assert batch["inputs"].shape == (2, 48)
  assert sum(b["inputs"].shape[0] for b in eval_batches(flat, 4)) % 4 == 0
  with pytest.raises(ConfigError, match="max_len=8"):
    sft_rows(examples, 8, tok.pad_token_id, pack=True)


def test_split_records():
  records = [{"i": i} for i in range(20)]
  train, held = split_records(records, eval_count=3, seed=1)
  assert len(held) == 3 and len(train) == 17
  assert sorted(r["i"] for r in train + held) == list(range(20))
  assert split_records(records, eval_count=3, seed=1) == (train, held)
  assert len(split_records(records, eval_fraction=0.1, seed=0)[1]) == 2
  assert split_records(records, eval_fraction=0.0) == (records, [])
  with pytest.raises(ConfigError):
    split_records(records, eval_fraction=0.1, eval_count=2)
  with pytest.raises(DataError, match="20 record"):
    split_records(records, eval_count=20)


def write(path, records, jsonl):
  text = ("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) if jsonl
          else json.dumps(records, ensure_ascii=False))
  path.write_text(text, encoding="utf-8")
  return str(path)


def test_reads_json_jsonl_parquet_with_auto_format(tmp_path):
  a = write(tmp_path / "a.json", [ALPACA, {"instruction": "hi", "output": "yo"}], jsonl=False)
  c = write(tmp_path / "c.jsonl", [{"messages": CHAT}], jsonl=True)
  p = str(tmp_path / "p.parquet")
  pq.write_table(pa.Table.from_pylist([{"messages": CHAT[1:3]}, {"messages": CHAT}]), p)
  records = read_sft_records([a, c, p])
  assert len(records) == 5
  assert records[0]["messages"] == [
      {"role": "user", "content": "Translate to Chinese.\n\ngood morning"},
      {"role": "assistant", "content": "早上好！"}]
  assert records[1]["messages"][0] == {"role": "user", "content": "hi"}
  assert records[1]["source"] == f"{a} record 2"
  assert records[2]["messages"] == CHAT and records[2]["source"] == f"{c} record 1 (line 1)"
  assert records[4]["messages"] == CHAT and records[4]["source"] == f"{p} record 2"
  with pytest.raises(DataError, match="'messages'"):
    read_sft_records(a, format="chat")


BAD = [  # (bad second record, field named in the error)
    ({"instruction": "x"}, "'output'"),
    ({"output": "x"}, "'instruction'"),
    ({"instruction": "x", "output": "  \n"}, "'output' is empty"),
    ({"instruction": ["x"], "output": "y"}, "'instruction' must be a string"),
    ({"instruction": "x", "input": 3, "output": "y"}, "'input' must be a string"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
     r"messages\[1\]\.content is empty"),
    ({"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]},
     r"messages\[0\]\.role is 'bot'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "q2"}]}, r"messages\[2\]\.role.*end with"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
     r"messages\[0\]\.content must be a string"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
     r"missing field messages\[0\]\.content"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"text": "hello"}, "'messages'"),
]


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
@pytest.mark.parametrize("bad,field", BAD, ids=[str(i) for i in range(len(BAD))])
def test_errors_name_file_record_and_field(tmp_path, bad, field, jsonl):
  first = {"messages": CHAT[1:3]} if "messages" in bad or "text" in bad else ALPACA
  path = write(tmp_path / ("d.jsonl" if jsonl else "d.json"), [first, bad], jsonl)
  with pytest.raises(DataError, match=field) as info:
    read_sft_records(path)
  assert f"{path} record 2" in str(info.value)
  if jsonl:
    assert "(line 2)" in str(info.value)


def test_error_in_parquet_and_in_memory_records(tmp_path, tok):
  p = str(tmp_path / "p.parquet")
  pq.write_table(pa.Table.from_pylist([ALPACA, {**ALPACA, "output": ""}]), p)
  with pytest.raises(DataError, match=rf"{p} record 2: field 'output' is empty"):
    read_sft_records(p)
  with pytest.raises(DataError, match=r"record 2: .*messages\[0\]\.role is 'tool'"):
    tokenize_sft([ALPACA, {"messages": [{"role": "tool", "content": "x"}]}], tok, 64)


def test_reads_huanhuan(shared_data, tok):
  records = read_sft_records(str(shared_data / "huanhuan.json"))
  assert len(records) == 3729
  assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in records)
  examples, report = tokenize_sft(records, tok, max_len=384)
  assert report.total == 3729 and report.kept == len(examples) > 3700
  rows = sft_rows(examples, 384, tok.pad_token_id, pack=True)
  assert rows["loss_mask"].sum() == sum(loss[1:].sum() for _, loss in examples)
  assert rows["inputs"].shape[0] < len(examples) / 2  # short pairs share rows
