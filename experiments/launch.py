"""Flags every entry point shares, and the wrapper that turns user errors into one clear line."""

from __future__ import annotations

import os
import sys
from typing import Callable

from absl import flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config, samples.")


class _ResumeParser(flags.ArgumentParser):
  """--resume (true), --noresume, --resume=auto: a boolean flag that also takes "auto"."""

  def parse(self, argument):
    if isinstance(argument, bool):
      return argument
    value = str(argument).lower()
    if value in ("auto", "true", "false", "1", "0"):
      return {"true": True, "1": True, "false": False, "0": False}.get(value, "auto")
    raise ValueError(f"--resume={argument}: give true, false or auto")

  def flag_type(self):
    return "bool or auto"


flags.DEFINE_flag(flags.Flag(
    _ResumeParser(), flags.ArgumentSerializer(), "resume", False,
    "Continue the run in --workdir from its newest checkpoint (an error when it has none); "
    "--resume=auto continues it when there is one and starts fresh otherwise.", boolean=True))
flags.DEFINE_string("coordinator_address", "", "HOST:PORT of process 0, for multi-host runs.")
flags.DEFINE_integer("num_processes", 1, "Processes in a multi-host run.")
flags.DEFINE_integer("process_id", 0, "This process's index in a multi-host run.")
flags.DEFINE_bool("auto_distributed", True, "Without --coordinator_address, initialise "
                  "jax.distributed when jax detects a cluster (TPU pod, SLURM, Open MPI).")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing where a bad `--config.x=y` (unknown key, wrong type) is one line, no traceback."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    message = str(e)
    if "Traceback" in message:  # config_flags embeds the config file's traceback: keep its cause
      head = message.split("\n", 1)[0]
      message = f"{head} {message.strip().splitlines()[-1]}"
    print(f"error: {message}\nPass --helpfull to list the flags.", file=sys.stderr)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections raises these for `--config.unknown_key=...` or an unparsable value.
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    message = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    print(f"error: bad config override among {overrides}: {message}", file=sys.stderr)
  sys.exit(2)


def run_main(stage_run: Callable, config) -> int:
  """Initialises jax.distributed when asked, runs the stage, prints user errors without traceback."""
  from research.errors import UserError  # pylint: disable=import-outside-toplevel
  from research.parallel.distributed import maybe_initialize  # pylint: disable=import-outside-toplevel
  from research.train.preemption import Preempted  # pylint: disable=import-outside-toplevel
  if not FLAGS.workdir:
    print("error: --workdir is required (the run directory to write into)", file=sys.stderr)
    return 2
  try:
    maybe_initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                     auto=FLAGS.auto_distributed)
    out = stage_run(config, os.path.abspath(FLAGS.workdir), resume=FLAGS.resume)
  except UserError as e:
    logging.flush()
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Preempted as e:  # a checkpoint is saved: the run can go on, so this is no failure
    logging.flush()
    print(str(e), file=sys.stderr, flush=True)
    return 0
  if FLAGS.process_id == 0:
    print(format_samples(out), end="", flush=True)
  return 0


def format_samples(out) -> str:
  """The greedy samples a stage returns (`samples`, beside `sample_prompts` when they hold the
  continuations only), one block each; "" when it returns none."""
  samples = list(out.get("samples") or []) if isinstance(out, dict) else []
  if not samples:
    return ""
  prompts = out.get("sample_prompts")
  texts = [p + s for p, s in zip(prompts, samples)] if prompts else samples
  blocks = [f"--- sample {i} ---\n{text}\n" for i, text in enumerate(texts, 1)]
  return "greedy samples of the final weights (also in samples.txt):\n" + "".join(blocks)


def quiet_libraries() -> None:
  """Library INFO logs (orbax writes dozens per checkpoint) off unless --verbosity was given."""
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def main(stage: str, default_config: str) -> None:
  """The whole of an entry point: `--config` (file:preset), the shared flags, then the stage's
  `research.stages.<stage>.run(config, workdir, resume)`."""
  import importlib  # pylint: disable=import-outside-toplevel

  from absl import app  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  config = config_flags.DEFINE_config_file(
      "config", default_config, f"Config file and preset, e.g. {default_config}")

  def run(argv):
    del argv
    quiet_libraries()
    stage_module = importlib.import_module(f"research.stages.{stage}")
    sys.exit(run_main(stage_module.run, config.value))

  app.run(run, flags_parser=parse_flags)
