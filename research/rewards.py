"""Rewards that are code: a registry of functions `(prompt, completion, example) -> float`, their
weighted sum, and the check that every value is a finite number (else one line naming the function
and the example).

`example` is the task's record (e.g. `answer`) plus `completion_ids`, the sampled token ids.
A registry entry is a factory `settings -> function`, so built-ins read their knobs (the tag name,
the length limit) from the config's `reward` section; an entry marked `batched` is called once
on lists `(prompts, completions, examples) -> list of floats` (a reward model). A name with a dot,
`pkg.module.fn`, is imported as a plain function.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
import re
from typing import Any, Callable, Sequence

import numpy as np

from research.data import arithmetic
from research.errors import ConfigError, UserError

RewardFn = Callable[[str, str, dict], float]
Factory = Callable[[Any], Callable]
REGISTRY: dict[str, Factory] = {}


def register(name: str, factory: bool = False):
  """Decorator: `@register("name")` for a plain reward function; `factory=True` for one made from
  the `reward` settings."""
  def add(fn):
    REGISTRY[name] = fn if factory else (lambda settings: fn)
    return fn
  return add


@register("exact_answer", factory=True)
def _exact_answer(settings) -> RewardFn:
  """1 if the answer inside the tags (or, without them, the last number) equals `answer`."""
  tag = settings.get("tag", "answer")

  def exact_answer(prompt: str, completion: str, example: dict) -> float:
    del prompt
    if "answer" not in example:
      raise KeyError("the example has no 'answer' field")
    return float(arithmetic.is_correct(completion, example["answer"], tag))
  return exact_answer


@register("answer_format", factory=True)
def _answer_format(settings) -> RewardFn:
  """1 if the completion holds exactly one `<tag>...</tag>` with a non-empty inside."""
  tag = settings.get("tag", "answer")
  pattern = re.compile(rf"<{tag}>\s*\S.*?</{tag}>", re.DOTALL)

  def answer_format(prompt: str, completion: str, example: dict) -> float:
    del prompt, example
    return float(len(pattern.findall(completion)) == 1 and completion.count(f"<{tag}>") == 1)
  return answer_format


@register("length_penalty", factory=True)
def _length_penalty(settings) -> RewardFn:
  """0 up to `max_chars` characters, then -(excess / max_chars), down to -1."""
  max_chars = int(settings.get("max_chars", 400))
  if max_chars < 1:
    raise ConfigError(f"reward.max_chars={max_chars} must be positive")

  def length_penalty(prompt: str, completion: str, example: dict) -> float:
    del prompt, example
    return -min(1.0, max(0, len(completion) - max_chars) / max_chars)
  return length_penalty


@dataclasses.dataclass(frozen=True)
class WeightedReward:
  name: str
  weight: float
  fn: Callable
  batched: bool = False


def parse_spec(spec: str) -> list[tuple[str, float]]:
  """`"exact_answer:1,answer_format:0.2"` -> [(name, weight)]; a missing weight is 1."""
  out = []
  for item in (s.strip() for s in spec.split(",")):
    if not item:
      continue
    name, _, weight = item.rpartition(":") if ":" in item else (item, "", "1")
    try:
      out.append((name.strip(), float(weight)))
    except ValueError:
      raise ConfigError(f"reward.functions entry {item!r}: the weight after ':' must be a number, "
                        "e.g. 'exact_answer:1.0'") from None
  if not out:
    raise ConfigError("reward.functions is empty: name at least one, e.g. 'exact_answer:1.0'")
  return out


def build(spec: str, settings: Any, extra: dict[str, Callable] | None = None
          ) -> list[WeightedReward]:
  """The weighted functions of `spec`; `extra` maps names to ready functions (the reward model)."""
  extra = extra or {}
  out = []
  names = [name for name, _ in parse_spec(spec)]
  if len(set(names)) < len(names):
    raise ConfigError(f"reward.functions names a function twice: {names}; give each once")
  for name, weight in parse_spec(spec):
    if name in extra:
      fn = extra[name]
    elif name in REGISTRY:
      fn = REGISTRY[name](settings)
    elif "." in name:
      module, _, attr = name.rpartition(".")
      try:
        fn = getattr(importlib.import_module(module), attr)
      except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward.functions: cannot import {name!r} ({e}); give "
                          "'package.module.function' importable from the working directory") from e
    else:
      raise ConfigError(f"reward.functions: unknown reward {name!r}; known: "
                        f"{sorted(REGISTRY) + sorted(extra)}, or 'package.module.function'")
    out.append(WeightedReward(name, weight, fn, getattr(fn, "batched", False)))
  return out


def _where(i: int, prompt: str, completion: str, example: dict) -> str:
  short = lambda s: repr(s if len(s) <= 50 else s[:47] + "...")  # noqa: E731
  index = f" (task index {example['index']})" if "index" in example else ""
  return f"example {i}{index}, prompt {short(prompt)}, completion {short(completion)}"


def _checked(value: Any, name: str, i: int, prompt: str, completion: str, example: dict) -> float:
  if isinstance(value, numbers.Real) and math.isfinite(float(value)):
    return float(value)
  raise UserError(f"reward function {name!r} returned {value!r}, not a finite number, for "
                  f"{_where(i, prompt, completion, example)}; it must return a float")


def score(rewards: Sequence[WeightedReward], prompts: Sequence[str], completions: Sequence[str],
          examples: Sequence[dict]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(weighted sum per completion [N], each function's values by name [N])."""
  per_fn = {}
  for r in rewards:
    if r.batched:
      try:
        values = list(r.fn(list(prompts), list(completions), list(examples)))
      except UserError:
        raise
      except Exception as e:  # noqa: BLE001 - any failure of user code stops the run, named
        raise UserError(f"reward function {r.name!r} raised {type(e).__name__}: {e} on a batch "
                        f"of {len(prompts)} completions") from e
      if len(values) != len(prompts):
        raise UserError(f"reward function {r.name!r} returned {len(values)} values for "
                        f"{len(prompts)} completions")
    else:
      values = []
      for i, (p, c, ex) in enumerate(zip(prompts, completions, examples)):
        try:
          values.append(r.fn(p, c, ex))
        except Exception as e:  # noqa: BLE001 - any failure of user code stops the run, named
          raise UserError(f"reward function {r.name!r} raised {type(e).__name__}: {e} on "
                          f"{_where(i, p, c, ex)}") from e
    per_fn[r.name] = np.asarray([_checked(v, r.name, i, p, c, ex) for i, (v, p, c, ex) in
                                 enumerate(zip(values, prompts, completions, examples))],
                                np.float64)
  total = sum(r.weight * per_fn[r.name] for r in rewards)
  return np.asarray(total, np.float32), per_fn
