"""Sweeps over any config field: the spec (grid and/or seeded random draws) and its trials, each a
separate run of the stage's entry point, N at a time and resumable (scripts/sweep.py: CLI, report).

A config file declares its sweeps beside its presets:

  SWEEPS = {"lr_rank": {
      "grid": {"optimizer.lr": [1e-4, 3e-4], "peft.r": [4, 8]},         # every combination
      "random": {"n": 2, "params": {"optimizer.warmup_steps": {"choice": [10, 50]},
                                    "peft.dropout": {"uniform": [0.0, 0.1]},
                                    "optimizer.b2": {"log_uniform": [0.95, 0.999]}}},
      "fixed": {"train.steps": 100},                                     # every trial
      "seed": 0}}

Each grid point gets `n` random draws (grid x n trials; only `random`: n trials), from `seed`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from absl import flags
from ml_collections import ConfigDict, config_flags

from research.errors import ConfigError

SPEC_KEYS = ("grid", "random", "fixed", "seed")
DISTRIBUTIONS = ("uniform", "log_uniform", "choice")
DONE, FAILED, STATUS, TRIAL = "DONE", "FAILED", "status.json", "trial.json"


@dataclasses.dataclass(frozen=True)
class Trial:
  index: int
  overrides: dict[str, Any]  # config field path -> value, in spec order

  @property
  def name(self) -> str:
    return f"trial_{self.index:03d}"


def check_spec(spec: Mapping[str, Any]) -> None:
  unknown = sorted(set(spec) - set(SPEC_KEYS))
  if unknown:
    raise ConfigError(f"sweep keys {unknown} are unknown; a sweep has {list(SPEC_KEYS)}")
  for field, values in (spec.get("grid") or {}).items():
    if not isinstance(values, (list, tuple)) or not values:
      raise ConfigError(f"sweep grid field {field!r} needs a non-empty list of values")
  random = spec.get("random") or {}
  if set(random) - {"n", "params"}:
    raise ConfigError(f"sweep 'random' takes 'n' and 'params', got {sorted(random)}")
  for field, dist in (random.get("params") or {}).items():
    if not isinstance(dist, Mapping) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
      raise ConfigError(f"sweep random field {field!r}: give one of {DISTRIBUTIONS}, e.g. "
                        "{'log_uniform': [1e-4, 1e-2]}")
    kind, arg = next(iter(dist.items()))
    if kind != "choice" and (len(arg) != 2 or not arg[0] <= arg[1] or
                             (kind == "log_uniform" and arg[0] <= 0)):
      raise ConfigError(f"sweep random field {field!r}: {kind} needs [low, high] with "
                        f"low <= high{' and low > 0' if kind == 'log_uniform' else ''}")
    if kind == "choice" and not arg:
      raise ConfigError(f"sweep random field {field!r}: choice needs a non-empty list")
  if random.get("n", 0) and not random.get("params"):
    raise ConfigError("sweep 'random' has n > 0 but no params to draw")
  if not spec.get("grid") and not random.get("n"):
    raise ConfigError("a sweep needs a 'grid' and/or 'random' with n >= 1")


def _draw(rng: np.random.Generator, dist: Mapping[str, Any], like: Any) -> Any:
  kind, arg = next(iter(dist.items()))
  if kind == "choice":
    return arg[int(rng.integers(len(arg)))]
  lo, hi = float(arg[0]), float(arg[1])
  if kind == "log_uniform":
    x = math.exp(rng.uniform(math.log(lo), math.log(hi)))
  else:
    x = rng.uniform(lo, hi)
  # An integer field (steps, rank) gets an integer; floats are rounded to 6 significant digits
  # so command lines and tables stay readable.
  if isinstance(like, int) and not isinstance(like, bool):
    return int(round(x))
  return float(f"{x:.6g}")


def expand(spec: Mapping[str, Any], base: ConfigDict | None = None) -> list[Trial]:
  """The trials of a sweep, in a fixed order (the grid's last field varies fastest)."""
  check_spec(spec)
  grid = dict(spec.get("grid") or {})
  random = spec.get("random") or {}
  n, params = int(random.get("n", 0)), dict(random.get("params") or {})
  rng = np.random.default_rng(int(spec.get("seed", 0)))
  points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] or [{}]
  trials = []
  for point in points:
    for _ in range(max(n, 1)):
      drawn = {f: _draw(rng, d, field_value(base, f) if base else None)
               for f, d in params.items()} if n else {}
      overrides = {**dict(spec.get("fixed") or {}), **point, **drawn}
      trials.append(Trial(len(trials), overrides))
  return trials


