"""Preference data: the pairwise, hh-rlhf dialogue and K-wise forms from json/jsonl/parquet, errors
naming file/record/field, `[N, K, T]` token arrays (EOS at last_index, prompt cut from the left),
the split, rollout prompts, and the real hh-rlhf harmless pairs."""

import copy
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers

from research.data.preferences import (ASSISTANT_TAG, chat_records, prompt_ids,
                                       read_preference_records,
                                       split_preferences, tokenize_preferences)
from research.data.tokenizer import train_bpe_tokenizer
from research.errors import ConfigError, DataError

TEXTS = [
    "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt.",
    "\n\nHuman: What is two plus two?\n\nAssistant: Four. It is four.",
    "The quick brown fox jumps over the lazy dog. I cannot help with that.",
    "你好，世界！今天天气很好。",
] * 8

PAIR = {"prompt": "What is two plus two?", "chosen": " Four.", "rejected": " Five.", "margin": 1.5}
HH = {"chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water."
                "\n\nHuman: And then?\n\nAssistant: Bake it.",
      "rejected": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water."
                  "\n\nHuman: And then?\n\nAssistant: I cannot help with that."}
RANKING = {"prompt": "Say hello.", "responses": ["Hello!", "Hi.", "Go away."], "id": 7}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("pref_tok")
  train_bpe_tokenizer(TEXTS, 400, str(out_dir))
  return transformers.AutoTokenizer.from_pretrained(str(out_dir))


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
  return str(path)


def enc(tokenizer, text):
  return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_three_forms_from_jsonl_json_and_parquet(tmp_path):
  jsonl = write_jsonl(tmp_path / "a.jsonl", [PAIR, HH])
  (tmp_path / "b.json").write_text(json.dumps([RANKING]))
  pq.write_table(pa.Table.from_pylist([{"prompt": "Q?", "chosen": "yes", "rejected": "no"}]),
                 tmp_path / "c.parquet")
  records = read_preference_records([jsonl, str(tmp_path / "b.json"),
                                     str(tmp_path / "c.parquet")])
  assert [r["responses"] for r in records] == [
      [" Four.", " Five."], [" Bake it.", " I cannot help with that."],
      ["Hello!", "Hi.", "Go away."], ["yes", "no"]]
  assert records[0]["prompt"] == PAIR["prompt"] and records[0]["margin"] == 1.5
  assert records[1]["prompt"] == HH["chosen"][:HH["chosen"].rindex(ASSISTANT_TAG)] + ASSISTANT_TAG
  assert records[1]["prompt"].endswith("\n\nHuman: And then?\n\nAssistant:")
  assert [r["margin"] for r in records[1:]] == [None, None, None]
  assert records[0]["source"].startswith(f"{jsonl} record 1")
  assert records[1]["source"].startswith(f"{jsonl} record 2")
  assert records[2]["source"] == f"{tmp_path / 'b.json'} record 1"
  assert set(records[2]) == {"prompt", "responses", "margin", "source"}


@pytest.mark.parametrize("record, field, why", [
    ({"prompt": "Q", "chosen": "a"}, "'rejected'", "missing"),
    ({"prompt": "Q", "responses": ["only one"]}, "'responses'", "at least 2"),
    ({"prompt": "Q", "responses": "a, b"}, "'responses'", "list"),
    ({"prompt": "Q", "chosen": "Same. ", "rejected": "Same."}, "'chosen' and 'rejected'", "same"),
    ({"prompt": "Q", "responses": ["a", "b", "a"]}, "'responses[0]' and 'responses[2]'", "same"),
    ({"chosen": HH["chosen"], "rejected": HH["chosen"]}, "'chosen' and 'rejected'", "same"),
    ({"chosen": HH["chosen"], "rejected": HH["rejected"].replace("bread", "cake")},
     "'chosen' and 'rejected'", "differ before"),
    ({"chosen": "no turns here", "rejected": HH["rejected"]}, "'chosen'", "\\n\\nAssistant:"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "'prompt'", "empty"),
    ({"prompt": "Q", "chosen": "", "rejected": "b"}, "'chosen'", "empty"),
    ({"prompt": "Q", "responses": ["a", " \n"]}, "'responses[1]'", "empty"),
    ({"prompt": "Q", "chosen": "a", "rejected": 3}, "'rejected'", "string"),
    ({"prompt": ["Q"], "chosen": "a", "rejected": "b"}, "'prompt'", "string"),
    ({"prompt": "Q", "responses": ["a", None]}, "'responses[1]'", "string"),
    ({"chosen": HH["chosen"], "rejected": None}, "'rejected'", "string"),
    ({"prompt": "Q", "chosen": "a", "rejected": "b", "margin": "big"}, "'margin'", "number"),
    ({"text": "hello"}, "'chosen'/'rejected'", "neither"),
    ({"responses": ["a", "b"]}, "'prompt'", "missing"),
])
def test_errors_name_file_record_and_field(tmp_path, record, field, why):
  path = write_jsonl(tmp_path / "prefs.jsonl", [PAIR, record])
  with pytest.raises(DataError) as err:
    read_preference_records(path)
  message = str(err.value)
  assert f"{path} record 2 (line 2)" in message
  assert field in message and why in message, message


