"""`run_training`: the part of every stage that is the same — optimizer, state (fresh, from base
weights, or resumed), the jitted steps on the mesh, the batch iterator, the loop, checkpoints."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
from absl import logging
from jax.sharding import Mesh
from ml_collections import ConfigDict

from research.data import loader
from research.parallel.distributed import global_batch_from_local
from research.parallel.rules import Rules
from research.stages import setup
from research.train import workdir as wd
from research.train.builder import StepFactory, build_step
from research.train.checkpoints import Checkpointer
from research.train.loop import LoopHooks
from research.train.state import BoxedInit, TrainState
from research.train.step import LossFn

# eval step (jitted, (state, global batch) -> outputs), batch sharding -> (state -> metrics)
EvaluatorFactory = Callable[[Callable, Any], Callable[[TrainState], dict[str, float]] | None]


@dataclasses.dataclass
class StageSpec:
  """What a stage hands to `run_training`."""
  init_fn: BoxedInit  # rng -> (trainable, frozen), boxed with logical axes
  train_loss: LossFn
  train_rows: dict  # host arrays with a leading row axis, for loader.BatchIterator
  tokens_per_row: int = 0  # for tokens/s
  base_params: Any = None  # weights that replace the fresh init wherever their names match
  eval_loss: LossFn | None = None  # the eval step's function (deterministic)
  make_evaluator: EvaluatorFactory | None = None
  meta: dict = dataclasses.field(default_factory=dict)  # JSON saved in every checkpoint
  before_loop: Callable[[TrainState, int], None] | None = None  # (state, start step)
  lm_loss: bool = True  # report perplexity
  make_step: StepFactory | None = None  # a stage's own step (PPO) instead of one over train_loss
  # Host work around the jitted step, (jitted step, batch sharding) -> the step the loop calls
  # (GRPO samples, then scores with rewards that are Python code, before each update).
  wrap_step: Callable[[Callable, Any], Callable] | None = None
  # Optimizer updates per step of `make_step` (PPO: epochs x minibatches; GRPO: iterations): the
  # learning-rate schedule then follows train steps, not updates.
  updates_per_step: int = 1


def overlay(fresh: Any, base: Any) -> Any:
  """`fresh` with every leaf that `base` also has (same path) taken from `base`."""
  if not isinstance(fresh, dict) or not isinstance(base, dict):
    return base
  return {k: overlay(v, base[k]) if k in base else v for k, v in fresh.items()}


def _unaliased(tree: Any) -> Any:
  """Copies of leaves that appear twice (one base feeding policy and reference, say): the state
  is donated to the step, and one buffer cannot be donated twice."""
  seen: set[int] = set()

  def once(x):
    if id(x) in seen:
      return jax.numpy.copy(x)
    seen.add(id(x))
    return x

  return jax.tree.map(once, tree)


def run_training(config: ConfigDict, workdir: str, resume: bool, spec: StageSpec, *, mesh: Mesh,
                 rules: Rules) -> tuple[TrainState, dict[str, float]]:
  """Trains and returns (final state, last eval metrics)."""
  built = build_step(init_fn=spec.init_fn, optimizer=config.optimizer,
                     total_steps=config.train.steps, mesh=mesh, rules=rules,
                     loss_fn=None if spec.make_step else spec.train_loss,
                     micro_batches=config.train.micro_batches, make_step=spec.make_step,
                     eval_loss=spec.eval_loss or spec.train_loss,
                     with_eval=spec.make_evaluator is not None,
                     updates_per_step=spec.updates_per_step)
  tx, shardings = built.tx, built.shardings
  checkpointer = Checkpointer(wd.checkpoint_dir(workdir), config.train.keep_checkpoints,
                              async_save=config.train.async_checkpoints)

  def from_base():
    # Fresh params for what the base lacks (PEFT params, heads), the base's weights elsewhere.
    trainable, frozen = jax.jit(spec.init_fn, out_shardings=(shardings.params, shardings.frozen))(
        jax.random.PRNGKey(config.seed))
    # Unboxed: the fresh params come back in their logical-axis boxes, which the state would
    # otherwise keep (checkpointed as `<param>/value`, so no LoRA run could be loaded or resumed).
    trainable, frozen = nn.meta.unbox((trainable, frozen))
    return _unaliased((overlay(trainable, spec.base_params), overlay(frozen, spec.base_params)))

  init_params = from_base if spec.base_params is not None else None
  state, start_step, extra = setup.start_state(
      config=config, workdir=workdir, resume=resume, abstract=built.abstract, shardings=shardings,
      init_fn=spec.init_fn, tx=tx, checkpointer=checkpointer, init_params=init_params)
  if start_step:
    logging.info("resumed from step %d", start_step)

  b_sharding, train_step = built.batch_sharding, built.train_step
  if spec.wrap_step is not None:
    train_step = spec.wrap_step(train_step, b_sharding)
  evaluate = None
  if spec.make_evaluator is not None:
    evaluate = spec.make_evaluator(built.eval_step, b_sharding)
  batches = loader.BatchIterator(spec.train_rows, config.train.global_batch, config.seed,
                                 start_position=extra.get("data_position", 0),
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
  if spec.before_loop is not None:
    spec.before_loop(state, start_step)
  last_eval: dict[str, float] = {}

  def evaluate_and_keep(st):
    metrics = evaluate(st)
    last_eval.clear()
    last_eval.update(metrics)
    return metrics

  hooks = LoopHooks(
      train_step=train_step,
      next_batch=lambda: global_batch_from_local(next(batches), b_sharding),
      tokens_per_step=config.train.global_batch * spec.tokens_per_row,
      evaluate=evaluate_and_keep if evaluate else None, perplexity=spec.lm_loss,
      checkpoint_extra=lambda: {"data_position": batches.position, "config": config.to_dict(),
                                **spec.meta})
  try:
    state = setup.run_loop(config=config, workdir=workdir, state=state, start_step=start_step,
                           hooks=hooks, checkpointer=checkpointer)
  finally:
    checkpointer.close()
  return state, last_eval


def host_slices(batches: list[dict], sharding) -> list[dict]:
  """Fixed global batches from host arrays, each process passing only its rows."""
  out = []
  for b in batches:
    rows = len(next(iter(b.values())))
    per_process = rows // jax.process_count()
    lo = jax.process_index() * per_process
    out.append(global_batch_from_local({k: v[lo:lo + per_process] for k, v in b.items()},
                                       sharding))
  return out
