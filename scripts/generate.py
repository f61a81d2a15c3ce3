"""Print continuations of prompts from a run directory or a Hugging Face model directory.

  python scripts/generate.py --checkpoint=WORKDIR_OR_HF_DIR --prompt="def " [--prompt=...]
      [--prompts_file=F.txt|F.jsonl] [--max_new_tokens=64] [--temperature=0] [--top_p=1]
      [--top_k=0] [--repetition_penalty=1] [--seed=0] [--step=N] [--stop=STR_OR_ID ...]
      [--tokenizer=DIR] [--batch_size=8] [--format=text|jsonl] [--no-add_special_tokens]
      [--chat [--system=TEXT]]

--temperature=0 decodes greedily; --repetition_penalty is transformers' (applied before
temperature and filtering). EOS (the model's and the tokenizer's; a Hugging Face dir's
generation_config.json ids too) always stops a row; --stop adds token ids (an integer) or strings
(backslash escapes such as '\\n' are read; a string the generated text is cut before). Runs trained
with LoRA have it merged; prompt tuning and adapters decode with their PEFT modules. A prompts file
holds one prompt per line, or is a .jsonl with a "prompt" field per line (prompts with newlines).
Prints per prompt a `==> [i] 'prompt' <==` line, the continuation and a blank line; --format=jsonl
prints a JSON object per prompt (prompt, text, tokens, stop_reason) instead. --chat sends each
prompt as a user turn (after a --system turn) through the tokenizer's chat template, or the plain
template SFT uses when it has none, and asks for the assistant's reply. --checkpoint=fetch:NAME
is a model of research/interop/model_zoo.py, fetched into the cache on first use.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from typing import Any, Sequence

# `python scripts/generate.py` puts scripts/ first on sys.path, not the repo root; without an
# editable install (or with one pointing at another checkout) `research` would not be this one.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from research.errors import CheckpointError, ConfigError, DataError, UserError  # noqa: E402

# Prompts are left-padded to a multiple of this, and a short last batch is filled with repeats,
# so that prompts of similar lengths share one compiled decoding loop.
_PAD_MULTIPLE = 16
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclasses.dataclass(frozen=True)
class Completion:
  prompt: str
  text: str  # the continuation: without its stop token, cut before a stop string
  tokens: list[int]  # the ids generated, a stop token (EOS, --stop id) excluded
  stop_reason: str  # "stop_token", "stop_string" or "length"


# Generations at least this long report progress every PROGRESS_EVERY tokens (stderr).
LONG, PROGRESS_EVERY = 1024, 256

def read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
  """--prompt values, then the file's: one per line (blank lines skipped), or .jsonl "prompt"s."""
  out = list(prompts)
  if prompts_file:
    if not os.path.isfile(prompts_file):
      raise DataError(f"prompts file {prompts_file} does not exist")
    try:
      with open(prompts_file, encoding="utf-8") as f:
        lines = f.read().splitlines()
    except UnicodeDecodeError as e:
      raise DataError(f"prompts file {prompts_file} is not UTF-8 text: {e}") from e
    for n, line in enumerate(lines, 1):
      if not line.strip():
        continue
      if prompts_file.endswith(".jsonl"):
        try:
          record = json.loads(line)
        except ValueError as e:
          raise DataError(f"{prompts_file} line {n} is not JSON: {e}") from e
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
          raise DataError(f"{prompts_file} line {n} has no string field 'prompt'")
        out.append(record["prompt"])
      else:
        out.append(line)
  empty = [i for i, p in enumerate(out, 1) if not p]
  if empty:
    raise DataError(f"prompt {empty[0]} is empty: a model continues text, so give at least one "
                    "character (--prompt=TEXT)")
  if not out:
    where = f" ({prompts_file} holds none)" if prompts_file else ""
    raise DataError(f"no prompts to continue{where}: pass --prompt=TEXT or --prompts_file=FILE")
  return out


def unescape(text: str) -> str:
  """'\\n' typed on a command line -> a newline; other characters (non-ASCII included) stay."""
  return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def _eos_ids(value: Any) -> set[int]:
  if value is None:
    return set()
  return {int(v) for v in (value if isinstance(value, (list, tuple)) else [value])}


