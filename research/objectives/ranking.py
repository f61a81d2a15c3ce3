"""Reward-model ranking loss over K completions per prompt (K=2: the pairwise Bradley-Terry loss),
with a reward-magnitude penalty and accuracy/margin metrics, all as sums plus counts (pure jax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _valid(rewards_bk: jax.Array, valid_bk: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """(float32 rewards with padding set to 0, float32 valid mask)."""
  rewards_bk = rewards_bk.astype(jnp.float32)
  if valid_bk is None:
    return rewards_bk, jnp.ones(rewards_bk.shape, jnp.float32)
  # Zeroed before any arithmetic: a padded completion's reward may be anything, even inf, and a
  # where() after the fact would still leak nan into the gradient.
  return jnp.where(valid_bk.astype(bool), rewards_bk, 0.0), valid_bk.astype(jnp.float32)


def pair_mask(valid_bk: jax.Array) -> jax.Array:
  """1.0 at `[b, i, j]` for every ordered pair i < j of valid completions of prompt b. [B, K, K]"""
  valid_bk = valid_bk.astype(jnp.float32)
  k = valid_bk.shape[-1]
  upper_kk = jnp.triu(jnp.ones((k, k), jnp.float32), 1)  # i < j: i is ranked above j
  return valid_bk[:, :, None] * valid_bk[:, None, :] * upper_kk


def rank_loss(rewards_bk: jax.Array, valid_bk: jax.Array | None = None,
              margins_bkk: jax.Array | None = None, margin_b: jax.Array | None = None,
              ) -> tuple[jax.Array, jax.Array]:
  """(sum of pair losses, number of pairs): divide after summing over micro-batches.

  `rewards_bk[b, k]` scores completion k of prompt b, completions ordered best first. Every pair
  i < j of valid completions adds `-log sigmoid(r_i - r_j - m_ij)` (InstructGPT's K-wise loss
  with all C(K, 2) pairs; K=2 is the Bradley-Terry pairwise loss `-log sigmoid(r_c - r_r - m)`).
  `valid_bk` (bool or 0/1, default all valid) marks real completions where K is padded; pairs
  touching a padded one count for nothing. The margin `m_ij` is `margins_bkk[b, i, j]` (only
  entries with i < j are read) plus `margin_b[b]` (one margin per prompt, for every pair, as in
  Llama 2's margin loss); either or both may be None (no margin). Computed in float32.
  """
  rewards_bk, valid_bk = _valid(rewards_bk, valid_bk)
  pairs_bkk = pair_mask(valid_bk)
  diff_bkk = rewards_bk[:, :, None] - rewards_bk[:, None, :]  # r_i - r_j
  if margins_bkk is not None:
    diff_bkk = diff_bkk - margins_bkk.astype(jnp.float32)
  if margin_b is not None:
    diff_bkk = diff_bkk - margin_b.astype(jnp.float32)[:, None, None]
  losses_bkk = jnp.where(pairs_bkk > 0, -jax.nn.log_sigmoid(diff_bkk), 0.0)
  return jnp.sum(losses_bkk), jnp.sum(pairs_bkk)


def reward_centering(rewards_bk: jax.Array, valid_bk: jax.Array | None, coef: float) -> jax.Array:
  """`coef * mean(r^2)` in the sum-over-pairs units of `rank_loss`, to add to its loss sum.

  Per prompt b with n_b valid completions and P_b = n_b (n_b - 1) / 2 pairs, the term is
  `coef * P_b * mean_k(r_bk^2)`; summed over prompts and divided by the pair count of
  `rank_loss`, it is `coef * mean(r^2)` when every prompt has the same K (a pair-weighted mean
  otherwise), and it adds up exactly over micro-batches. It keeps rewards near zero (their
  scale is free under the ranking loss). TRL's `center_rewards_coefficient` penalises the pair
  sum instead, `coef * mean((r_c + r_r)^2)`, which leaves the spread of a pair free.
  """
  rewards_bk, valid_bk = _valid(rewards_bk, valid_bk)
  n_b = jnp.sum(valid_bk, axis=-1)
  pairs_b = n_b * (n_b - 1.0) / 2.0
  sq_sum_b = jnp.sum(jnp.where(valid_bk > 0, jnp.square(rewards_bk), 0.0), axis=-1)
  return coef * jnp.sum(pairs_b * sq_sum_b / jnp.maximum(n_b, 1.0))


def pair_metrics(rewards_bk: jax.Array, valid_bk: jax.Array | None = None) -> dict[str, jax.Array]:
  """Sums for logging, to add up over micro-batches and divide at the end:

    accurate_pairs   pairs i < j ranked right, r_i > r_j (accuracy = / num_pairs; ties count 0)
    margin_sum       sum of r_i - r_j over pairs (mean margin = / num_pairs)
    num_pairs        valid pairs, as in `rank_loss`
    reward_sum       sum of valid rewards (mean = / num_rewards)
    reward_sq_sum    sum of their squares (std = sqrt(sq / n - mean^2))
    best_reward_sum  sum of the top-ranked completion's (k=0) reward (mean = / num_prompts)
    num_rewards      valid completions
    num_prompts      prompts whose top-ranked completion is valid
  """
  rewards_bk, valid_bk = _valid(rewards_bk, valid_bk)
  pairs_bkk = pair_mask(valid_bk)
  diff_bkk = rewards_bk[:, :, None] - rewards_bk[:, None, :]
  on_bkk = pairs_bkk > 0
  on_bk = valid_bk > 0
  return {
      "accurate_pairs": jnp.sum(jnp.where(on_bkk & (diff_bkk > 0), 1.0, 0.0)),
      "margin_sum": jnp.sum(jnp.where(on_bkk, diff_bkk, 0.0)),
      "num_pairs": jnp.sum(pairs_bkk),
      "reward_sum": jnp.sum(jnp.where(on_bk, rewards_bk, 0.0)),
      "reward_sq_sum": jnp.sum(jnp.where(on_bk, jnp.square(rewards_bk), 0.0)),
      "best_reward_sum": jnp.sum(jnp.where(on_bk[:, 0], rewards_bk[:, 0], 0.0)),
      "num_rewards": jnp.sum(valid_bk),
      "num_prompts": jnp.sum(valid_bk[:, 0]),
  }
