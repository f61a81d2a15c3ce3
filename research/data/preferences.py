"""Preference data for reward models and PPO: pairwise, hh-rlhf dialogue and K-wise ranking
records -> one normalised form -> `[records, K, max_len]` token arrays; the split; rollout prompts."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Sequence

import numpy as np
import transformers

from research.data.chat_template import has_chat_template
from research.data.corpus import resolve_corpus_files
from research.data.loader import holdout_split, tokenize_corpus
from research.data.sft import SFT_EXTENSIONS, _raw_records
from research.errors import ConfigError, DataError

PREFERENCE_EXTENSIONS = SFT_EXTENSIONS
ASSISTANT_TAG = "\n\nAssistant:"  # hh-rlhf's turn marker; a prompt ends with it
HUMAN_TAG = "\n\nHuman:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
Record = dict
Arrays = dict[str, np.ndarray]


def read_preference_records(paths: list[str] | str) -> list[Record]:
  """Reads preference records from .json (one array, or JSON lines), .jsonl and .parquet files.

  `paths` are files, directories or globs as for `read_corpus`. Each record is one of
    pairwise   `prompt`, `chosen`, `rejected` (the two responses to the prompt), optional `margin`;
    hh-rlhf    `chosen`, `rejected` without `prompt`: each a whole dialogue
               `\\n\\nHuman: ... \\n\\nAssistant: ...`. The prompt is everything up to and
               including the last "\\n\\nAssistant:" and must be the same in both; the responses
               are what follows it (with their leading space);
    ranking    `prompt`, `responses` (a list of at least 2, best first), optional `margin`.
  The form is decided per record (`responses`, else `prompt`, else hh-rlhf). Extra fields are
  ignored. Records come back normalised, `{"prompt": str, "responses": [str, ...] (best first),
  "margin": float | None, "source": "<file> record <n>"}`, in file then record order.

  A bad record raises `DataError` naming the file, its 1-based record number and the field:
  missing or non-string fields, an empty prompt or response, fewer than 2 responses, two
  responses with the same text, hh-rlhf dialogues whose prompts differ, a non-numeric margin.
  One exception: an hh-rlhf dialogue may end with an empty assistant turn, kept as is (e.g. " "):
  there the turn is in the data, a deliberate non-answer (the harmless-base test split has one),
  where an empty `chosen` string in the other forms looks like a lost value.
  """
  files = resolve_corpus_files([paths] if isinstance(paths, str) else list(paths))
  records: list[Record] = []
  for path in files:
    if not path.lower().endswith(PREFERENCE_EXTENSIONS):
      raise DataError(f"preference file {path} is not {'/'.join(PREFERENCE_EXTENSIONS)}: convert "
                      "it to JSON lines with prompt/chosen/rejected, chosen/rejected dialogues or "
                      "prompt/responses fields")
    for where, record in _raw_records(path):
      records.append(normalize_preference_record(record, where))
  if not records:
    raise DataError(f"the preference data is empty: {', '.join(files)} hold no record; add "
                    "records or point to other files")
  return records


def normalize_preference_record(record: object, where: str) -> Record:
  """Checks one raw record (any of the three forms) and returns it normalised (see
  `read_preference_records`); `where` names it in errors and becomes its `source`."""
  if not isinstance(record, dict):
    raise DataError(f"{where}: expected a JSON object with preference fields, got "
                    f"{type(record).__name__}")
  if "responses" in record:
    prompt = _prompt(record, where)
    responses = record["responses"]
    if not isinstance(responses, list):
      raise DataError(f"{where}: field 'responses' must be a list of strings, best first, got "
                      f"{type(responses).__name__}")
    names = [f"responses[{i}]" for i in range(len(responses))]
    for name, response in zip(names, responses):
      _check_response(response, name, where)
  elif "chosen" in record or "rejected" in record:
    for field in ("chosen", "rejected"):
      if field not in record:
        raise DataError(f"{where}: missing field {field!r} (has {sorted(record)}); a pair needs "
                        "both 'chosen' and 'rejected'")
    names = ["chosen", "rejected"]
    if record.get("prompt") is not None:
      prompt = _prompt(record, where)
      responses = [record["chosen"], record["rejected"]]
      for name, response in zip(names, responses):
        _check_response(response, name, where)
    else:
      prompt, responses = _split_dialogues(record["chosen"], record["rejected"], where)
  else:
    raise DataError(f"{where}: has neither 'chosen'/'rejected' (a pair, with or without "
                    f"'prompt') nor 'prompt'/'responses' (a ranking), only {sorted(record)}; "
                    "rename the fields or convert the file")
  if len(responses) < 2:
    raise DataError(f"{where}: field 'responses' holds {len(responses)} response(s): a ranking "
                    "needs at least 2, best first; add responses or drop the record")
  seen: dict[str, int] = {}
  for i, response in enumerate(responses):
    key = response.strip()
    if key in seen:
      raise DataError(f"{where}: fields {names[seen[key]]!r} and {names[i]!r} hold the same "
                      f"text {_short(response)}: a preference between identical responses "
                      "teaches nothing; fix or drop the record")
    seen[key] = i
  return {"prompt": prompt, "responses": list(responses), "margin": _margin(record, where),
          "source": where}


def _prompt(record: dict, where: str) -> str:
  if "prompt" not in record:
    raise DataError(f"{where}: missing field 'prompt' (has {sorted(record)}); a ranking needs "
                    "prompt and responses")
  prompt = record["prompt"]
  if not isinstance(prompt, str):
    raise DataError(f"{where}: field 'prompt' must be a string, got {type(prompt).__name__}")
  if not prompt.strip():
    raise DataError(f"{where}: field 'prompt' is empty: the responses answer nothing; fill it in "
                    "or drop the record")
  return prompt


def _check_response(response: object, field: str, where: str) -> None:
  if not isinstance(response, str):
    raise DataError(f"{where}: field {field!r} must be a string, got {type(response).__name__}")
  if not response.strip():
    raise DataError(f"{where}: field {field!r} is empty: there is no response to rank; fill it "
                    "in or drop the record")


def _split_dialogues(chosen: object, rejected: object, where: str) -> tuple[str, list[str]]:
  """hh-rlhf: the shared prompt through the last assistant tag, and the two final answers."""
  prompts, responses = [], []
  for field, text in (("chosen", chosen), ("rejected", rejected)):
    if not isinstance(text, str):
      raise DataError(f"{where}: field {field!r} must be a string, got {type(text).__name__}")
    cut = text.rfind(ASSISTANT_TAG)
    if cut < 0:
      raise DataError(f"{where}: field {field!r} has no {ASSISTANT_TAG!r} turn: without a "
                      "'prompt' field, 'chosen' and 'rejected' must hold whole hh-rlhf dialogues "
                      "('\\n\\nHuman: ... \\n\\nAssistant: ...') ending with the answer; add a "
                      "'prompt' field or fix the text")
    cut += len(ASSISTANT_TAG)
    prompts.append(text[:cut])
    responses.append(text[cut:])
  if prompts[0] != prompts[1]:
    at = len(os.path.commonprefix(prompts))
    raise DataError(f"{where}: fields 'chosen' and 'rejected' hold dialogues that differ before "
                    f"their final {ASSISTANT_TAG!r} turn (at character {at}: 'chosen' has "
                    f"{_short(prompts[0][at:])}, 'rejected' has {_short(prompts[1][at:])}): an "
                    "hh-rlhf pair must share everything but the last answer; fix or drop it")
  if not prompts[0][:-len(ASSISTANT_TAG)].strip():
    raise DataError(f"{where}: field 'chosen' has nothing before its final {ASSISTANT_TAG!r}: "
                    "the prompt is empty; fill it in or drop the record")
  return prompts[0], responses


def _margin(record: dict, where: str) -> float | None:
  margin = record.get("margin")
  if margin is None:
    return None
  if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
    raise DataError(f"{where}: field 'margin' must be a finite number (how much better the first "
                    f"response is), got {_short(margin)}; fix it or leave it out")
  return float(margin)


def _short(value: object, width: int = 40) -> str:
  text = repr(value)
  return text if len(text) <= width else text[:width] + "..."


@dataclasses.dataclass
class PreferenceReport:
  """What `tokenize_preferences` did to fit records into `max_len` tokens; log `str(report)`."""
  max_len: int
  total: int = 0
  truncated: int = 0
  max_tokens: int = 0  # the longest prompt + response + EOS before any cut
  max_responses: int = 0  # K of the arrays

  def __str__(self) -> str:
    return (f"preference records: {self.total} total, {self.truncated} truncated (prompt cut "
            f"from the left to fit max_len={self.max_len}); longest {self.max_tokens} tokens; "
            f"up to {self.max_responses} responses each")


def prompt_messages(prompt: str) -> list[dict[str, str]]:
  """A preference prompt as chat messages: an hh-rlhf dialogue (`\\n\\nHuman: ... \\n\\nAssistant:`)
  turn by turn (Human -> user, Assistant -> assistant, each turn's text stripped, the final empty
  assistant tag dropped); any other prompt as one user turn."""
  if prompt.startswith(HUMAN_TAG) and prompt.endswith(ASSISTANT_TAG):
    parts = _HH_TURN.split(prompt[:-len(ASSISTANT_TAG)])  # ["", tag, text, tag, text, ...]
    return [{"role": _HH_ROLES[tag], "content": text.strip()}
            for tag, text in zip(parts[1::2], parts[2::2])]
  return [{"role": "user", "content": prompt.strip()}]


def chat_records(records: Sequence[Record], tokenizer: transformers.PreTrainedTokenizerBase,
                 ) -> list[Record]:
  """Normalised records with each prompt rendered through the tokenizer's chat template (the
  messages of `prompt_messages`, the assistant turn opened as at generation time) and each
  response stripped of surrounding whitespace. The EOS that `tokenize_preferences` appends closes
  the assistant turn, as it stops generation: for an instruct tokenizer it is the template's
  end-of-turn token (`<|im_end|>` in ChatML, `<|eot_id|>` in Llama 3). Records come back unchanged
  when the tokenizer has no chat template."""
  if not has_chat_template(tokenizer):
    return list(records)
  out = []
  for number, record in enumerate(records, start=1):
    where, prompt, responses, _ = _checked_record(record, number)
    try:
      text = tokenizer.apply_chat_template(prompt_messages(prompt), tokenize=False,
                                           add_generation_prompt=True)
    except Exception as e:  # jinja's TemplateError and the template's own raise_exception
      raise DataError(f"{where}: the tokenizer's chat template refuses this prompt's turns "
                      f"({e}); set data.chat_template=False to use the text as it is") from e
    out.append({**record, "prompt": text, "responses": [r.strip() for r in responses]})
  return out


LONG_PROMPT_POLICIES = ("error", "truncate")


def tokenize_preferences(records: Sequence[Record], tokenizer: transformers.PreTrainedTokenizerBase,
                         max_len: int, long_prompts: str = "error",
                         ) -> tuple[Arrays, PreferenceReport]:
  """Normalised records -> one right-padded row of `max_len` tokens per (record, response).

  Row (n, k) holds `prompt ids + ids of response k + EOS`; prompt and response are tokenized
  separately (as the prompt is at generation time), with no special tokens, no template. Returns
    tokens_bkt         int32 [N, K, T]  pad id (else EOS) at padding
    segment_ids_bkt    int32 [N, K, T]  1 on real tokens, 0 on padding
    positions_bkt      int32 [N, K, T]  0, 1, ... on real tokens, 0 on padding
    response_mask_bkt  float32 [N, K, T]  1 on the response tokens and the EOS
    last_index_bk      int32 [N, K]  index of the last real token, the EOS: where the score
                       head reads (0 for a padded response)
    valid_bk           bool [N, K]  K is the most responses any record has; False pads
    margin_b           float32 [N]  the record's margin, 0 when it has none
  with T = max_len. Fitting: responses are never cut (the score is read at their end). When
  prompt + the longest response + EOS exceeds `max_len`, the prompt is cut from the left by the
  same amount for all of the record's responses (they stay comparable), counted in
  `report.truncated`. A prompt of `max_len` tokens or more (no response token would fit after it)
  raises `DataError` with `long_prompts="error"`; with `"truncate"` it is cut from the left like
  any other over-long prompt (and counted), and a response that leaves no room for one prompt
  token is cut from the right to `max_len - 2` tokens + EOS; with `"error"` that raises.
  """
  if long_prompts not in LONG_PROMPT_POLICIES:
    raise ConfigError(f"long_prompts={long_prompts!r} is not one of {LONG_PROMPT_POLICIES}")
  if max_len < 2:
    raise ConfigError(f"max_len={max_len} must be >= 2 (a prompt token and the EOS)")
  eos_id = tokenizer.eos_token_id
  if eos_id is None:
    raise DataError("the tokenizer has no eos_token: load it with "
                    "research.data.tokenizer.load_tokenizer")
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
  checked = [_checked_record(record, number) for number, record in enumerate(records, start=1)]
  texts = [text for _, prompt, responses, _ in checked for text in [prompt, *responses]]
  ids_s = tokenize_corpus(texts, tokenizer)

  num_k = max((len(responses) for _, _, responses, _ in checked), default=0)
  report = PreferenceReport(max_len=max_len, total=len(checked), max_responses=num_k)
  shape = (len(checked), num_k, max_len)
  arrays = {
      "tokens_bkt": np.full(shape, pad_id, np.int32),
      "segment_ids_bkt": np.zeros(shape, np.int32),
      "positions_bkt": np.zeros(shape, np.int32),
      "response_mask_bkt": np.zeros(shape, np.float32),
      "last_index_bk": np.zeros(shape[:2], np.int32),
      "valid_bk": np.zeros(shape[:2], bool),
      "margin_b": np.array([margin or 0.0 for *_, margin in checked], np.float32).reshape(-1),
  }
  eos_1 = np.array([eos_id], np.int32)
  s = 0
  for n, (where, _, responses, _) in enumerate(checked):
    prompt_p = ids_s[s]
    responses_k = [np.concatenate([ids_s[s + 1 + k], eos_1]) for k in range(len(responses))]
    s += 1 + len(responses)
    longest = max(len(r) for r in responses_k)
    report.max_tokens = max(report.max_tokens, len(prompt_p) + longest)
    if len(prompt_p) >= max_len and long_prompts == "error":
      raise DataError(f"{where}: field 'prompt' is {len(prompt_p)} tokens, a prompt longer than "
                      f"the max length (max_len={max_len}) leaves no room for a response token; "
                      "raise max_len, shorten or drop the record, or set long_prompts="
                      "'truncate' (--config.data.long_prompts=truncate)")
    room = max_len - longest
    cut = False
    if room < 1 and long_prompts == "truncate":
      # Keep one prompt token; cut over-long responses from the right (their EOS stays last).
      cap = max_len - 2
      responses_k = [np.concatenate([r[:-1][:cap], eos_1]) for r in responses_k]
      longest = max(len(r) for r in responses_k)
      room = max_len - longest
      cut = True
    if room < 1:
      k = max(range(len(responses_k)), key=lambda i: len(responses_k[i]))
      raise DataError(f"{where}: field responses[{k}] is {longest - 1} tokens + EOS, which leaves "
                      f"no room for the prompt in max_len={max_len} (responses are never cut: "
                      "the score is read at their end); raise max_len or drop the record")
    if len(prompt_p) > room:
      prompt_p = prompt_p[len(prompt_p) - room:]
      cut = True
    report.truncated += cut
    for k, response in enumerate(responses_k):
      length = len(prompt_p) + len(response)
      arrays["tokens_bkt"][n, k, :length] = np.concatenate([prompt_p, response])
      arrays["segment_ids_bkt"][n, k, :length] = 1
      arrays["positions_bkt"][n, k, :length] = np.arange(length)
      arrays["response_mask_bkt"][n, k, len(prompt_p):length] = 1.0
      arrays["last_index_bk"][n, k] = length - 1
      arrays["valid_bk"][n, k] = True
  return arrays, report


def _checked_record(record: object, number: int) -> tuple[str, str, list[str], float | None]:
  """(where, prompt, responses, margin) of a normalised record; light checks, as
  `read_preference_records` did the full ones."""
  where = f"record {number}"
  if isinstance(record, dict) and isinstance(record.get("source"), str):
    where = record["source"]
  if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not (
      isinstance(record.get("responses"), list) and len(record["responses"]) >= 2
      and all(isinstance(r, str) for r in record["responses"])):
    raise DataError(f"{where}: not a normalised preference record (prompt: str, responses: at "
                    "least 2 strings, margin, source): read it with read_preference_records or "
                    "pass it through normalize_preference_record")
  margin = record.get("margin")
  if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
    raise DataError(f"{where}: field 'margin' must be a number or None, got {_short(margin)}")
  return where, record["prompt"], record["responses"], margin


def split_preferences(records: Sequence[Record], eval_fraction: float | None = None,
                      eval_count: int | None = None, seed: int = 0, fold: int = 0,
                      ) -> tuple[list, list]:
  """Holds out whole records (a prompt with all its responses) for eval (see
  `loader.holdout_split`, `fold` included)."""
  return holdout_split(records, eval_fraction, eval_count, seed, "the preference data", "record",
                       fold)


def read_preference_splits(path: str, eval_count: int, seed: int, fold: int = 0,
                           ) -> tuple[list, list]:
  """(train, held-out) records from `path`, comma-separated json/jsonl/parquet files (a config's
  `data.path`), split as `split_preferences` does."""
  paths = [p.strip() for p in path.split(",") if p.strip()]
  if not paths:
    raise ConfigError("data.path is empty: name the preference json/jsonl/parquet file(s)")
  return split_preferences(read_preference_records(paths), eval_count=eval_count, seed=seed,
                           fold=fold)


def prompt_ids(records: Sequence[Record], tokenizer: transformers.PreTrainedTokenizerBase,
               max_prompt_len: int) -> list[list[int]]:
  """Token ids of each record's prompt for PPO rollouts (any record with a `prompt` string; no
  special tokens, as in `tokenize_preferences`), cut from the left to at most `max_prompt_len`
  so the end of the prompt (for hh-rlhf: the final "\\n\\nAssistant:") stays next to the
  generated tokens."""
  if max_prompt_len < 1:
    raise ConfigError(f"max_prompt_len={max_prompt_len} must be positive")
  prompts = []
  for number, record in enumerate(records, start=1):
    prompt = record.get("prompt") if isinstance(record, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
      where = record.get("source", f"record {number}") if isinstance(record, dict) else (
          f"record {number}")
      raise DataError(f"{where}: field 'prompt' must be a non-empty string, got "
                      f"{_short(prompt)}; read the records with read_preference_records")
    prompts.append(prompt)
  return [ids[-max_prompt_len:].tolist() for ids in tokenize_corpus(prompts, tokenizer)]