def load_checkpoint(path: str, step: int | None, tokenizer_dir: str | None):
  """(model config, PEFT config, params, tokenizer, EOS ids) from a workdir or an HF model dir."""
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint {path} is not a directory: give a run directory "
                          "(model_config.json) or a Hugging Face model directory (config.json)")
  # Imported only now so that bad flags and missing files are reported before jax starts.
  import jax

  from research.data.tokenizer import load_tokenizer
  from research.models.heads import SCORE_HEAD, VALUE_HEAD
  from research.models.peft import NO_PEFT, merge_lora
  from research.parallel.mesh import make_mesh
  from research.train import workdir as wd

  eos: set[int] = set()
  if wd.is_workdir(path):
    if wd.read_head(path) == SCORE_HEAD:
      raise CheckpointError(f"{path} is a reward model (score head), not a language model")
    tok = tokenizer_dir or wd.tokenizer_dir(path)
    if tok is None:
      raise CheckpointError(f"{path} has no {wd.TOKENIZER_DIR}/ directory: pass --tokenizer=DIR")
    tokenizer = load_tokenizer(tok)
    # One device: a run's mesh would replicate the weights (and the decoding) over every device.
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    cfg, peft, params, _, _ = wd.load_run(path, step, mesh)
    params = {k: v for k, v in params.items() if k not in (SCORE_HEAD, VALUE_HEAD)}
    if peft.method == "lora":  # merged once here, not two extra matmuls per projection per token
      params, peft = jax.jit(lambda p: merge_lora(p, peft))(params), NO_PEFT
  elif os.path.isfile(os.path.join(path, "config.json")):
    from research.interop.hf_import import load_hf_checkpoint
    if step is not None:
      raise ConfigError(f"--step={step} picks a checkpoint of a run directory; {path} is a "
                        "Hugging Face model directory with one set of weights")
    tok = tokenizer_dir or path
    if not any(os.path.isfile(os.path.join(tok, name)) for name in _TOKENIZER_FILES):
      raise CheckpointError(f"no tokenizer in {tok} (none of {', '.join(_TOKENIZER_FILES)}): pass "
                            "--tokenizer=DIR")
    tokenizer = load_tokenizer(tok)
    cfg, params = load_hf_checkpoint(path)
    peft = NO_PEFT
    for name in ("config.json", "generation_config.json"):  # either may list several EOS ids
      file = os.path.join(path, name)
      if os.path.isfile(file):
        try:
          with open(file) as f:
            eos |= _eos_ids(json.load(f).get("eos_token_id"))
        except (ValueError, TypeError, AttributeError) as e:
          raise CheckpointError(f"{file}: cannot read eos_token_id: {e}") from e
  else:
    raise CheckpointError(f"{path} is neither a run directory ({wd.MODEL_CONFIG}) nor a Hugging "
                          "Face model directory (config.json)")
  if len(tokenizer) > cfg.vocab_size:
    raise CheckpointError(f"the tokenizer in {tok} has {len(tokenizer)} tokens but the model's "
                          f"vocab_size is {cfg.vocab_size}: pass the tokenizer it was trained with")
  eos |= _eos_ids(cfg.eos_token_id) | _eos_ids(tokenizer.eos_token_id)
  return cfg, peft, params, tokenizer, eos


def parse_stops(values: Sequence[str], vocab_size: int) -> tuple[set[int], list[str]]:
  """(stop token ids, stop strings) from --stop values: an integer is an id, the rest text."""
  ids, strings = set(), []
  for value in values:
    if re.fullmatch(r"\d+", value):
      if int(value) >= vocab_size:
        raise ConfigError(f"--stop={value}: token id past the vocabulary ({vocab_size} ids)")
      ids.add(int(value))
    elif value:
      strings.append(unescape(value))
    else:
      raise ConfigError("--stop='' would stop before anything is generated")
  return ids, strings


def _continuation_text(tokenizer, prompt_ids: list[int], ids: list[int]) -> str:
  # Decoded with the prompt: SentencePiece drops a leading space when a piece is decoded alone.
  full = tokenizer.decode(prompt_ids + ids, skip_special_tokens=False)
  before = tokenizer.decode(prompt_ids, skip_special_tokens=False)
  return full[len(before):] if full.startswith(before) else tokenizer.decode(ids)


def _left_padded(chunk: Sequence[Sequence[int]], rows: int, pad_id: int):
  """(tokens, segments) [rows, width]: `chunk` left-padded to a multiple of _PAD_MULTIPLE, then
  filled up to `rows` rows with repeats of its first prompt. Padding (segment 0) is masked out and
  filler rows are dropped: only the shapes the decoding loop is compiled for change."""
  import numpy as np

  from research.sampling import left_pad

  filled = list(chunk) + [chunk[0]] * (rows - len(chunk))
  tokens, segments = left_pad(filled, pad_id)
  extra = -tokens.shape[1] % _PAD_MULTIPLE
  tokens = np.pad(tokens, ((0, 0), (extra, 0)), constant_values=pad_id)
  return tokens, np.pad(segments, ((0, 0), (extra, 0)))


