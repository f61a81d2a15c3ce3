"""Ranking loss for reward models: K-wise pair losses against a numpy double loop (K=2, 3, 4, with
padded completions and margins), reward centering and the pair metrics."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.objectives import ranking

# Jitted once each: eager jax would compile every primitive per shape, slow on a busy CPU.
rank_loss = jax.jit(ranking.rank_loss)
pair_metrics = jax.jit(ranking.pair_metrics)
reward_centering = jax.jit(ranking.reward_centering)


def neg_log_sigmoid(x):
  return np.logaddexp(0.0, -x)


def reference_rank_loss(rewards_bk, valid_bk, margins_bkk, margin_b):
  total, pairs = 0.0, 0
  for b in range(rewards_bk.shape[0]):
    for i, j in itertools.combinations(range(rewards_bk.shape[1]), 2):
      if valid_bk[b, i] and valid_bk[b, j]:
        m = margins_bkk[b, i, j] + margin_b[b]
        total += neg_log_sigmoid(rewards_bk[b, i] - rewards_bk[b, j] - m)
        pairs += 1
  return total, pairs


def make_inputs(k, masked, seed=0):
  rng = np.random.default_rng(seed)
  rewards_bk = rng.normal(size=(5, k)).astype(np.float32) * 2
  valid_bk = np.ones((5, k), bool)
  if masked:
    valid_bk[1, k - 1:] = False  # one response fewer
    valid_bk[3, 1:] = False  # a single response: no pair
    rewards_bk[~valid_bk] = np.inf  # whatever sits in padding must not leak
  return rewards_bk, valid_bk, rng


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("margins", ["none", "pairwise", "per_prompt", "both"])
def test_rank_loss_matches_double_loop(k, masked, margins):
  rewards_bk, valid_bk, rng = make_inputs(k, masked)
  margins_bkk = rng.uniform(0, 1, size=(5, k, k)).astype(np.float32)
  margin_b = rng.uniform(0, 1, size=5).astype(np.float32)
  use_pair = margins in ("pairwise", "both")
  use_prompt = margins in ("per_prompt", "both")
  want_loss, want_pairs = reference_rank_loss(
      rewards_bk, valid_bk, margins_bkk if use_pair else np.zeros_like(margins_bkk),
      margin_b if use_prompt else np.zeros_like(margin_b))
  loss, pairs = rank_loss(
      jnp.asarray(rewards_bk), jnp.asarray(valid_bk) if masked else None,
      jnp.asarray(margins_bkk) if use_pair else None, jnp.asarray(margin_b) if use_prompt else None)
  assert float(pairs) == want_pairs
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)


def test_pairwise_is_bradley_terry_and_gradients_are_finite():
  r_chosen_b = np.array([1.0, -0.5, 3.0, 0.0], np.float32)
  r_rejected_b = np.array([0.0, 0.5, -2.0, 0.0], np.float32)
  rewards_bk = jnp.stack([r_chosen_b, r_rejected_b], axis=1)
  loss, pairs = rank_loss(rewards_bk)
  np.testing.assert_allclose(float(loss), neg_log_sigmoid(r_chosen_b - r_rejected_b).sum(),
                             rtol=1e-6)
  assert float(pairs) == 4
  # Far apart rewards: log_sigmoid keeps the loss and its gradient finite.
  valid_bk = jnp.array([[True, True], [True, False]])
  grad_bk = jax.grad(lambda r: rank_loss(r, valid_bk)[0])(jnp.array([[-200.0, 200.0],
                                                                     [1.0, jnp.inf]]))
  assert np.isfinite(np.asarray(grad_bk)).all()
  np.testing.assert_allclose(np.asarray(grad_bk), [[-1.0, 1.0], [0.0, 0.0]])


def test_reward_centering():
  rewards_bk, _, _ = make_inputs(3, False)
  loss, pairs = rank_loss(jnp.asarray(rewards_bk))
  term = reward_centering(jnp.asarray(rewards_bk), None, 0.01)
  # Uniform K: divided by the pair count it is coef * mean(r^2).
  np.testing.assert_allclose(float(term / pairs), 0.01 * np.mean(rewards_bk ** 2), rtol=1e-6)
  rewards_bk, valid_bk, _ = make_inputs(4, True)
  want = 0.0
  for r_k, v_k in zip(rewards_bk, valid_bk):
    n = v_k.sum()
    want += 0.01 * n * (n - 1) / 2 * np.mean(r_k[v_k] ** 2)
  got = reward_centering(jnp.asarray(rewards_bk), jnp.asarray(valid_bk), 0.01)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_pair_metrics():
  rewards_bk, valid_bk, _ = make_inputs(4, True)
  got = {k: float(v) for k, v in pair_metrics(jnp.asarray(rewards_bk),
                                              jnp.asarray(valid_bk)).items()}
  accurate = margin = pairs = 0.0
  for r_k, v_k in zip(rewards_bk, valid_bk):
    for i, j in itertools.combinations(range(4), 2):
      if v_k[i] and v_k[j]:
        accurate += r_k[i] > r_k[j]
        margin += r_k[i] - r_k[j]
        pairs += 1
  valid_r = rewards_bk[valid_bk]
  want = {"accurate_pairs": accurate, "margin_sum": margin, "num_pairs": pairs,
          "reward_sum": valid_r.sum(), "reward_sq_sum": (valid_r ** 2).sum(),
          "best_reward_sum": rewards_bk[:, 0].sum(), "num_rewards": valid_bk.sum(),
          "num_prompts": 5}
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
