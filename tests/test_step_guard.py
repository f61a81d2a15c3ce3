"""The generic step updates only on a finite loss and gradient norm (a conditional inside the
step); steps of other shapes get the same guarantee from `guard_non_finite`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.parallel.mesh import make_mesh
from research.parallel.rules import batch_sharding
from research.train.state import TrainState
from research.train.step import FINITE, guard_non_finite, jit_train_step, make_train_step


def _state(tx):
  params = {"w": jnp.arange(4.0)}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen={},
                    opt_state=tx.init(params), rng=jax.random.PRNGKey(0))


def _loss(params, frozen, batch, rng):
  del frozen, rng  # scale 0 gives a finite step, inf a non-finite one
  return jnp.sum(params["w"] ** 2) * batch["scale"][0], jnp.asarray(1.0), {}


def test_the_update_runs_only_on_a_finite_step():
  tx = optax.adam(0.1)
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  shardings = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                           _state(tx))
  step = jit_train_step(make_train_step(_loss, tx, optax.constant_schedule(0.1)), shardings,
                        batch_sharding(mesh))
  state = _state(tx)
  before = jax.tree.map(np.asarray, (state.params, state.opt_state))
  bad, metrics = step(state, {"scale": jnp.full((1,), jnp.inf)})
  assert float(metrics[FINITE]) == 0.0 and int(bad.step) == 1
  after = jax.tree.map(np.asarray, (bad.params, bad.opt_state))
  jax.tree.map(np.testing.assert_array_equal, before, after)
  good, metrics = step(bad, {"scale": jnp.ones((1,))})
  assert float(metrics[FINITE]) == 1.0 and int(good.step) == 2
  assert not np.allclose(np.asarray(good.params["w"]), before[0]["w"])


def test_a_stage_step_is_wrapped_and_keeps_its_state_on_nan():
  def stage_step(state, batch):
    new = state.replace(step=state.step + 1, params={"w": state.params["w"] + batch["delta"]})
    return new, {"loss": jnp.sum(new.params["w"])}

  tx = optax.sgd(1.0)
  guarded = jax.jit(guard_non_finite(stage_step))
  state = _state(tx)
  kept, metrics = guarded(state, {"delta": jnp.full((4,), jnp.nan)})
  assert float(metrics[FINITE]) == 0.0 and int(kept.step) == 1
  np.testing.assert_array_equal(kept.params["w"], state.params["w"])
  assert make_train_step(_loss, tx, optax.constant_schedule(1.0)).guards_non_finite
