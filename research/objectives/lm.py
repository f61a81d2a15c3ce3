"""Next-token cross-entropy in float32 with a loss mask (pure jax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
  """Negative log-likelihood of each target token, computed in float32. [B, T]"""
  logits_btv = logits_btv.astype(jnp.float32)
  logz_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
  return logz_bt - target_logit_bt


def masked_nll_sum(logits_btv: jax.Array, targets_bt: jax.Array,
                   loss_mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of masked token NLL, number of masked-in tokens): divide after summing over micro-batches."""
  mask_bt = loss_mask_bt.astype(jnp.float32)
  return jnp.sum(token_nll(logits_btv, targets_bt) * mask_bt), jnp.sum(mask_bt)


def masked_lm_loss(logits_btv: jax.Array, targets_bt: jax.Array,
                   loss_mask_bt: jax.Array) -> jax.Array:
  total, count = masked_nll_sum(logits_btv, targets_bt, loss_mask_bt)
  return total / jnp.maximum(count, 1.0)
