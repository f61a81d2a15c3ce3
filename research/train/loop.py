"""The training loop every stage shares: step, log, evaluate, checkpoint, with at most two steps in flight."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax

from research.train.checkpoints import Checkpointer
from research.train.metrics import MetricsWriter, ProgressLogger


@dataclasses.dataclass
class LoopHooks:
  """What a stage plugs into the loop (every field optional but the step)."""
  train_step: Callable[[Any, Any], tuple[Any, dict]]
  next_batch: Callable[[], Any]  # a global (device) batch
  tokens_per_step: int = 0  # for tokens/s
  evaluate: Callable[[Any], dict[str, float]] | None = None  # state -> eval metrics
  checkpoint_extra: Callable[[], dict] | None = None  # JSON saved beside the state
  on_log: Callable[[int, dict], None] | None = None
  perplexity: bool = True  # the loss is a token NLL (LM stages), so exp(loss) means something


def train_loop(state: Any, hooks: LoopHooks, *, start_step: int, total_steps: int,
               writer: MetricsWriter, progress: ProgressLogger, checkpointer: Checkpointer | None,
               checkpoint_every: int, eval_every: int, stop_at_step: int = 0) -> Any:
  """Runs steps `start_step+1 .. total_steps` and returns the final state.

  `stop_at_step` ends the run early (with a checkpoint) as a pre-emption would, without changing
  the schedule: a later `--resume` continues to `total_steps`. A fresh run is evaluated at step 0
  too, so eval curves start from the initial weights.

  After dispatching step k the loop fetches step k-1's metrics, so at most two steps are in flight:
  enough to overlap host work with device work, few enough that sharded CPU programs never pile up
  (XLA:CPU aborts collectives that wait more than 40 s).
  """
  pending: tuple[int, Any, float] | None = None
  last_time = time.perf_counter()

  def finish(entry):
    nonlocal last_time
    step, metrics, _ = entry
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    metrics["step_time_s"] = now - last_time
    last_time = now
    if hooks.tokens_per_step:
      metrics["tokens_per_s"] = hooks.tokens_per_step / max(metrics["step_time_s"], 1e-9)
    if hooks.perplexity and "loss" in metrics:
      metrics["perplexity"] = float(jax.numpy.exp(min(metrics["loss"], 80.0)))
    writer.write(step, metrics, prefix="train/")
    progress.update(step, metrics, tokens=hooks.tokens_per_step)
    if hooks.on_log:
      hooks.on_log(step, metrics)

  def run_eval(step):
    nonlocal last_time
    eval_metrics = hooks.evaluate(state)
    writer.write(step, eval_metrics)
    progress._log(f"step {step}/{total_steps}  " + "  ".join(  # pylint: disable=protected-access
        f"{k} {v:.4f}" for k, v in eval_metrics.items()))
    last_time = time.perf_counter()  # eval time is not step time

  if hooks.evaluate and eval_every and start_step == 0:
    run_eval(0)
  last_step = min(total_steps, stop_at_step) if stop_at_step else total_steps
  for step in range(start_step + 1, last_step + 1):
    batch = hooks.next_batch()
    state, metrics = hooks.train_step(state, batch)
    if pending is not None:
      finish(pending)
    pending = (step, metrics, time.perf_counter())
    at_end = step == last_step
    if hooks.evaluate and eval_every and (step % eval_every == 0 or step == total_steps):
      finish(pending)
      pending = None
      run_eval(step)
    if checkpointer is not None and (at_end or (checkpoint_every and step % checkpoint_every == 0)):
      if pending is not None:
        finish(pending)
        pending = None
      extra = hooks.checkpoint_extra() if hooks.checkpoint_extra else {}
      checkpointer.save(step, state, extra, force=True)
      last_time = time.perf_counter()
  if pending is not None:
    finish(pending)
  if checkpointer is not None:
    checkpointer.wait()
  return state
