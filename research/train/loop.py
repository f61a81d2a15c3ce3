"""The training loop every stage shares: step, log, evaluate, checkpoint, with at most two steps in
flight; it stops on non-finite steps (never saving one) and on SIGTERM/SIGINT (saving first)."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax

from research.errors import DivergedError
from research.train.checkpoints import Checkpointer
from research.train.metrics import MetricsWriter, ProgressLogger
from research.train.preemption import Preempted, StopSignals
from research.train.step import FINITE


@dataclasses.dataclass
class LoopHooks:
  """What a stage plugs into the loop (every field optional but the step)."""
  train_step: Callable[[Any, Any], tuple[Any, dict]]
  next_batch: Callable[[], Any]  # a global (device) batch
  tokens_per_step: int = 0  # for tokens/s
  evaluate: Callable[[Any], dict[str, float]] | None = None  # state -> eval metrics
  checkpoint_extra: Callable[[], dict] | None = None  # JSON saved beside the state
  on_log: Callable[[int, dict], None] | None = None
  after_eval: Callable[[int], None] | None = None  # step -> None, once its metrics are written
  perplexity: bool = True  # the loss is a token NLL (LM stages), so exp(loss) means something


def _finite(metrics: dict[str, float]) -> bool:
  """The step's own verdict (`guard_non_finite`), else the same test on the fetched values."""
  if FINITE in metrics:
    return metrics.pop(FINITE) > 0
  return all(math.isfinite(v) for k, v in metrics.items()
             if k in ("loss", "grad_norm") or k.startswith("loss/"))


def diverged_message(step: int, metrics: dict[str, float], bad: int, max_bad_steps: int,
                     last_checkpoint: int | None) -> str:
  shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                    if k in ("loss", "grad_norm", "lr") or k.startswith("loss/"))
  kept = (f"the newest checkpoint, step {last_checkpoint}, is from before it (finite): resume "
          "from it with --resume" if last_checkpoint is not None else "no checkpoint was written")
  return (f"step {step}: non-finite loss or gradient norm ({shown}), {bad} such step(s) in a row "
          f"(train.max_bad_steps={max_bad_steps}): the update was skipped and training stopped; "
          f"{kept}. Likely cause: a learning rate too high (lower --config.optimizer.lr, or raise "
          "optimizer.warmup_steps), or bad data rows")


def train_loop(state: Any, hooks: LoopHooks, *, start_step: int, total_steps: int,
               writer: MetricsWriter, progress: ProgressLogger, checkpointer: Checkpointer | None,
               checkpoint_every: int, eval_every: int, stop_at_step: int = 0,
               max_bad_steps: int = 0) -> Any:
  """Runs steps `start_step+1 .. total_steps` and returns the final state.

  `stop_at_step` ends the run early (with a checkpoint) as a pre-emption would, without changing
  the schedule: a later `--resume` continues to `total_steps`. A fresh run is evaluated at step 0
  too, so eval curves start from the initial weights.

  After dispatching step k the loop fetches step k-1's metrics, so at most two steps are in flight:
  enough to overlap host work with device work, few enough that sharded CPU programs never pile up
  (XLA:CPU aborts collectives that wait more than 40 s).

  A step whose loss or gradient norm is not finite leaves the weights as they were (see
  `research.train.step.guard_non_finite`); more than `max_bad_steps` in a row raise DivergedError.
  A step's verdict is always read before that step is checkpointed, so no checkpoint holds a
  non-finite update. SIGTERM/SIGINT end the run after the current step with a checkpoint and raise
  `Preempted`.
  """
  pending: tuple[int, Any, float] | None = None
  last_time = time.perf_counter()
  bad_in_a_row = 0

  def finish(entry):
    nonlocal last_time, bad_in_a_row
    step, metrics, _ = entry
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    finite = _finite(metrics)
    now = time.perf_counter()
    metrics["step_time_s"] = now - last_time
    last_time = now
    if hooks.tokens_per_step:
      metrics["tokens_per_s"] = hooks.tokens_per_step / max(metrics["step_time_s"], 1e-9)
    if hooks.perplexity and "loss" in metrics:
      metrics["perplexity"] = float(jax.numpy.exp(min(metrics["loss"], 80.0)))
    writer.write(step, metrics, prefix="train/")
    bad_in_a_row = 0 if finite else bad_in_a_row + 1
    if bad_in_a_row > max_bad_steps:
      last = checkpointer.latest_step() if checkpointer is not None else None
      raise DivergedError(diverged_message(step, metrics, bad_in_a_row, max_bad_steps, last))
    progress.update(step, metrics, tokens=hooks.tokens_per_step)
    if hooks.on_log:
      hooks.on_log(step, metrics)

  def finish_pending():
    nonlocal pending
    if pending is not None:
      entry, pending = pending, None
      finish(entry)

  def run_eval(step):
    nonlocal last_time
    eval_metrics = hooks.evaluate(state)
    writer.write(step, eval_metrics)
    progress.log(f"step {step}/{total_steps}  " + "  ".join(
        f"{k} {v:.4f}" for k, v in eval_metrics.items()))
    if hooks.after_eval:
      hooks.after_eval(step)
    last_time = time.perf_counter()  # eval time is not step time

  def save(step):
    nonlocal last_time
    finish_pending()  # this step's verdict first: a non-finite run stops before it is saved
    extra = hooks.checkpoint_extra() if hooks.checkpoint_extra else {}
    checkpointer.save(step, state, extra, force=True)
    last_time = time.perf_counter()

  if hooks.evaluate and eval_every and start_step == 0:
    run_eval(0)
  last_step = min(total_steps, stop_at_step) if stop_at_step else total_steps
  with StopSignals() as stop:
    for step in range(start_step + 1, last_step + 1):
      batch = hooks.next_batch()
      state, metrics = hooks.train_step(state, batch)
      finish_pending()
      pending = (step, metrics, time.perf_counter())
      at_end = step == last_step
      if hooks.evaluate and eval_every and (step % eval_every == 0 or step == total_steps):
        finish_pending()
        run_eval(step)
      saved = checkpointer is not None and (
          at_end or (checkpoint_every and step % checkpoint_every == 0))
      if saved:
        save(step)
      if not at_end and stop.requested(step):
        if checkpointer is not None and not saved:
          save(step)
        finish_pending()
        if checkpointer is not None:
          checkpointer.wait()
        where = (f"checkpoint step {step} saved in {checkpointer.directory}"
                 if checkpointer is not None else "nothing saved")
        raise Preempted(f"stopped by {stop.signal_name} after step {step}/{total_steps}: {where}; "
                        "continue with the same command and --resume", step)
    finish_pending()
  if checkpointer is not None:
    checkpointer.wait()
  return state