def field_value(config: ConfigDict, path: str) -> Any:
  node = config
  for part in path.split("."):
    if not isinstance(node, (ConfigDict, Mapping)) or part not in node:
      raise KeyError(path)
    node = node[part]
  return node


def check_fields(config: ConfigDict, spec: Mapping[str, Any]) -> None:
  """Every swept field must exist: a typo would fail every trial, so it fails the sweep at once."""
  fields = set((spec.get("grid") or {})) | set((spec.get("fixed") or {}))
  fields |= set(((spec.get("random") or {}).get("params") or {}))
  unknown = []
  for f in sorted(fields):
    try:
      field_value(config, f)
    except KeyError:
      unknown.append(f)
  if unknown:
    raise ConfigError(f"sweep fields {unknown} are not fields of the config")


def format_value(value: Any) -> str:
  """A value as `--config.x=` text that ml_collections parses back to the same value."""
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  if isinstance(value, float):
    return repr(value)
  return str(value)


def override_args(overrides: Mapping[str, Any]) -> list[str]:
  return [f"--config.{k}={format_value(v)}" for k, v in overrides.items()]


def parse_with_overrides(parser: argparse.ArgumentParser, argv: Sequence[str]
                         ) -> tuple[argparse.Namespace, list[str]]:
  """(the parser's args, the `--config.x=y` overrides) of a script that takes a config the way the
  entry points do; anything else the parser does not know stops it with its usage error."""
  args, rest = parser.parse_known_args(list(argv))
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  return args, rest


def resolve_config(config_ref: str, args: Sequence[str] = ()) -> ConfigDict:
  """The config exactly as an entry point gets it from `--config=config_ref` and `args`."""
  argv = ["sweep", f"--config={config_ref}", *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=argv)
  try:
    with warnings.catch_warnings():  # config_flags loads the file with the deprecated load_module
      warnings.simplefilter("ignore", DeprecationWarning)
      values(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = (str(e).strip("'\"") if isinstance(e, KeyError) else str(e)).splitlines()
    raise ConfigError(f"bad config override: {message[-1] if message else type(e).__name__}"
                      ) from e
  return values.config


def stage_module(config: ConfigDict) -> str:
  stage = config.get("stage")
  if not stage:
    raise ConfigError("the config has no `stage` field naming its entry point experiments.<stage>")
  module = f"experiments.{stage}"
  if importlib.util.find_spec(module) is None:
    raise ConfigError(f"stage {stage!r}: no module {module}")
  return module


def trial_command(python: str, module: str, config_ref: str, trial: Trial, extra: Sequence[str],
                  workdir: str) -> list[str]:
  """One trial's command. `--resume=auto` makes a rerun continue an interrupted trial's
  checkpoints (a fresh workdir just starts)."""
  return [python, "-m", module, f"--config={config_ref}", *override_args(trial.overrides),
          *extra, f"--workdir={workdir}", "--resume=auto"]


def write_json(path: str, data: Any) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, sort_keys=False, default=str)
    f.write("\n")
  os.replace(tmp, path)


def read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):  # absent, or being written by a crashed run
    return {}


