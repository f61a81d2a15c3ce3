"""PPO for language models as pure jax functions: KL-shaped per-token rewards, GAE, clipped policy
and value losses, whitening, entropy and the adaptive KL coefficient (TRL's PPOTrainer formulas).

Layout: `[batch, time]` arrays over response positions; `mask_bt` (bool or 0/1) is 1 on real
response tokens. Functions never branch on data, so all of them jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_KINDS = ("k1", "k3")


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def kl_penalty(logprobs_bt: jax.Array, ref_logprobs_bt: jax.Array, kind: str = "k1") -> jax.Array:
  """Per-token KL estimate of the policy from the reference, from sampled tokens' log-probs. [B, T]

  k1 (TRL `kl_estimator="k1"`): `logp - logp_ref`, unbiased, may be negative per token.
  k3 (TRL `"k3"`, Schulman's estimator): with `logr = logp_ref - logp`,
  `(exp(logr) - 1) - logr`: unbiased, never negative, lower variance.
  """
  if kind not in KL_KINDS:
    raise ValueError(f"kl kind={kind!r} is not one of {', '.join(KL_KINDS)}")
  logr_bt = _f32(ref_logprobs_bt) - _f32(logprobs_bt)
  if kind == "k1":
    return -logr_bt
  return jnp.expm1(logr_bt) - logr_bt


def last_index(mask_bt: jax.Array) -> jax.Array:
  """Index of each row's last masked-in position, -1 for a row with none. [B]"""
  t_bt = jnp.arange(mask_bt.shape[-1])[None, :]
  return jnp.max(jnp.where(mask_bt.astype(bool), t_bt, -1), axis=-1)


def per_token_rewards(scores_b: jax.Array, kl_bt: jax.Array, kl_coef: float | jax.Array,
                      mask_bt: jax.Array) -> jax.Array:
  """TRL's shaped rewards: `rewards = -kl_coef * kl` at every response token, plus the reward
  model's score at the last real token of each row (rows may end early; a row without response
  tokens gets nothing); 0 outside the mask. [B, T]

  TRL's PPOv2 adds the score one position after the last token when there is room (its values
  are kept one step longer to match); here it lands on the last real token itself.
  """
  mask_bt = _f32(mask_bt)
  at_end_bt = jax.nn.one_hot(last_index(mask_bt), mask_bt.shape[-1], dtype=jnp.float32)
  return (-kl_coef * _f32(kl_bt) + _f32(scores_b)[:, None] * at_end_bt) * mask_bt


def masked_sum_count(x: jax.Array, mask: jax.Array, axis=None) -> tuple[jax.Array, jax.Array]:
  """(sum of x where mask, count of mask): divide after summing over micro-batches."""
  mask = _f32(mask)
  return jnp.sum(jnp.where(mask > 0, _f32(x), 0.0), axis=axis), jnp.sum(mask, axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  """TRL: `(x * mask).sum(axis) / mask.sum(axis)`; 0 where the mask is empty (TRL gives nan)."""
  total, count = masked_sum_count(x, mask, axis)
  return total / jnp.maximum(count, 1.0)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
  """TRL: `masked_mean((x - masked_mean(x))^2)`, times the Bessel correction `n / (n - 1)` when
  `unbiased`. With n <= 1 the correction is left out (TRL raises on n = 0)."""
  centered = _f32(x) - masked_mean(x, mask)
  variance = masked_mean(jnp.square(centered), mask)
  if unbiased:
    n = jnp.sum(_f32(mask))
    variance = variance * jnp.where(n > 1, n / jnp.maximum(n - 1.0, 1.0), 1.0)
  return variance


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
  """TRL: `(x - mean) * rsqrt(var + 1e-8)` over masked-in entries (unbiased var); with
  `shift_mean=False` the mean is added back (only the scale changes, as for TRL's reward
  whitening). Masked-out entries come out as computed, not zeroed."""
  mean = masked_mean(x, mask)
  whitened = (_f32(x) - mean) * jax.lax.rsqrt(masked_var(x, mask) + 1e-8)
  return whitened if shift_mean else whitened + mean


def gae_advantages(values_bt: jax.Array, rewards_bt: jax.Array, mask_bt: jax.Array,
                   gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation, TRL's reverse loop, as a reverse `lax.scan` over time:

      nextvalues = values[:, t + 1] if t < T - 1 else 0
      delta = rewards[:, t] + gamma * nextvalues - values[:, t]
      lastgaelam = delta + gamma * lam * lastgaelam;  advantages[:, t] = lastgaelam
      returns = advantages + values

  with values and rewards at masked-out positions taken as 0, as TRL's padding masks make them:
  a row that ends early bootstraps from 0 after its last token. Masked-out positions come out 0
  in both results and pass the carry through unchanged, so a gap inside a row is skipped rather
  than cut. Returns `(advantages_bt, returns_bt)`, un-whitened (TRL whitens the advantages
  afterwards with `masked_whiten`).
  """
  mask_tb = _f32(mask_bt).T > 0
  values_tb = jnp.where(mask_tb, _f32(values_bt).T, 0.0)
  rewards_tb = jnp.where(mask_tb, _f32(rewards_bt).T, 0.0)

  def step(carry, inputs):
    nextvalues_b, lastgaelam_b = carry
    value_b, reward_b, on_b = inputs
    delta_b = reward_b + gamma * nextvalues_b - value_b
    gae_b = delta_b + gamma * lam * lastgaelam_b
    carry = (jnp.where(on_b, value_b, nextvalues_b), jnp.where(on_b, gae_b, lastgaelam_b))
    return carry, jnp.where(on_b, gae_b, 0.0)

  zeros_b = jnp.zeros(values_tb.shape[1], jnp.float32)
  _, advantages_tb = jax.lax.scan(step, (zeros_b, zeros_b), (values_tb, rewards_tb, mask_tb),
                                  reverse=True)
  return advantages_tb.T, (advantages_tb + values_tb).T


def policy_loss(new_logprobs_bt: jax.Array, old_logprobs_bt: jax.Array, advantages_bt: jax.Array,
                mask_bt: jax.Array, cliprange: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """PPO's clipped surrogate, TRL's form; returns `(loss, clipfrac, approxkl)`:

      ratio = exp(new - old)
      pg_losses = -A * ratio;  pg_losses2 = -A * clip(ratio, 1 - eps, 1 + eps)
      loss = masked_mean(max(pg_losses, pg_losses2))
      clipfrac = masked_mean(pg_losses2 > pg_losses)
      approxkl = 0.5 * masked_mean((new - old)^2)
  """
  logratio_bt = _f32(new_logprobs_bt) - _f32(old_logprobs_bt)
  ratio_bt = jnp.exp(logratio_bt)
  advantages_bt = _f32(advantages_bt)
  pg_losses_bt = -advantages_bt * ratio_bt
  pg_losses2_bt = -advantages_bt * jnp.clip(ratio_bt, 1.0 - cliprange, 1.0 + cliprange)
  loss = masked_mean(jnp.maximum(pg_losses_bt, pg_losses2_bt), mask_bt)
  clipfrac = masked_mean(_f32(pg_losses2_bt > pg_losses_bt), mask_bt)
  approxkl = 0.5 * masked_mean(jnp.square(logratio_bt), mask_bt)
  return loss, clipfrac, approxkl


def value_loss(new_values_bt: jax.Array, old_values_bt: jax.Array, returns_bt: jax.Array,
               mask_bt: jax.Array, cliprange_value: float) -> tuple[jax.Array, jax.Array]:
  """The clipped value loss, TRL's form; returns `(loss, clipfrac)`:

      vpredclipped = old + clip(new - old, -eps, eps)
      loss = 0.5 * masked_mean(max((new - R)^2, (vpredclipped - R)^2))
      clipfrac = masked_mean((vpredclipped - R)^2 > (new - R)^2)
  """
  new_values_bt, old_values_bt = _f32(new_values_bt), _f32(old_values_bt)
  returns_bt = _f32(returns_bt)
  vclipped_bt = old_values_bt + jnp.clip(new_values_bt - old_values_bt, -cliprange_value,
                                         cliprange_value)
  losses1_bt = jnp.square(new_values_bt - returns_bt)
  losses2_bt = jnp.square(vclipped_bt - returns_bt)
  loss = 0.5 * masked_mean(jnp.maximum(losses1_bt, losses2_bt), mask_bt)
  clipfrac = masked_mean(_f32(losses2_bt > losses1_bt), mask_bt)
  return loss, clipfrac


def entropy_from_logits(logits_btv: jax.Array) -> jax.Array:
  """TRL: `logsumexp(logits) - sum(softmax(logits) * logits)` per position, in float32. [B, T]

  Entries with probability 0 (e.g. -inf logits of masked-out vocabulary) add 0, not nan."""
  logits_btv = _f32(logits_btv)
  probs_btv = jax.nn.softmax(logits_btv, axis=-1)
  weighted_btv = jnp.where(probs_btv > 0, probs_btv * logits_btv, 0.0)
  return jax.nn.logsumexp(logits_btv, axis=-1) - jnp.sum(weighted_btv, axis=-1)


def explained_variance(values_bt: jax.Array, returns_bt: jax.Array, mask_bt: jax.Array,
                       ) -> jax.Array:
  """`1 - Var[returns - values] / Var[returns]` over masked-in positions: 1 is a perfect value
  function, 0 no better than a constant, negative worse; 0 when the returns are constant."""
  var_returns = masked_var(returns_bt, mask_bt)
  var_error = masked_var(_f32(returns_bt) - _f32(values_bt), mask_bt)
  return jnp.where(var_returns > 0, 1.0 - var_error / jnp.where(var_returns > 0, var_returns, 1.0),
                   0.0)


def adaptive_kl_update(kl_coef: float | jax.Array, current_kl: float | jax.Array, target: float,
                       horizon: float, n_steps: int | jax.Array) -> jax.Array:
  """The next KL coefficient of the adaptive controller (Ziegler et al. 2019, TRL's
  `AdaptiveKLController.update`):

      proportional_error = clip(current_kl / target - 1, -0.2, 0.2)
      kl_coef * (1 + proportional_error * n_steps / horizon)

  `n_steps` is the number of samples (TRL: the batch size) since the last update.
  """
  proportional_error = jnp.clip(_f32(current_kl) / target - 1.0, -0.2, 0.2)
  return _f32(kl_coef) * (1.0 + proportional_error * n_steps / horizon)
