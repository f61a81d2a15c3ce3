"""The train state pytree and its creation directly in its shardings on a mesh."""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from research.parallel.rules import DEFAULT_RULES, Rules, logical_axes_of, shardings_for


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []
  params: Any  # trained
  frozen: Any  # held fixed (the base under LoRA, a reference model, ...); {} when all train
  opt_state: Any  # optax state of `params` only, so its memory scales with what trains
  rng: jax.Array  # uint32 [2]; per-step keys are folded in from `step`, so resume is exact


# A stage's initialiser: rng -> (trainable, frozen), both possibly boxed with logical axis names.
BoxedInit = Callable[[jax.Array], tuple[Any, Any]]


def _new_state(rng, init_fn: BoxedInit, tx: optax.GradientTransformation) -> TrainState:
  params, frozen = init_fn(rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                    opt_state=tx.init(params), rng=rng)


def abstract_state(init_fn: BoxedInit, tx: optax.GradientTransformation, mesh: Mesh,
                   rules: Rules = DEFAULT_RULES) -> tuple[TrainState, TrainState]:
  """(abstract state of ShapeDtypeStructs carrying shardings, matching tree of NamedShardings)."""
  boxed = jax.eval_shape(lambda: _new_state(jax.random.PRNGKey(0), init_fn, tx))
  logical = logical_axes_of(boxed)
  shapes = nn.meta.unbox(boxed)
  shardings = shardings_for(shapes, logical, mesh, rules)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
  return abstract, shardings


def init_state(init_fn: BoxedInit, tx: optax.GradientTransformation, shardings: TrainState,
               seed: int) -> TrainState:
  """A fresh state, each array created directly in its sharding (no full host copy)."""
  make = jax.jit(lambda rng: nn.meta.unbox(_new_state(rng, init_fn, tx)), out_shardings=shardings)
  return make(jax.random.PRNGKey(seed))


def state_from_params(params: Any, frozen: Any, tx: optax.GradientTransformation,
                      shardings: TrainState, seed: int) -> TrainState:
  """A state around given (e.g. imported) params; the optimizer state is created in place."""
  params = jax.device_put(params, shardings.params)
  frozen = jax.device_put(frozen, shardings.frozen)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params=params,
                    frozen=frozen, opt_state=opt_state,
                    rng=jax.device_put(jax.random.PRNGKey(seed), shardings.rng))
