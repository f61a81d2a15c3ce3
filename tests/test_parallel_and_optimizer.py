"""Mesh construction, logical-axis rules, the LM loss against numpy, and the optimizer's decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from research.errors import ConfigError
from research.objectives.lm import masked_lm_loss, masked_nll_sum
from research.parallel.mesh import make_mesh, resolve_mesh_shape
from research.parallel.rules import batch_sharding, logical_to_spec
from research.train.optimizer import learning_rate_schedule, make_optimizer, weight_decay_mask


def test_mesh_fills_minus_one_and_rejects_bad_shapes():
  assert resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  with pytest.raises(ConfigError, match="needs 6 devices but 8 are available"):
    resolve_mesh_shape({"data": 3, "fsdp": 2}, 8)
  with pytest.raises(ConfigError, match="at most one axis may be -1"):
    resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_rules_drop_axes_that_do_not_divide_or_repeat():
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
  # vocab 97 is not divisible by tensor=2: replicated instead of an error
  assert logical_to_spec(("vocab", "embed"), (97, 64), mesh) == P(None, "fsdp")
  # heads and kv_heads both map to tensor; the mesh axis is used once per array
  assert logical_to_spec(("heads", "kv_heads"), (4, 2), mesh) == P("tensor", None)
  assert batch_sharding(mesh).spec == P(("data", "fsdp"))


def test_masked_lm_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, size=(2, 5))
  mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
  expected_sum = 0.0
  for b in range(2):
    for t in range(5):
      row = logits[b, t].astype(np.float64)
      logz = np.log(np.exp(row - row.max()).sum()) + row.max()
      expected_sum += mask[b, t] * (logz - row[targets[b, t]])
  total, count = masked_nll_sum(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(total, expected_sum, rtol=1e-5)
  assert count == mask.sum()
  np.testing.assert_allclose(masked_lm_loss(logits, targets, mask), expected_sum / mask.sum(),
                             rtol=1e-5)


def _opt_cfg(**kw):
  c = ConfigDict(dict(lr=1e-2, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1, b1=0.9,
                      b2=0.95, eps=1e-8, weight_decay=0.5, clip_norm=1.0))
  c.update(kw)
  return c


def test_schedule_warms_up_linearly_then_decays_to_floor():
  sched = learning_rate_schedule(_opt_cfg(), total_steps=100)
  np.testing.assert_allclose([sched(0), sched(5), sched(10)], [0.0, 5e-3, 1e-2], rtol=1e-6)
  np.testing.assert_allclose(sched(100), 1e-3, rtol=1e-5)
  with pytest.raises(ConfigError, match="warmup_steps"):
    learning_rate_schedule(_opt_cfg(warmup_steps=200), total_steps=100)


def test_weight_decay_skips_norms_and_biases():
  params = {"attn": {"q": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}},
            "attn_norm": {"scale": jnp.ones(2)}, "embed": {"embedding": jnp.ones((3, 2))}}
  mask = weight_decay_mask(params)
  assert mask == {"attn": {"q": {"kernel": True, "bias": False}}, "attn_norm": {"scale": False},
                  "embed": {"embedding": True}}
  # With zero gradients only decayed leaves move.
  tx, _ = make_optimizer(_opt_cfg(warmup_steps=0, clip_norm=0.0), total_steps=10)
  state = tx.init(params)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  new = optax.apply_updates(params, updates)
  assert float(new["attn"]["q"]["kernel"][0, 0]) < 1.0
  assert float(new["attn"]["q"]["bias"][0]) == 1.0 and float(new["attn_norm"]["scale"][0]) == 1.0


def test_schedule_follows_steps_when_a_step_makes_several_updates():
  # b1 = b2 = 0 and no decay or clipping: each AdamW update of a unit gradient moves the param by
  # -lr(update) (up to eps), so the deltas read back the rate the optimizer used at each update.
  cfg = _opt_cfg(warmup_steps=1, b1=0.0, b2=0.0, eps=1e-12, weight_decay=0.0, clip_norm=0.0)
  tx, schedule = make_optimizer(cfg, total_steps=4, updates_per_step=3)
  params, state, deltas = jnp.zeros(()), None, []
  state = tx.init(params)
  for _ in range(12):
    updates, state = tx.update(jnp.ones(()), state, params)
    deltas.append(-float(updates))
    params = optax.apply_updates(params, updates)
  expected = [float(schedule(u // 3)) for u in range(12)]
  np.testing.assert_allclose(deltas, expected, rtol=1e-5)
  assert expected[3] > expected[-1] > 0  # the schedule does decay over the 4 steps
  with pytest.raises(ValueError, match="updates_per_step"):
    make_optimizer(cfg, total_steps=4, updates_per_step=0)
