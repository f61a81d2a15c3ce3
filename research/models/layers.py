"""Decoder building blocks: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP, the block.

Shapes use one convention throughout: B batch, T query time, S key time, E embed, H heads,
K kv heads, D head dim, F mlp, V vocab. Every parameter carries logical axis names.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models.config import ModelConfig

Initializer = Callable[..., jax.Array]
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def param_init(config: ModelConfig) -> Initializer:
  del config
  return nn.initializers.normal(stddev=0.02)


def logical(init: Initializer, axes: tuple[str | None, ...]) -> Initializer:
  return nn.with_logical_partitioning(init, axes)


class RMSNorm(nn.Module):
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bte: jax.Array) -> jax.Array:
    scale_e = self.param("scale", logical(nn.initializers.ones, ("embed",)), (x_bte.shape[-1],),
                         self.param_dtype)
    x32 = x_bte.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # As transformers does: normalise in float32, cast back, then scale.
    return scale_e.astype(self.dtype) * normed.astype(self.dtype)


def rotary_embedding(x_bthd: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the Hugging Face half-rotation layout (first half pairs with second half)."""
  d = x_bthd.shape[-1]
  inv_freq_h = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [D/2]
  freqs_bth = positions_bt.astype(jnp.float32)[..., None] * inv_freq_h
  angles_btd = jnp.concatenate([freqs_bth, freqs_bth], axis=-1)[:, :, None, :]  # [B, T, 1, D]
  cos, sin = jnp.cos(angles_btd), jnp.sin(angles_btd)
  x32 = x_bthd.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x_bthd.dtype)


def attention_mask(segment_ids_bt: jax.Array) -> jax.Array:
  """[B, 1, T, S] bool: causal, within one segment, never onto padding (segment id 0)."""
  t = segment_ids_bt.shape[1]
  causal_ts = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
  same_bts = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
  real_bs = (segment_ids_bt != 0)[:, None, :]
  return (causal_ts[None] & same_bts & real_bs)[:, None]


class Attention(nn.Module):
  config: ModelConfig

  def _proj(self, heads: int, head_axis: str, name: str) -> nn.DenseGeneral:
    cfg = self.config
    return nn.DenseGeneral(
        features=(heads, cfg.resolved_head_dim), axis=-1, use_bias=cfg.attention_bias,
        dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, name=name,
        kernel_init=logical(param_init(cfg), ("embed", head_axis, "head_dim")),
        bias_init=logical(nn.initializers.zeros, (head_axis, "head_dim")))

  @nn.compact
  def __call__(self, x_bte, segment_ids_bt, positions_bt):
    cfg = self.config
    q_bthd = self._proj(cfg.num_heads, "heads", "q")(x_bte)
    k_btkd = self._proj(cfg.num_kv_heads, "kv_heads", "k")(x_bte)
    v_btkd = self._proj(cfg.num_kv_heads, "kv_heads", "v")(x_bte)
    q_bthd = rotary_embedding(q_bthd, positions_bt, cfg.rope_theta)
    k_btkd = rotary_embedding(k_btkd, positions_bt, cfg.rope_theta)
    # Repeating KV heads keeps the score product a 4-D batched matmul, which XLA:CPU runs about
    # twice as fast as the 5-D grouped einsum (PERF-NOTES); on GPU/TPU the cost is the same.
    groups = cfg.num_heads // cfg.num_kv_heads
    if groups > 1:
      k_btkd = jnp.repeat(k_btkd, groups, axis=2)
      v_btkd = jnp.repeat(v_btkd, groups, axis=2)
    scale = cfg.resolved_head_dim ** -0.5
    scores_bhts = jnp.einsum("bthd,bshd->bhts", q_bthd * scale, k_btkd,
                             preferred_element_type=jnp.float32)
    scores_bhts = jnp.where(attention_mask(segment_ids_bt), scores_bhts, MASK_VALUE)
    probs_bhts = jax.nn.softmax(scores_bhts, axis=-1).astype(cfg.compute_dtype)
    out_bthd = jnp.einsum("bhts,bshd->bthd", probs_bhts, v_btkd)
    return nn.DenseGeneral(
        features=cfg.hidden_size, axis=(-2, -1), use_bias=False, dtype=cfg.compute_dtype,
        param_dtype=cfg.weight_dtype, name="o",
        kernel_init=logical(param_init(cfg), ("heads", "head_dim", "embed")))(out_bthd)


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_bte):
    cfg = self.config

    def dense(features, axes, name):
      return nn.Dense(features, use_bias=False, dtype=cfg.compute_dtype,
                      param_dtype=cfg.weight_dtype, name=name,
                      kernel_init=logical(param_init(cfg), axes))

    gate_btf = dense(cfg.mlp_dim, ("embed", "mlp"), "gate")(x_bte)
    up_btf = dense(cfg.mlp_dim, ("embed", "mlp"), "up")(x_bte)
    return dense(cfg.hidden_size, ("mlp", "embed"), "down")(nn.silu(gate_btf) * up_btf)


class DecoderBlock(nn.Module):
  """Pre-norm block. Returns (x, None) so that it can be the body of `nn.scan`."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_bte, segment_ids_bt, positions_bt):
    cfg = self.config
    norm = dict(eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    h = RMSNorm(**norm, name="attn_norm")(x_bte)
    x_bte = x_bte + Attention(cfg, name="attn")(h, segment_ids_bt, positions_bt)
    h = RMSNorm(**norm, name="mlp_norm")(x_bte)
    x_bte = x_bte + MLP(cfg, name="mlp")(h)
    return x_bte, None