def test_bad_files(tmp_path):
  (tmp_path / "x.txt").write_text("hi")
  with pytest.raises(DataError, match="x.txt is not .json/.jsonl/.parquet"):
    read_preference_records(str(tmp_path / "x.txt"))
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(DataError, match="preference data is empty"):
    read_preference_records(str(tmp_path / "empty.jsonl"))
  (tmp_path / "bad.jsonl").write_text(json.dumps(PAIR) + "\n{oops\n")
  with pytest.raises(DataError, match="bad.jsonl record 2 \\(line 2\\): not valid JSON"):
    read_preference_records(str(tmp_path / "bad.jsonl"))


def test_tokenize_arrays_and_last_index(tok, tmp_path):
  records = read_preference_records(write_jsonl(tmp_path / "p.jsonl", [PAIR, RANKING, HH]))
  arrays, report = tokenize_preferences(records, tok, max_len=64)
  n, k, t = 3, 3, 64
  assert arrays["tokens_bkt"].shape == (n, k, t) and arrays["tokens_bkt"].dtype == np.int32
  np.testing.assert_array_equal(arrays["valid_bk"], [[1, 1, 0], [1, 1, 1], [1, 1, 0]])
  np.testing.assert_array_equal(arrays["margin_b"], [1.5, 0.0, 0.0])
  assert report.total == 3 and report.truncated == 0 and report.max_responses == 3
  eos = tok.eos_token_id
  for i, record in enumerate(records):
    prompt = enc(tok, record["prompt"])
    for j, response in enumerate(record["responses"]):
      want = prompt + enc(tok, response) + [eos]
      last = arrays["last_index_bk"][i, j]
      assert last == len(want) - 1 and arrays["tokens_bkt"][i, j, last] == eos
      np.testing.assert_array_equal(arrays["tokens_bkt"][i, j, :len(want)], want)
      np.testing.assert_array_equal(arrays["segment_ids_bkt"][i, j], np.arange(t) < len(want))
      np.testing.assert_array_equal(arrays["positions_bkt"][i, j, :len(want)],
                                    np.arange(len(want)))
      np.testing.assert_array_equal(arrays["response_mask_bkt"][i, j],
                                    (np.arange(t) >= len(prompt)) & (np.arange(t) < len(want)))
  # A padded response slot is all padding.
  assert not arrays["segment_ids_bkt"][0, 2].any() and arrays["last_index_bk"][0, 2] == 0


def test_tokenize_cuts_the_prompt_from_the_left_and_refuses_what_cannot_fit(tok):
  record = {"prompt": "The quick brown fox jumps over the lazy dog.", "responses": [" Four.",
            " It is four."], "margin": None, "source": "mem record 1"}
  prompt = enc(tok, record["prompt"])
  long_response = enc(tok, " It is four.") + [tok.eos_token_id]
  max_len = len(prompt) + len(long_response) - 3
  arrays, report = tokenize_preferences([record], tok, max_len=max_len)
  assert report.truncated == 1 and "1 truncated" in str(report)
  kept = prompt[3:]  # the same cut for both responses keeps them comparable
  for j, response in enumerate(record["responses"]):
    want = kept + enc(tok, response) + [tok.eos_token_id]
    np.testing.assert_array_equal(arrays["tokens_bkt"][0, j, :len(want)], want)
    assert arrays["last_index_bk"][0, j] == len(want) - 1
  assert arrays["last_index_bk"][0, 1] == max_len - 1
  with pytest.raises(DataError, match="mem record 1: field 'prompt' is .* a prompt longer than "
                                      "the max length"):
    tokenize_preferences([record], tok, max_len=len(prompt))
  short_prompt = dict(record, prompt="Q")
  with pytest.raises(DataError, match="mem record 1: field responses\\[1\\] .* no room"):
    tokenize_preferences([short_prompt], tok, max_len=len(long_response))
  with pytest.raises(ConfigError, match="max_len"):
    tokenize_preferences([record], tok, max_len=1)
  with pytest.raises(DataError, match="record 1: not a normalised"):
    tokenize_preferences([{"prompt": "Q", "chosen": "a", "rejected": "b"}], tok, max_len=8)


