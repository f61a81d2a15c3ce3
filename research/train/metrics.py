"""Run outputs besides checkpoints: `metrics.jsonl` + TensorBoard scalars, `config.json`, and a
periodic one-line progress log (`step 120/200  loss 3.214  ppl 24.9  tok/s 12,345  lr 3.0e-04`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
  """Appends scalar metrics to `<workdir>/metrics.jsonl` and `<workdir>/tensorboard/`.

  Build it with `enabled=False` on every process but 0 so only one copy is written. The JSON file is
  continued; with `start_step` (the step a run resumes from, 0 for a fresh one) the lines of later
  steps, written by a run killed after its checkpoint, are dropped first, so each step appears
  once. A torn last line (a kill mid-write) is always dropped.
  """

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True,
               start_step: int | None = None) -> None:
    self.workdir = os.fspath(workdir)
    self.enabled = enabled
    self._file = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(self.workdir, exist_ok=True)
    truncate_metrics(self.workdir, start_step)
    self._file = open(os.path.join(self.workdir, METRICS_FILE), "a", encoding="utf-8")
    # Imported lazily: non-zero processes never pay for it, and it pulls in protobuf.
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(logdir=os.path.join(self.workdir, TENSORBOARD_DIR), flush_secs=30)

  def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
    """Records `metrics` (scalars: floats, ints, 0-d arrays) for `step`, names prefixed by `prefix`."""
    if not self.enabled:
      return
    # float() also pulls 0-d device arrays to host; doing it once keeps both sinks identical.
    values = {prefix + k: float(v) for k, v in metrics.items()}
    # NaN/inf are written as JSON's common NaN/Infinity extension, which json.loads reads back;
    # a diverged loss is worth recording rather than crashing on.
    self._file.write(json.dumps({"step": int(step), **values}) + "\n")
    self._file.flush()
    for name, value in values.items():
      self._tb.add_scalar(name, value, global_step=int(step))

  def flush(self) -> None:
    if self.enabled:
      self._file.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled and self._file is not None:
      self._file.close()
      self._tb.close()
      self._file = None
      self._tb = None
      self.enabled = False

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


def save_config(workdir: str | os.PathLike, config_dict: Mapping[str, Any]) -> str:
  """Writes `<workdir>/config.json` (sorted keys, indented) atomically; returns its path.

  Call it from process 0 only. The temporary file sits in the same directory so `os.replace` is a
  rename on one filesystem, and readers never see a half-written config.
  """
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  text = json.dumps(config_dict, indent=2, sort_keys=True) + "\n"
  fd, tmp = tempfile.mkstemp(prefix=f".{CONFIG_FILE}.", suffix=".tmp", dir=workdir)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def read_config(workdir: str | os.PathLike) -> dict[str, Any] | None:
  """The run config `save_config` wrote in `workdir`, or None when there is none."""
  path = os.path.join(os.fspath(workdir), CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """Parses `<workdir>/metrics.jsonl` into one dict per line, in file order ([] if absent).

  A last line without its newline (the run was killed mid-write) is skipped; any other bad line is
  an error.
  """
  path = os.path.join(os.fspath(workdir), METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  records = []
  for number, line in enumerate(lines[:-1], start=1):
    if line.strip():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not a JSON line ({e})") from e
  return records


def truncate_metrics(workdir: str | os.PathLike, after_step: int | None = None) -> None:
  """Rewrites `<workdir>/metrics.jsonl` without a torn last line and, given `after_step`, without
  the lines of steps after it; atomically, and only when something is dropped."""
  path = os.path.join(os.fspath(workdir), METRICS_FILE)
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    text = f.read()
  lines = text.split("\n")
  kept = []
  for line in lines[:-1]:  # lines[-1] is "" or a torn line
    try:
      step = json.loads(line)["step"] if line.strip() else None
    except (json.JSONDecodeError, TypeError, KeyError):
      step = None  # unreadable: read_metrics will name it; dropping it here would hide it
    if after_step is None or step is None or step <= after_step:
      kept.append(line + "\n")
  new_text = "".join(kept)
  if new_text == text:
    return
  fd, tmp = tempfile.mkstemp(prefix=f".{METRICS_FILE}.", suffix=".tmp", dir=os.fspath(workdir))
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    f.write(new_text)
  os.replace(tmp, path)


def format_duration(seconds: float) -> str:
  """`45s`, `12m05s`, `3h07m`."""
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_progress(step: int, total_steps: int, metrics: Mapping[str, Any],
                    tokens_per_sec: float | None, remaining_s: float | None = None) -> str:
  """`step 120/200  loss 3.214  ppl 24.9  tok/s 12,345  lr 3.0e-04  eta 1m40s`, omitting absent
  fields."""
  parts = [f"step {step}/{total_steps}"]
  if "loss" in metrics:
    loss = float(metrics["loss"])
    parts.append(f"loss {loss:.3f}")
    if "perplexity" in metrics:  # language-model losses only
      parts.append(f"ppl {float(metrics['perplexity']):.1f}")
  for key in ("accuracy", "objective/scores", "objective/kl"):
    if key in metrics:
      parts.append(f"{key.split('/')[-1]} {float(metrics[key]):.3f}")
  if tokens_per_sec is not None:
    parts.append(f"tok/s {tokens_per_sec:,.0f}")
  if "lr" in metrics:
    parts.append(f"lr {float(metrics['lr']):.1e}")
  if remaining_s is not None and step < total_steps:
    parts.append(f"eta {format_duration(remaining_s)}")
  return "  ".join(parts)


class ProgressLogger:
  """Prints a progress line every `every` steps (and at `total_steps`).

  Throughput counts tokens from the first `update` on, so the compile time of step 1 (which precedes
  that call) does not drag down the first reading.
  """

  def __init__(self,
               total_steps: int,
               every: int = 50,
               enabled: bool = True,
               log_fn: Callable[[str], None] | None = None,
               clock: Callable[[], float] = time.perf_counter) -> None:
    if every < 1:
      raise ValueError(f"ProgressLogger every must be >= 1, got {every}")
    self.total_steps = total_steps
    self.every = every
    self.enabled = enabled
    self._log = log_fn or (lambda line: print(line, flush=True))
    self._clock = clock
    self._last_time: float | None = None
    self._last_step = 0
    self._tokens = 0

  def log(self, line: str) -> None:
    """Prints `line` (an eval result, say) where progress goes, on the process that logs."""
    if self.enabled:
      self._log(line)

  def update(self, step: int, metrics: Mapping[str, Any], tokens: int = 0) -> str | None:
    """Call once per step with that step's `tokens`; returns the line when one was logged."""
    now = self._clock()
    if self._last_time is None:
      self._last_time = now
      self._last_step = step
    else:
      self._tokens += tokens
    if not self.enabled or (step % self.every != 0 and step != self.total_steps):
      return None
    elapsed = now - self._last_time
    rate = self._tokens / elapsed if elapsed > 0 and self._tokens else None
    steps = step - self._last_step
    # Remaining steps at the pace since the last line (evals and checkpoints included).
    remaining = elapsed / steps * (self.total_steps - step) if steps > 0 and elapsed > 0 else None
    line = format_progress(step, self.total_steps, metrics, rate, remaining)
    self._log(line)
    self._last_time = now
    self._last_step = step
    self._tokens = 0
    return line