def complete(params: Any, cfg, peft, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
             temperature: float, top_k: int, top_p: float, seed: int, stop_ids: set[int],
             stop_strings: Sequence[str], batch_size: int,
             add_special_tokens: bool = True, repetition_penalty: float = 1.0
             ) -> list[Completion]:
  """Continuations of `prompts`, `batch_size` at a time, each cut at its first stop."""
  import jax
  import numpy as np

  from research.sampling import SamplingConfig, generate_tokens

  # A stop string that is one token also ends the loop early; any stop string is cut from the
  # text, so stopping at its token never drops text that would be printed.
  early = set(stop_ids)
  for s in stop_strings:
    ids = tokenizer(s, add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
      early.add(ids[0])
  sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, stop_tokens=tuple(sorted(early)),
                            repetition_penalty=repetition_penalty,
                            progress_every=PROGRESS_EVERY if max_new_tokens >= LONG else 0)
  empty = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
  encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] or [empty]
             for p in prompts]
  pad_id = tokenizer.pad_token_id
  rows = min(batch_size, len(encoded))
  out: list[Completion] = []
  for start in range(0, len(encoded), rows):
    chunk = encoded[start:start + rows]
    tokens, segments = _left_padded(chunk, rows, pad_id)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), start // rows)
    new_bn, lengths_b = generate_tokens(params, tokens, segments, rng, cfg=cfg, sampling=sampling,
                                        pad_id=pad_id, peft=peft)
    new_bn, lengths_b = np.asarray(new_bn), np.asarray(lengths_b)
    for i, (prompt, ids) in enumerate(zip(prompts[start:start + rows], chunk)):
      new, reason = new_bn[i, :lengths_b[i]].tolist(), "length"
      if new and new[-1] in stop_ids:
        new, reason = new[:-1], "stop_token"
      elif new and new[-1] in early:  # the token of a one-token stop string; cut just below
        reason = "stop_string"
      text = _continuation_text(tokenizer, ids, new)
      cuts = [text.find(s) for s in stop_strings if s in text]
      if cuts:
        text, reason = text[:min(cuts)], "stop_string"
      out.append(Completion(prompt, text, new, reason))
  return out


