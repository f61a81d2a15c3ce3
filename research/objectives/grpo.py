"""GRPO and its variants as pure jax functions: group-relative advantages (GRPO, Dr. GRPO, RLOO)
and the clipped policy loss with a k3 KL to the reference (TRL's GRPOTrainer formulas).

Layout: rewards `[batch, group]` (G completions of one prompt side by side); per-token arrays
`[rows, time]` over completion positions with rows = batch * group in that order (row b*G + g);
`mask_nt` is 1 on real completion tokens. Nothing branches on data, so everything jits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from research.objectives.ppo import kl_penalty

ADVANTAGES = ("group_std", "group_mean", "rloo")
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
STD_EPS = 1e-4  # TRL: advantages / (std + 1e-4)


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def group_advantages(rewards_bg: jax.Array, kind: str = "group_std") -> jax.Array:
  """One advantage per completion from its group's rewards. [B, G]

  group_std (GRPO paper, TRL `scale_rewards=True`): `(r - mean) / (std + 1e-4)`, std unbiased.
  group_mean (Dr. GRPO, TRL `scale_rewards=False`): `r - mean`.
  rloo: `r - mean of the other G-1 rewards` = `G / (G - 1) * (r - mean)`.
  A group whose rewards are all equal gets advantage 0 under every kind.
  """
  if kind not in ADVANTAGES:
    raise ValueError(f"advantage kind={kind!r} is not one of {', '.join(ADVANTAGES)}")
  rewards_bg = _f32(rewards_bg)
  g = rewards_bg.shape[-1]
  centered_bg = rewards_bg - jnp.mean(rewards_bg, axis=-1, keepdims=True)
  if kind == "group_mean":
    return centered_bg
  if kind == "rloo":
    if g < 2:
      raise ValueError("rloo needs at least 2 completions per prompt (a leave-one-out baseline)")
    return centered_bg * (g / (g - 1))
  std_b1 = jnp.std(rewards_bg, axis=-1, keepdims=True, ddof=1) if g > 1 else \
      jnp.zeros_like(centered_bg[:, :1])
  return centered_bg / (std_b1 + STD_EPS)


def group_stats(rewards_bg: jax.Array) -> dict[str, jax.Array]:
  """TRL's reward metrics: `reward` (mean), `reward_std` (mean of the groups' unbiased std) and
  `frac_reward_zero_std` (groups whose rewards are all equal, which teach nothing)."""
  rewards_bg = _f32(rewards_bg)
  std_b = jnp.std(rewards_bg, axis=-1, ddof=1) if rewards_bg.shape[-1] > 1 else \
      jnp.zeros(rewards_bg.shape[:1])
  return {"reward": jnp.mean(rewards_bg), "reward_std": jnp.mean(std_b),
          "frac_reward_zero_std": jnp.mean(_f32(jnp.isclose(std_b, 0.0)))}


def per_token_losses(logprobs_nt: jax.Array, old_logprobs_nt: jax.Array, advantages_n: jax.Array,
                     epsilon_low: float, epsilon_high: float,
                     ref_logprobs_nt: jax.Array | None = None, beta: float = 0.0
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """TRL's per-token GRPO loss and what its metrics read, before any masking. [N, T]

      ratio = exp(logp - old);  clipped = clip(ratio, 1 - eps_low, 1 + eps_high)
      loss = -min(ratio * A, clipped * A) + beta * k3(logp, ref)
      low clipped: ratio < 1 - eps_low and A < 0;  high clipped: ratio > 1 + eps_high and A > 0

  The KL term carries its gradient (it is a loss, not a shaped reward as in PPO).
  """
  logprobs_nt = _f32(logprobs_nt)
  ratio_nt = jnp.exp(logprobs_nt - _f32(old_logprobs_nt))
  clipped_nt = jnp.clip(ratio_nt, 1.0 - epsilon_low, 1.0 + epsilon_high)
  adv_n1 = _f32(advantages_n)[:, None]
  loss_nt = -jnp.minimum(ratio_nt * adv_n1, clipped_nt * adv_n1)
  parts = {"low_clipped": _f32((ratio_nt < 1.0 - epsilon_low) & (adv_n1 < 0)),
           "high_clipped": _f32((ratio_nt > 1.0 + epsilon_high) & (adv_n1 > 0))}
  if ref_logprobs_nt is not None and beta:
    kl_nt = kl_penalty(logprobs_nt, ref_logprobs_nt, "k3")
    loss_nt = loss_nt + beta * kl_nt
    parts["kl"] = kl_nt
  return loss_nt, parts


def normalized_loss_sum(loss_nt: jax.Array, mask_nt: jax.Array, loss_type: str,
                        max_completion_length: int) -> tuple[jax.Array, jax.Array]:
  """(numerator, denominator) of the loss: summed over micro-batches, their ratio is the full
  batch's loss, so gradient accumulation changes nothing.

  grpo: mean over rows of each row's token mean (long completions weigh less per token).
  dapo: token mean over the batch (TRL `dapo` in one process, and `bnpo`).
  dr_grpo: token sum over rows * max_completion_length (a constant: no length bias).
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"loss_type={loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
  mask_nt = _f32(mask_nt)
  sum_n = jnp.sum(_f32(loss_nt) * mask_nt, axis=-1)
  rows = jnp.asarray(sum_n.shape[0], jnp.float32)
  if loss_type == "grpo":
    return jnp.sum(sum_n / jnp.maximum(jnp.sum(mask_nt, axis=-1), 1.0)), rows
  if loss_type == "dapo":
    return jnp.sum(sum_n), jnp.sum(mask_nt)
  return jnp.sum(sum_n), rows * max_completion_length


def grpo_loss(logprobs_nt: jax.Array, old_logprobs_nt: jax.Array, advantages_n: jax.Array,
              mask_nt: jax.Array, *, loss_type: str, epsilon_low: float, epsilon_high: float,
              max_completion_length: int, ref_logprobs_nt: jax.Array | None = None,
              beta: float = 0.0) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """(numerator, denominator, sums): the loss is numerator / denominator; `sums` are token sums
  (`tokens`, `low_clipped`, `high_clipped`, `region_clipped`, `kl`) whose ratios to `tokens` are
  TRL's `clip_ratio/*_mean` and `kl` (sums, so micro-batches add up exactly)."""
  loss_nt, parts = per_token_losses(logprobs_nt, old_logprobs_nt, advantages_n, epsilon_low,
                                    epsilon_high, ref_logprobs_nt, beta)
  num, den = normalized_loss_sum(loss_nt, mask_nt, loss_type, max_completion_length)
  mask_nt = _f32(mask_nt)
  parts["region_clipped"] = jnp.maximum(parts["low_clipped"], parts["high_clipped"])
  sums = {k: jnp.sum(v * mask_nt) for k, v in parts.items()}
  sums["tokens"] = jnp.sum(mask_nt)
  return num, den, sums
