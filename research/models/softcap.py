"""Tanh soft-capping, `cap * tanh(x / cap)`, as Gemma applies it to attention scores and to the
final logits: the identity when `cap` is None, otherwise bounded to (-cap, cap)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
  """`cap * tanh(x / cap)` in x's dtype (transformers divides, takes tanh, multiplies back)."""
  if cap is None:
    return x
  return jnp.tanh(x / cap) * cap


def soft_cap_with_slope(x: jax.Array, cap: float | None) -> tuple[jax.Array, jax.Array | None]:
  """(soft_cap(x, cap), its derivative 1 - tanh(x / cap)^2, or None when `cap` is None): what a
  hand-written backward multiplies the capped values' gradient by."""
  if cap is None:
    return x, None
  t = jnp.tanh(x / cap)
  return t * cap, 1.0 - t * t