def format_text(completions: Sequence[Completion]) -> str:
  """One block per prompt: a `==> [i] 'prompt' <==` header, the continuation, a blank line."""
  blocks = []
  for i, c in enumerate(completions, 1):
    shown = repr(c.prompt if len(c.prompt) <= 60 else c.prompt[:57] + "...")
    blocks.append(f"==> [{i}] {shown} <==\n{c.text}\n\n")
  return "".join(blocks)


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):
    # One `error:` line, as for every other bad input, instead of a usage dump.
    self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="scripts/generate.py", description=__doc__.splitlines()[0])
  # Both spellings of each multi-word flag: the project's absl entry points use underscores.
  def add(name: str, **kwargs) -> None:
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*names, dest=name, **kwargs)

  add("checkpoint", required=True, help="run directory or Hugging Face model directory")
  add("prompt", action="append", default=[], help="prompt text (repeatable)")
  add("prompts_file", default=None, help="one prompt per line, or .jsonl with a 'prompt' field")
  add("max_new_tokens", type=int, default=64)
  add("temperature", type=float, default=0.0, help="0 = greedy")
  add("top_p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
  add("top_k", type=int, default=0, help="0 = off")
  add("repetition_penalty", type=float, default=1.0,
      help="transformers' repetition_penalty: logits of tokens already in the text are divided "
           "by it (multiplied where negative); 1 = off, 1.1-1.3 curbs loops")
  add("seed", type=int, default=0)
  add("step", type=int, default=None, help="checkpoint step of a run directory (default: latest)")
  add("stop", action="append", default=[],
      help="extra stop: a token id (integer) or a string (repeatable); EOS always stops")
  add("tokenizer", default=None, help="tokenizer directory (default: the checkpoint's)")
  add("batch_size", type=int, default=8, help="prompts decoded together")
  add("format", default="text", choices=("text", "jsonl"))
  add("add_special_tokens", action=argparse.BooleanOptionalAction, default=True,
      help="let the tokenizer add its special tokens (e.g. BOS) to each prompt")
  add("chat", action="store_true",
      help="each prompt is a user turn, rendered by the tokenizer's chat template")
  add("system", default=None, help="with --chat: a system turn before each prompt")
  return parser


def check_args(args: argparse.Namespace) -> None:
  if args.max_new_tokens < 1:
    raise ConfigError(f"--max_new_tokens={args.max_new_tokens} must be at least 1")
  if args.temperature < 0:
    raise ConfigError(f"--temperature={args.temperature} must be >= 0 (0 = greedy)")
  if not 0.0 < args.top_p <= 1.0:
    raise ConfigError(f"--top_p={args.top_p} must lie in (0, 1]")
  if args.top_k < 0:
    raise ConfigError(f"--top_k={args.top_k} must be >= 0 (0 = off)")
  if args.repetition_penalty <= 0:
    raise ConfigError(f"--repetition_penalty={args.repetition_penalty} must be > 0 (1 = off)")
  if args.batch_size < 1:
    raise ConfigError(f"--batch_size={args.batch_size} must be at least 1")
  if args.system is not None and not args.chat:
    raise ConfigError("--system sets the system turn of a chat: add --chat")
  if args.temperature == 0 and (args.top_k or args.top_p < 1.0):
    print("warning: --top_k/--top_p have no effect with --temperature=0 (greedy)", file=sys.stderr)


def chat_prompts(prompts: Sequence[str], tokenizer, system: str | None) -> list[str]:
  """Each prompt as the user turn of a chat (after the system turn), ready for the reply."""
  from research.data.chat_template import chat_prompt

  head = [{"role": "system", "content": system}] if system is not None else []
  return [chat_prompt(head + [{"role": "user", "content": p}], tokenizer, f"--chat prompt {i}")
          for i, p in enumerate(prompts, 1)]


def check_length(cfg, tokenizer, prompts: Sequence[str], args: argparse.Namespace) -> None:
  """--max_new_tokens within the model's positions and the KV cache within memory, up front."""
  from research.sampling import decode_length_error, free_memory_bytes

  lengths = [len(tokenizer(p, add_special_tokens=args.add_special_tokens)["input_ids"])
             for p in prompts]
  longest = max(lengths)
  padded = longest + -longest % _PAD_MULTIPLE
  error = decode_length_error(cfg, min(args.batch_size, len(prompts)), longest, padded,
                              args.max_new_tokens, free_memory_bytes())
  if error:
    raise ConfigError(error)
  if args.max_new_tokens >= LONG:
    print(f"decoding up to {args.max_new_tokens} new tokens per prompt in one compiled loop; "
          f"progress every {PROGRESS_EVERY} tokens, the output when it ends", file=sys.stderr,
          flush=True)


def run(args: argparse.Namespace) -> list[Completion]:
  from research.interop.model_zoo import resolve_init

  check_args(args)
  prompts = read_prompts(args.prompt, args.prompts_file)
  checkpoint = resolve_init(args.checkpoint)
  cfg, peft, params, tokenizer, eos = load_checkpoint(checkpoint, args.step, args.tokenizer)
  texts = chat_prompts(prompts, tokenizer, args.system) if args.chat else prompts
  if args.top_k > cfg.vocab_size:
    raise ConfigError(f"--top_k={args.top_k} exceeds the vocabulary ({cfg.vocab_size})")
  stop_ids, stop_strings = parse_stops(args.stop, cfg.vocab_size)
  check_length(cfg, tokenizer, texts, args)
  start = time.perf_counter()
  # A rendered chat already holds the special tokens its template writes (BOS included).
  completions = complete(params, cfg, peft, tokenizer, texts, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         seed=args.seed, stop_ids=stop_ids | eos, stop_strings=stop_strings,
                         batch_size=args.batch_size,
                         add_special_tokens=args.add_special_tokens and not args.chat,
                         repetition_penalty=args.repetition_penalty)
  completions = [dataclasses.replace(c, prompt=p) for c, p in zip(completions, prompts)]
  seconds = time.perf_counter() - start
  tokens = sum(len(c.tokens) for c in completions)
  print(f"{len(completions)} prompts, {tokens} new tokens in {seconds:.1f} s (compile included)",
        file=sys.stderr)
  return completions


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    completions = run(args)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.format == "jsonl":
    for c in completions:
      print(json.dumps(dataclasses.asdict(c), ensure_ascii=False))
  else:
    print(format_text(completions), end="")
  return 0


if __name__ == "__main__":
  sys.exit(main())
