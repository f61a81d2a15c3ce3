"""A verifiable task: arithmetic word problems with integer answers, generated from a seed, with a
held-out set fixed once for every run (its own seed), and the exact-match answer check.

An example is `{"prompt": str, "answer": str, "index": int}`; the answer is the integer in
decimal. Difficulty is the number of operations after the first quantity and the largest number.
"""

from __future__ import annotations

import re

import numpy as np

from research.errors import ConfigError

HELD_OUT_SEED = 20240622  # never the run's seed: every run evaluates on the same problems
NAMES = ("Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena",
         "Mia", "Noah", "Omar", "Sara", "Tom")
ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "coins", "cards", "shells")
INSTRUCTION = "Give the final number inside <answer></answer>."
_NUMBER = re.compile(r"-?\d[\d,]*")


def _problem(rng: np.random.Generator, operations: int, max_value: int) -> tuple[str, int]:
  name, item = NAMES[rng.integers(len(NAMES))], ITEMS[rng.integers(len(ITEMS))]
  total = int(rng.integers(2, max_value + 1))
  sentences = [f"{name} has {total} {item}."]
  for _ in range(operations):
    op = rng.integers(4) if total > 1 else 0
    if op == 0:
      x = int(rng.integers(1, max_value + 1))
      sentences.append(f"Then {name} finds {x} more.")
      total += x
    elif op == 1:
      x = int(rng.integers(1, total))
      sentences.append(f"Then {name} gives {x} away.")
      total -= x
    elif op == 2:
      k, m = int(rng.integers(2, 5)), int(rng.integers(2, max(3, max_value // 4) + 1))
      sentences.append(f"Then {name} buys {k} bags with {m} {item} in each.")
      total += k * m
    else:
      divisors = [k for k in (2, 3, 4, 5) if total % k == 0]
      if not divisors:
        x = int(rng.integers(1, total))
        sentences.append(f"Then {name} gives {x} away.")
        total -= x
        continue
      k = divisors[rng.integers(len(divisors))]
      sentences.append(f"Then {name} shares them equally with {k - 1} friends, "
                       f"keeping one share.")
      total //= k
  sentences.append(f"How many {item} does {name} have now?")
  return " ".join(sentences), total


def make_examples(count: int, seed: int, operations: int = 1, max_value: int = 20,
                  exclude: set[str] | frozenset = frozenset()) -> list[dict]:
  """`count` distinct problems (none of whose prompts is in `exclude`), reproducible from `seed`."""
  if operations < 0 or max_value < 2:
    raise ConfigError(f"task.operations={operations} must be >= 0 and task.max_value={max_value} "
                      ">= 2")
  rng = np.random.default_rng([seed, operations, max_value])
  seen, out = set(exclude), []
  for _ in range(50 * count + 1000):
    if len(out) == count:
      return out
    text, answer = _problem(rng, operations, max_value)
    prompt = f"{text} {INSTRUCTION}"
    if prompt in seen:
      continue
    seen.add(prompt)
    out.append({"prompt": prompt, "answer": str(answer), "index": len(out)})
  raise ConfigError(f"only {len(out)} distinct problems of {operations} operation(s) up to "
                    f"{max_value}, {count} asked: raise task.max_value or task.operations, or "
                    "lower the counts")


def train_and_held_out(train_count: int, eval_count: int, seed: int, operations: int = 1,
                       max_value: int = 20) -> tuple[list[dict], list[dict]]:
  """(training problems from `seed`, the fixed held-out problems); no prompt is in both."""
  held_out = make_examples(eval_count, HELD_OUT_SEED, operations, max_value)
  train = make_examples(train_count, seed, operations, max_value,
                        exclude={e["prompt"] for e in held_out})
  return train, held_out


def extract_answer(completion: str, tag: str = "answer") -> str | None:
  """The text inside the first `<tag>...</tag>`; without the tags, the last number in the text."""
  match = re.search(rf"<{tag}>(.*?)</{tag}>", completion, re.DOTALL)
  if match:
    return match.group(1).strip()
  numbers = _NUMBER.findall(completion)
  return numbers[-1] if numbers else None


def is_correct(completion: str, answer: str, tag: str = "answer") -> bool:
  """Exact match of the extracted answer with `answer`, as integers (`1,024` reads as 1024)."""
  got = extract_answer(completion, tag)
  if got is None:
    return False
  try:
    return int(got.replace(",", "")) == int(answer)
  except ValueError:
    return False


def worked_text(example: dict) -> str:
  """The problem followed by its answer in the expected format (text for a small base model)."""
  return f"{example['prompt']} <answer>{example['answer']}</answer>"
