"""Renders a conversation into text segments that are either prompt (no loss) or response (loss):
through the tokenizer's own chat template when it has one, else through the plain template below.

Plain template (used when `tokenizer.chat_template` is unset), one block per message, in order:

    <|system|>\n{system}\n
    <|user|>\n{user}\n
    <|assistant|>\n{assistant}<EOS>

so a single-turn exchange reads `<|user|>\n{user}\n<|assistant|>\n{assistant}<EOS>` and further
turns follow the EOS directly. `<EOS>` is the tokenizer's EOS id appended as a token (never parsed
from text); the role markers are ordinary text, not special tokens. Loss falls on `{assistant}` and
its EOS only, so the model learns to answer and to stop.

With a tokenizer chat template, each assistant turn's response is the text that
`apply_chat_template(messages[:i + 1])` adds after `apply_chat_template(messages[:i],
add_generation_prompt=True)`: its content plus whatever end-of-turn text the template writes after
it (e.g. `<|im_end|>\n`), all of which carries loss. Nothing is appended; the template decides how a
turn ends.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import transformers

from research.errors import DataError

KNOWN_ROLES = ("system", "user", "assistant")
PLAIN_HEADERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
Message = dict[str, str]


class Segment(NamedTuple):
  """A run of text tokenized on its own. `response` marks text the model is trained to produce;
  `eos` appends the tokenizer's EOS id after the text, with the same loss flag."""
  text: str
  response: bool
  eos: bool = False


def has_chat_template(tokenizer: transformers.PreTrainedTokenizerBase) -> bool:
  """Whether `render_segments` will use the tokenizer's own template instead of the plain one."""
  return bool(getattr(tokenizer, "chat_template", None))


def render_segments(messages: Sequence[Message], tokenizer: transformers.PreTrainedTokenizerBase,
                    where: str = "conversation") -> list[Segment]:
  """The conversation as prompt and response segments, in order; concatenated, the texts (with EOS
  where `eos` is set) are the whole rendered conversation. `where` names the record in errors."""
  if has_chat_template(tokenizer):
    return _template_segments(messages, tokenizer, where)
  return plain_segments(messages, where)


def plain_segments(messages: Sequence[Message], where: str = "conversation") -> list[Segment]:
  """The plain template (see the module docstring): prompt text up to each assistant turn's
  content, then that content with EOS as a response segment."""
  segments: list[Segment] = []
  prompt = ""
  for i, message in enumerate(messages):
    role = message["role"]
    if role not in PLAIN_HEADERS:
      raise DataError(f"{where}: field messages[{i}].role is {role!r}, which the plain template "
                      f"does not know; use one of {', '.join(KNOWN_ROLES)}")
    if role == "assistant":
      segments.append(Segment(prompt + PLAIN_HEADERS[role], False))
      segments.append(Segment(message["content"], True, eos=True))
      prompt = ""
    else:
      prompt += PLAIN_HEADERS[role] + message["content"] + "\n"
  if prompt:
    raise DataError(f"{where}: field messages[{len(messages) - 1}] must be an assistant turn: "
                    "the conversation has to end with the response to train on")
  return segments


def _template_segments(messages: Sequence[Message],
                       tokenizer: transformers.PreTrainedTokenizerBase,
                       where: str) -> list[Segment]:
  # Render every prefix that ends just before / just after an assistant turn: each must extend the
  # previous one, so the text in between is exactly that turn's prompt or response.
  segments: list[Segment] = []
  done = ""
  for i, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    prompt = _render(tokenizer, messages[:i], True, where)
    full = _render(tokenizer, messages[:i + 1], False, where)
    if not prompt.startswith(done) or not full.startswith(prompt):
      shown = done if not prompt.startswith(done) else prompt
      other = prompt if not prompt.startswith(done) else full
      raise DataError(
          f"{where}: the tokenizer's chat template is not incremental at messages[{i}] (the "
          f"assistant turn): the rendered prefix {_tail(shown)} is not a prefix of the longer "
          f"rendering {_tail(other)}, so response tokens cannot be told apart; unset "
          "tokenizer.chat_template to use the plain template or use a template that renders "
          "earlier turns the same way whatever follows")
    if full == prompt:
      raise DataError(f"{where}: the tokenizer's chat template renders field "
                      f"messages[{i}].content (an assistant turn) as no text; fix the template")
    segments.append(Segment(prompt[len(done):], False))
    segments.append(Segment(full[len(prompt):], True))
    done = full
  if not segments or messages[-1]["role"] != "assistant":
    raise DataError(f"{where}: field messages[{len(messages) - 1}] must be an assistant turn: "
                    "the conversation has to end with the response to train on")
  return segments


def _render(tokenizer: transformers.PreTrainedTokenizerBase, messages: Sequence[Message],
            add_generation_prompt: bool, where: str) -> str:
  try:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
  except Exception as e:  # noqa: BLE001 - jinja and template-raised errors name the record
    raise DataError(f"{where}: the tokenizer's chat template failed on the first {len(messages)} "
                    f"message(s): {type(e).__name__}: {e}; fix the record or the template") from e
  if not isinstance(text, str):
    raise DataError(f"{where}: the tokenizer's chat template returned {type(text).__name__}, "
                    "not text")
  return text


def _tail(text: str, width: int = 60) -> str:
  return repr(text if len(text) <= width else "..." + text[-width:])


def chat_prompt(messages: Sequence[Message], tokenizer: transformers.PreTrainedTokenizerBase,
                where: str = "conversation") -> str:
  """The text that asks for the next assistant turn after `messages`, rendered as SFT renders a
  prompt: the tokenizer's template with its generation prompt, else the plain template's headers."""
  if has_chat_template(tokenizer):
    return _render(tokenizer, messages, True, where)
  text = ""
  for i, message in enumerate(messages):
    if message["role"] not in PLAIN_HEADERS:
      raise DataError(f"{where}: field messages[{i}].role is {message['role']!r}, which the plain "
                      f"template does not know; use one of {', '.join(KNOWN_ROLES)}")
    text += PLAIN_HEADERS[message["role"]] + message["content"] + "\n"
  return text + PLAIN_HEADERS["assistant"]
