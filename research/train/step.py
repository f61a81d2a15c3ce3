"""The train step `(state, batch) -> (state, metrics)`, built once for every stage.

A stage supplies a loss function `(params, frozen, batch, rng) -> (numerator, denominator, aux)`:
the loss is numerator / denominator summed over micro-batches, so gradient accumulation gives the
same gradient as one big batch (token-weighted for LM losses, pair-weighted for rank losses).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from research.parallel.activations import activation_sharding
from research.parallel.rules import DEFAULT_RULES, Rules
from research.train.state import TrainState

Batch = dict[str, jax.Array]
# 1.0 when the step's loss and gradient norm were finite and its update was applied, 0.0 when the
# update was skipped; the loop reads it with the metrics it fetches anyway (no extra round trip).
FINITE = "finite"
LossFn = Callable[[Any, Any, Batch, jax.Array], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


def split_micro_batches(batch: Batch, micro_batches: int) -> Batch:
  """[B, ...] -> [micro_batches, B / micro_batches, ...]; micro-batch m holds rows m, m+M, m+2M, ...

  Strided rather than contiguous, so that every device holds an equal share of every micro-batch
  when the rows are sharded over the data axes.
  """
  def split(x):
    if x.shape[0] % micro_batches:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into {micro_batches} micro-batches")
    return jnp.swapaxes(x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: LossFn, params, frozen, batch: Batch, rng, micro_batches: int):
  """Sum of numerators' gradients, numerators, denominators and aux over micro-batches (a scan;
  `mean_gradients` takes one micro-batch without it)."""
  grad_fn = jax.grad(lambda p, f, b, r: _with_sums(loss_fn, p, f, b, r), has_aux=True)
  micro = split_micro_batches(batch, micro_batches)

  def body(carry, xs):
    grads_acc, num_acc, den_acc, aux_acc = carry
    mb, i = xs
    grads, (num, den, aux) = grad_fn(params, frozen, mb, jax.random.fold_in(rng, i))
    add = lambda a, b: a + b
    return (jax.tree.map(add, grads_acc, grads), num_acc + num, den_acc + den,
            jax.tree.map(add, aux_acc, aux)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  aux_shape = jax.eval_shape(lambda: _with_sums(loss_fn, params, frozen,
                                                jax.tree.map(lambda x: x[0], micro), rng)[1][2])
  aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
  init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), aux0)
  (grads, num, den, aux), _ = jax.lax.scan(body, init, (micro, jnp.arange(micro_batches)))
  aux = jax.tree.map(lambda a: a / micro_batches, aux)
  return grads, num, den, aux


def mean_gradients(loss_fn: LossFn, params, frozen, batch: Batch, rng, micro_batches: int):
  """(gradient of sum(numerators) / D, sum(numerators), D, aux), D = max(sum(denominators), 1).

  With one micro-batch the division rides on the backward's seed (the denominator is a count, held
  constant): the gradients come out divided, without a pass of their own over every gradient
  (about 1% of bench_train's S step on CPU).
  """
  if micro_batches == 1:
    def objective(p, f, b, r):
      num, den, aux = loss_fn(p, f, b, r)
      den = jnp.maximum(jax.lax.stop_gradient(den), 1.0)
      return num / den.astype(num.dtype), (num, den, aux)
    grads, (num, den, aux) = jax.grad(objective, has_aux=True)(params, frozen, batch, rng)
    return grads, num, den, aux
  grads, num, den, aux = accumulate_gradients(loss_fn, params, frozen, batch, rng, micro_batches)
  den = jnp.maximum(den, 1.0)
  return jax.tree.map(lambda g: g / den.astype(g.dtype), grads), num, den, aux


def _with_sums(loss_fn: LossFn, params, frozen, batch, rng):
  num, den, aux = loss_fn(params, frozen, batch, rng)
  return num, (num, den, aux)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    micro_batches: int = 1) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  def train_step(state: TrainState, batch: Batch):
    rng = jax.random.fold_in(state.rng, state.step)
    grads, num, den, aux = mean_gradients(loss_fn, state.params, state.frozen, batch, rng,
                                          micro_batches)
    loss, grad_norm = num / den, optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(_):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      return optax.apply_updates(state.params, updates), opt_state

    # The update runs only on a finite step: a conditional, not a selection between the new and
    # the old state after the fact, which would be one more pass over every param and moment.
    params, opt_state = jax.lax.cond(ok, update, lambda _: (state.params, state.opt_state), None)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
               "loss_tokens": den, **aux, FINITE: ok.astype(jnp.float32)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  train_step.guards_non_finite = True  # see guard_non_finite
  return train_step


def _checked_metrics(metrics: dict) -> list[jax.Array]:
  # "loss" and "grad_norm" of the generic step, and the "loss/..." parts of a stage's own (PPO).
  return [v for k, v in metrics.items() if k in ("loss", "grad_norm") or k.startswith("loss/")]


def guard_non_finite(step_fn: Callable[[TrainState, Batch], tuple[TrainState, dict]]):
  """`step_fn` that keeps the old params and optimizer state when its loss or gradient norm is
  not finite (the step counter still advances, so schedule and data stay aligned with the loop),
  and reports `metrics[FINITE]`. A selection inside the step: no host round trip."""

  if getattr(step_fn, "guards_non_finite", False):  # make_train_step's own conditional update
    return step_fn

  def guarded(state: TrainState, batch: Batch):
    new_state, metrics = step_fn(state, batch)
    checked = _checked_metrics(metrics)
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in checked])) if checked else (
        jnp.asarray(True))
    kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                        new_state.replace(step=state.step), state)
    return kept.replace(step=new_state.step), {**metrics, FINITE: ok.astype(jnp.float32)}

  return guarded


def make_eval_step(loss_fn: LossFn) -> Callable[[TrainState, Batch], tuple[jax.Array, jax.Array]]:
  def eval_step(state: TrainState, batch: Batch):
    num, den, _ = loss_fn(state.params, state.frozen, batch, state.rng)
    return num, den
  return eval_step


def _traced_with(fn, mesh, rules: Rules):
  """`fn` traced inside `activation_sharding`: the decoder's activations get the rules' shardings."""

  @functools.wraps(fn)
  def traced(*args):
    with activation_sharding(mesh, rules):
      return fn(*args)
  return traced


def jit_train_step(step_fn, state_shardings: TrainState, batch_sharding: NamedSharding,
                   rules: Rules = DEFAULT_RULES):
  """Explicit in/out shardings from the mesh and rules; the old state is donated. Activations are
  constrained by the same rules (`research.parallel.activations`). Every stage's step goes through
  `guard_non_finite` here, so no non-finite update reaches the state."""
  mesh = batch_sharding.mesh
  replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(_traced_with(guard_non_finite(step_fn), mesh, rules), in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def jit_eval_step(eval_fn, state_shardings: TrainState, batch_sharding: NamedSharding,
                  rules: Rules = DEFAULT_RULES):
  mesh = batch_sharding.mesh
  replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(_traced_with(eval_fn, mesh, rules), in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(replicated, replicated))