def test_split_and_prompt_ids(tok):
  records = [{"prompt": f"Q{i}{ASSISTANT_TAG}", "responses": ["a", "b"], "margin": None,
              "source": f"f record {i + 1}"} for i in range(10)]
  train, held = split_preferences(records, eval_fraction=0.2, seed=3)
  assert len(train) == 8 and len(held) == 2
  assert sorted(r["source"] for r in train + held) == sorted(r["source"] for r in records)
  assert split_preferences(records, eval_count=3, seed=3)[1] != [] and split_preferences(
      records, eval_count=3, seed=3) == split_preferences(records, eval_count=3, seed=3)
  with pytest.raises(ConfigError):
    split_preferences(records, eval_fraction=0.1, eval_count=1)
  with pytest.raises(DataError, match="too few"):
    split_preferences(records[:1], eval_count=1)
  # Folds: fold 0 is the plain split; folds 0..4 of 2 records hold out every record exactly once,
  # and each fold's train part is the rest.
  assert split_preferences(records, eval_count=2, seed=3, fold=0) == split_preferences(
      records, eval_count=2, seed=3)
  folds = [split_preferences(records, eval_count=2, seed=3, fold=i) for i in range(5)]
  held_out = [r["source"] for _, held in folds for r in held]
  assert sorted(held_out) == sorted(r["source"] for r in records)
  for train, held in folds:
    assert len(held) == 2 and sorted(r["source"] for r in train + held) == sorted(
        r["source"] for r in records)
  with pytest.raises(DataError, match=r"eval_fold=5 holds out records 11..12 .* folds are 0..4"):
    split_preferences(records, eval_count=2, seed=3, fold=5)
  with pytest.raises(ConfigError, match="eval_fold=1 with no held-out"):
    split_preferences(records, eval_count=0, fold=1)
  ids = prompt_ids(records, tok, max_prompt_len=3)
  tag = enc(tok, ASSISTANT_TAG)
  assert all(len(x) <= 3 for x in ids)
  full = prompt_ids(records, tok, max_prompt_len=1000)
  assert all(x == f[-3:] and f[-len(tag):] == tag for x, f in zip(ids, full))
  with pytest.raises(DataError, match="f record 1: field 'prompt'"):
    prompt_ids([dict(records[0], prompt="")], tok, 4)


def test_hh_rlhf_harmless_pairs(shared_data, tok):
  path = shared_data / "hh_rlhf_harmless_test_500.jsonl"
  if not path.is_file():
    pytest.skip(f"{path} is absent")
  records = read_preference_records(str(path))
  assert len(records) == 500
  assert all(r["prompt"].endswith(ASSISTANT_TAG) and r["prompt"].startswith("\n\nHuman:")
             for r in records)
  assert all(len(r["responses"]) == 2 for r in records)
  lines = path.read_text().splitlines()
  raw = json.loads(lines[0])
  assert records[0]["prompt"] + records[0]["responses"][0] == raw["chosen"]
  assert records[0]["prompt"] + records[0]["responses"][1] == raw["rejected"]
  # Record 87 ends the chosen dialogue with an empty assistant turn: kept, not refused.
  assert records[86]["responses"][0] == " "
  ids = prompt_ids(records, tok, max_prompt_len=16)
  tag = tok.decode(enc(tok, ASSISTANT_TAG))
  assert all(tok.decode(x).endswith(tag) for x in ids)
  arrays, report = tokenize_preferences(records[:50], tok, max_len=2048)
  last_bk = arrays["last_index_bk"]
  assert (np.take_along_axis(arrays["tokens_bkt"], last_bk[..., None], -1)[..., 0]
          == tok.eos_token_id).all()
  assert report.truncated == 0 and arrays["valid_bk"].all()


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_records_render_prompts_as_template_turns(tok, tmp_path):
  """data.chat_template: an hh-rlhf dialogue becomes its turns (Human -> user, Assistant ->
  assistant) and a plain prompt one user turn, with the assistant turn opened; responses lose their
  leading space and end with the EOS, where the score is read. No template: records unchanged."""
  records = read_preference_records(write_jsonl(tmp_path / "p.jsonl", [HH, PAIR]))
  assert chat_records(records, tok) == records
  chat_tok = copy.deepcopy(tok)
  chat_tok.chat_template = CHATML
  chat = chat_records(records, chat_tok)
  assert chat[0]["prompt"] == (
      "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\nMix flour and "
      "water.<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n")
  assert chat[0]["responses"] == ["Bake it.", "I cannot help with that."]
  assert chat[1]["prompt"] == ("<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
                               "<|im_start|>assistant\n")
  assert chat[1]["responses"] == ["Four.", "Five."] and chat[1]["margin"] == 1.5
  arrays, _ = tokenize_preferences(chat, chat_tok, max_len=128)
  row = arrays["tokens_bkt"][1, 0]
  last = arrays["last_index_bk"][1, 0]
  assert row[last] == chat_tok.eos_token_id
  assert row[:last].tolist() == enc(chat_tok, chat[1]["prompt"]) + enc(chat_tok, "Four.")
  chat_tok.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
  with pytest.raises(DataError, match=r"p.jsonl record 1.*chat template.*alternate.*"
                     r"data.chat_template=False"):
    chat_records(records, chat_tok)