def trial_state(trial_dir: str) -> str:
  """'done' (DONE marker), 'failed' (status or the FAILED marker a SLURM task writes), 'pending'."""
  if os.path.exists(os.path.join(trial_dir, DONE)):
    return "done"
  if (read_json(os.path.join(trial_dir, STATUS)).get("state") == "failed" or
      os.path.exists(os.path.join(trial_dir, FAILED))):
    return "failed"
  return "pending"


def error_summary(stderr: str, max_chars: int = 300) -> str:
  """The line that says what went wrong: the last `error: ...` line, else a traceback's last line,
  else the last three lines."""
  lines = [l.strip() for l in stderr.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("error:")]
  if errors:
    text = errors[-1]
  elif any(l.startswith("Traceback") for l in lines):
    text = lines[-1]
  else:
    text = " | ".join(lines[-3:])
  return text[:max_chars]


def tail(path: str, lines: int = 20) -> str:
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      return "".join(f.readlines()[-lines:])
  except OSError:
    return ""


# (command, trial_dir) -> exit code; writes the run's output into trial_dir/stdout.log, stderr.log.
Launcher = Callable[[list[str], str], int]


class SubprocessLauncher:
  """Runs a trial as a child process in its own session. Past `timeout_s` its whole process group
  gets SIGKILL (jax.distributed catches SIGTERM); `kill_all` does the same to every running one."""

  def __init__(self, timeout_s: float = 0, env: Mapping[str, str] | None = None):
    self.timeout_s, self.env = timeout_s, env
    self._running: set[subprocess.Popen] = set()
    self._lock = threading.Lock()

  def __call__(self, command: list[str], trial_dir: str) -> int:
    with open(os.path.join(trial_dir, "stdout.log"), "w") as out, \
         open(os.path.join(trial_dir, "stderr.log"), "w") as err:
      proc = subprocess.Popen(command, stdout=out, stderr=err, start_new_session=True,
                              env=dict(self.env) if self.env is not None else None)
      with self._lock:
        self._running.add(proc)
      try:
        return proc.wait(timeout=self.timeout_s or None)
      except subprocess.TimeoutExpired:
        _kill(proc)
        err.write(f"\nerror: trial killed after the {self.timeout_s:g} s --trial_timeout\n")
        return -signal.SIGKILL
      finally:
        with self._lock:
          self._running.discard(proc)

  def kill_all(self) -> None:
    with self._lock:
      for proc in list(self._running):
        _kill(proc)


def _kill(proc: subprocess.Popen) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  proc.wait()


@dataclasses.dataclass
class Sweep:
  """A sweep ready to run or emit: its trials, their commands and directories."""
  config_ref: str
  workdir: str
  spec: dict
  extra: list[str]  # arguments every trial gets
  trials: list[Trial]
  commands: list[list[str]]
  configs: dict[int, dict]  # trial index -> resolved config
  resolve_errors: dict[int, str]  # trial index -> bad override message

  def trial_dir(self, trial: Trial) -> str:
    return os.path.join(self.workdir, trial.name)


def prepare(config_ref: str, spec: Mapping[str, Any], workdir: str, extra: Sequence[str] = (),
            python: str = sys.executable) -> Sweep:
  """Expands the spec and checks every field and trial config without running anything."""
  base = resolve_config(config_ref, extra)
  check_fields(base, spec)
  trials = expand(spec, base)
  swept = {a.split("=", 1)[0][len("--config."):] for a in extra if a.startswith("--config.")}
  clash = sorted(swept & {f for t in trials for f in t.overrides})
  if clash:
    raise ConfigError(f"--extra sets swept fields {clash}; sweep them or fix them, not both")
  module = stage_module(base)
  workdir = os.path.abspath(workdir)
  sweep = Sweep(config_ref, workdir, dict(spec), list(extra), trials, [], {}, {})
  for t in trials:
    try:
      sweep.configs[t.index] = resolve_config(config_ref, [*override_args(t.overrides),
                                                           *extra]).to_dict()
    except ConfigError as e:
      sweep.resolve_errors[t.index] = str(e)
    sweep.commands.append(trial_command(python, module, config_ref, t, extra,
                                        sweep.trial_dir(t)))
  return sweep


