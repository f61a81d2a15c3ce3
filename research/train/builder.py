"""The one step builder: optimizer -> abstract state -> shardings -> jitted train (and eval) step.

Every stage (through `run_training`), the planner and the train-step benchmark call `build_step`,
so what is planned and benchmarked is what trains.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax
from jax.sharding import Mesh, NamedSharding
from ml_collections import ConfigDict

from research.parallel.rules import DEFAULT_RULES, Rules, batch_sharding
from research.train.optimizer import make_optimizer
from research.train.state import BoxedInit, TrainState, abstract_state
from research.train.step import (LossFn, jit_eval_step, jit_train_step, make_eval_step,
                                 make_train_step)

# (tx, schedule) -> (state, batch) -> (state, metrics): a stage's own step instead of the generic
# gradient step over a loss (PPO's rollout-and-update step).
StepFactory = Callable[[optax.GradientTransformation, optax.Schedule], Callable]


@dataclasses.dataclass
class BuiltStep:
  """What `build_step` makes; `abstract` carries the shardings, so `train_step.lower(abstract,
  batch)` compiles without allocating anything."""
  init_fn: BoxedInit
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract: TrainState  # ShapeDtypeStructs with shardings
  shardings: TrainState  # NamedShardings, same tree
  batch_sharding: NamedSharding
  train_step: Callable  # jitted (state, batch) -> (state, metrics); the state is donated
  eval_step: Callable | None  # jitted (state, batch) -> outputs, or None


def build_step(*, init_fn: BoxedInit, optimizer: ConfigDict, total_steps: int, mesh: Mesh,
               rules: Rules = DEFAULT_RULES, loss_fn: LossFn | None = None, micro_batches: int = 1,
               make_step: StepFactory | None = None, eval_loss: LossFn | None = None,
               with_eval: bool = False, updates_per_step: int = 1) -> BuiltStep:
  """The jitted step of `loss_fn` (or of `make_step`) with explicit shardings from `mesh`/`rules`.

  `with_eval` also jits an eval step over `eval_loss` (default: `loss_fn`; none when neither is
  given: a stage with its own step evaluates with its own programs). `updates_per_step`: the
  optimizer updates one step of `make_step` makes (see `make_optimizer`)."""
  if (loss_fn is None) == (make_step is None):
    raise ValueError("build_step takes exactly one of loss_fn and make_step")
  tx, schedule = make_optimizer(optimizer, total_steps, updates_per_step)
  abstract, shardings = abstract_state(init_fn, tx, mesh, rules)
  b_sharding = batch_sharding(mesh, rules)
  step_fn = (make_step(tx, schedule) if make_step is not None else
             make_train_step(loss_fn, tx, schedule, micro_batches))
  train_step = jit_train_step(step_fn, shardings, b_sharding, rules)
  eval_step = None
  eval_fn = eval_loss or loss_fn
  if with_eval and eval_fn is not None:
    eval_step = jit_eval_step(make_eval_step(eval_fn), shardings, b_sharding, rules)
  return BuiltStep(init_fn=init_fn, tx=tx, schedule=schedule, abstract=abstract,
                   shardings=shardings, batch_sharding=b_sharding, train_step=train_step,
                   eval_step=eval_step)


def abstract_batch_like(host_batch: dict[str, Any], sharding: NamedSharding) -> dict[str, Any]:
  """ShapeDtypeStructs of a host batch, in the batch sharding (for `train_step.lower`)."""
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
          for k, v in host_batch.items()}
