"""Rotary position tables, plain and scaled, computed as transformers computes them.

`rope_scaling` is the Hugging Face dict (here as a Mapping) with `rope_type` one of ROPE_TYPES;
None is plain RoPE. Every array operation runs in float32 in the order transformers'
`modeling_rope_utils` runs it, and its Python-side scalars (wavelength bounds, YaRN's correction
range and attention factor) are Python floats as there, so the angles match its to the last bits
that float32 pow/cos differences between libraries allow.

'dynamic' (dynamic NTK) depends on the positions of the call: transformers' `dynamic_rope_update`
recomputes the base from seq_len = max(position_ids) + 1 over the batch whenever that exceeds
`max_position_embeddings`. Here each call does the same from its own positions, which is what a
freshly loaded transformers model gives for a forward pass and for every step of `generate` (its
positions only grow within a call). Transformers keeps the largest base seen across calls until a
call's seq_len drops below `max_position_embeddings`; that cross-call memory is not reproduced.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from research.errors import ConfigError

# rope_type -> (required keys, optional keys); `rope_type` itself is always present.
ROPE_TYPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
              "truncate")),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings"), ()),
}
# Types transformers computes that this decoder does not (their tables need per-dimension lists or
# only partially rotate heads).
UNSUPPORTED_TYPES = ("longrope", "proportional", "axial")


def _number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_rope_scaling(scaling: Mapping[str, Any] | None, field: str = "model.rope_scaling"):
  """ConfigError naming `<field>.<key>` for an unknown type, a missing or unknown key, or a bad
  value (factors must be numbers >= 1, since transformers' tables assume stretching)."""
  if scaling is None:
    return
  rope_type = scaling.get("rope_type")
  if rope_type not in ROPE_TYPES:
    raise ConfigError(f"{field}.rope_type={rope_type!r}; choose one of {sorted(ROPE_TYPES)} "
                      f"(or set {field} to None for plain RoPE)")
  required, optional = ROPE_TYPES[rope_type]
  for key in required:
    if scaling.get(key) is None:
      raise ConfigError(f"{field}.{key} is missing; rope_type={rope_type!r} needs "
                        f"{list(required)}")
  unknown = sorted(set(scaling) - {"rope_type", *required, *optional})
  if unknown:
    raise ConfigError(f"{field}.{unknown[0]} is not a {rope_type!r} parameter; its keys are "
                      f"{list(required + optional)}")
  if not (_number(scaling["factor"]) and scaling["factor"] >= 1):
    raise ConfigError(f"{field}.factor must be a number >= 1, got {scaling['factor']!r}")
  for key in ("original_max_position_embeddings",):
    if key in required and not (isinstance(scaling[key], int) and scaling[key] > 0):
      raise ConfigError(f"{field}.{key} must be a positive integer, got {scaling[key]!r}")
  if rope_type == "llama3":
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    if not (_number(low) and _number(high) and 0 < low < high):
      raise ConfigError(f"{field}.high_freq_factor={high!r} must exceed "
                        f"{field}.low_freq_factor={low!r} (both positive numbers)")
  for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
    if scaling.get(key) is not None and not _number(scaling[key]):
      raise ConfigError(f"{field}.{key} must be a number or None, got {scaling[key]!r}")
  if scaling.get("truncate") is not None and not isinstance(scaling["truncate"], bool):
    raise ConfigError(f"{field}.truncate must be true or false, got {scaling['truncate']!r}")


def _plain_inv_freq(theta, head_dim: int) -> jax.Array:
  # transformers: arange(0, dim, 2) as int64, then float32, then / dim.
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def attention_factor(scaling: Mapping[str, Any] | None) -> float:
  """What cos and sin are multiplied by (YaRN's mscale; 1.0 for the other types)."""
  if scaling is None or scaling["rope_type"] != "yarn":
    return 1.0
  factor = scaling["factor"]
  explicit = scaling.get("attention_factor")
  if explicit is not None:
    return explicit
  mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
  if mscale and mscale_all_dim:
    return float(yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim))
  return yarn_get_mscale(factor)


def _llama3_inv_freq(s: Mapping[str, Any], theta: float, head_dim: int) -> jax.Array:
  inv_freq = _plain_inv_freq(theta, head_dim)
  factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
  old_context_len = s["original_max_position_embeddings"]
  low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
  wavelen = 2 * math.pi / inv_freq
  inv_freq_llama = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_context_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
  is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return jnp.where(is_medium, smoothed, inv_freq_llama)


def _yarn_inv_freq(s: Mapping[str, Any], theta: float, head_dim: int) -> jax.Array:
  factor = s["factor"]
  beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1
  original = s["original_max_position_embeddings"]

  def correction_dim(num_rotations):
    return (head_dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if s.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001  # transformers' guard against a zero-width ramp
  pos_freqs = theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  inv_freq_extrapolation = 1.0 / pos_freqs
  inv_freq_interpolation = 1.0 / (factor * pos_freqs)
  ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
  extrapolation_factor = 1 - ramp
  return (inv_freq_interpolation * (1 - extrapolation_factor)
          + inv_freq_extrapolation * extrapolation_factor)


def _dynamic_inv_freq(s: Mapping[str, Any], theta: float, head_dim: int, max_positions: int,
                      positions_bt: jax.Array) -> jax.Array:
  # seq_len over the whole call, never below max_positions (where the base is theta itself).
  seq_len = jnp.maximum(jnp.max(positions_bt) + 1, max_positions).astype(jnp.float32)
  factor = s["factor"]
  base = theta * ((factor * seq_len / max_positions) - (factor - 1)) ** (head_dim / (head_dim - 2))
  return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def inv_freq(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None,
             max_positions: int | None = None, positions_bt: jax.Array | None = None) -> jax.Array:
  """float32 [head_dim // 2] inverse frequencies. 'dynamic' needs `max_positions` (the config's
  max_position_embeddings) and the call's `positions_bt`."""
  rope_type = None if scaling is None else scaling["rope_type"]
  if rope_type is None:
    return _plain_inv_freq(theta, head_dim)
  if rope_type == "linear":
    return _plain_inv_freq(theta, head_dim) / scaling["factor"]
  if rope_type == "llama3":
    return _llama3_inv_freq(scaling, theta, head_dim)
  if rope_type == "yarn":
    return _yarn_inv_freq(scaling, theta, head_dim)
  if rope_type == "dynamic":
    if max_positions is None or positions_bt is None:
      raise ValueError("dynamic rope scaling needs max_positions and positions_bt")
    return _dynamic_inv_freq(scaling, theta, head_dim, max_positions, positions_bt)
  raise ValueError(f"rope_type {rope_type!r} has no table here")


def rotary_tables(positions_bt: jax.Array, head_dim: int, theta: float,
                  scaling: Mapping[str, Any] | None = None, max_positions: int | None = None):
  """(cos, sin), float32 [B, T, 1, D], in the Hugging Face half-rotation layout (first half pairs
  with second half), both times the scaling's attention factor."""
  inv_freq_h = inv_freq(head_dim, theta, scaling, max_positions, positions_bt)
  freqs_bth = positions_bt.astype(jnp.float32)[..., None] * inv_freq_h
  angles_btd = jnp.concatenate([freqs_bth, freqs_bth], axis=-1)[:, :, None, :]
  cos_bt1d, sin_bt1d = jnp.cos(angles_btd), jnp.sin(angles_btd)
  factor = attention_factor(scaling)
  if factor != 1.0:
    cos_bt1d, sin_bt1d = cos_bt1d * factor, sin_bt1d * factor
  return cos_bt1d, sin_bt1d