def write_trial_files(sweep: Sweep) -> None:
  os.makedirs(sweep.workdir, exist_ok=True)
  write_json(os.path.join(sweep.workdir, "sweep.json"),
             {"config": sweep.config_ref, "spec": sweep.spec, "extra": sweep.extra,
              "trials": [{"name": t.name, "overrides": t.overrides} for t in sweep.trials]})
  for t, command in zip(sweep.trials, sweep.commands):
    d = sweep.trial_dir(t)
    os.makedirs(d, exist_ok=True)
    info = {"name": t.name, "index": t.index, "overrides": t.overrides,
            "command": shlex.join(command)}
    if t.index in sweep.resolve_errors:
      info["error"] = sweep.resolve_errors[t.index]
    else:
      info["config"] = sweep.configs[t.index]
    write_json(os.path.join(d, TRIAL), info)


def run(sweep: Sweep, parallel: int = 1, retry_failed: bool = False,
        launcher: Launcher | None = None, log: Callable[[str], None] = print) -> dict[str, int]:
  """Runs every trial not yet done (failed ones only with `retry_failed`), `parallel` at a time.
  A failing trial is recorded and the others go on. Returns counts of trial outcomes."""
  launcher = launcher or SubprocessLauncher()
  stopping = threading.Event()
  write_trial_files(sweep)
  todo, counts = [], {"skipped_done": 0, "skipped_failed": 0, "done": 0, "failed": 0}
  for t, command in zip(sweep.trials, sweep.commands):
    state = trial_state(sweep.trial_dir(t))
    if state == "done" or (state == "failed" and not retry_failed):
      counts[f"skipped_{state}"] += 1
      continue
    todo.append((t, command))
  log(f"sweep {sweep.workdir}: {len(sweep.trials)} trials, {len(todo)} to run, "
      f"{counts['skipped_done']} done, {counts['skipped_failed']} failed (kept)")

  def one(t: Trial, command: list[str]) -> str:
    d = sweep.trial_dir(t)
    if os.path.exists(os.path.join(d, FAILED)):  # a SLURM task's, now retried
      os.remove(os.path.join(d, FAILED))
    start = time.time()
    write_json(os.path.join(d, STATUS), {"state": "running", "started": start})
    if t.index in sweep.resolve_errors:  # fails as the entry point would, without starting it
      rc, err = 2, f"error: {sweep.resolve_errors[t.index]}"
    else:
      rc = launcher(command, d)
      err = tail(os.path.join(d, "stderr.log"))
    if stopping.is_set():  # killed by Ctrl-C: pending again, so a rerun resumes it
      write_json(os.path.join(d, STATUS), {"state": "interrupted", "started": start})
      return "interrupted"
    state = "done" if rc == 0 else "failed"
    write_json(os.path.join(d, STATUS), {
        "state": state, "returncode": rc, "started": start, "finished": time.time(),
        "duration_s": round(time.time() - start, 2),
        **({"error": error_summary(err), "stderr_tail": err} if rc else {})})
    if rc == 0:
      open(os.path.join(d, DONE), "w").close()
    log(f"{t.name} {state}" + (f": {error_summary(err)}" if rc else "") +
        f"  ({format_overrides(t.overrides)})")
    return state

  pool = concurrent.futures.ThreadPoolExecutor(max(1, parallel))
  futures = [pool.submit(one, t, command) for t, command in todo]
  try:
    for future in concurrent.futures.as_completed(futures):
      counts[future.result()] += 1
  except KeyboardInterrupt:
    stopping.set()
    for future in futures:
      future.cancel()
    if hasattr(launcher, "kill_all"):
      launcher.kill_all()
    raise
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
  return counts


def format_overrides(overrides: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={format_value(v)}" for k, v in overrides.items())
