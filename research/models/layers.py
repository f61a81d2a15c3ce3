"""Decoder building blocks: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP, the block.

Shapes use one convention throughout: B batch, T query time, S key time, E embed, H heads,
K kv heads, D head dim, F mlp, V vocab. Every parameter carries logical axis names.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models.config import ModelConfig
from research.models.peft import NO_PEFT, BottleneckAdapter, LoraDelta, PeftConfig

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


def apply_flat(layer: Callable[[jax.Array], jax.Array], x: jax.Array, feature_axes: int = 1):
  """`layer(x)` with every leading axis ([B, T]) merged into one token axis, then split back.

  The params are the same; what changes is the weight gradient, which then contracts a single
  token axis. Contracting [B, T] makes XLA:CPU's dot canonicalisation write a transposed copy of
  the output gradient (fused with its producer, strided): ~20% of a train step at PERF-NOTES' S.
  """
  lead = x.shape[:x.ndim - feature_axes]
  y = layer(x.reshape((-1,) + x.shape[x.ndim - feature_axes:]))
  return y.reshape(lead + y.shape[1:])


def _masked_scores(q_bthd, k_bshd, mask_b1ts, scale: float):
  scores_bhts = jnp.einsum("bthd,bshd->bhts", q_bthd * scale, k_bshd,
                           preferred_element_type=jnp.float32)
  return jnp.where(mask_b1ts, scores_bhts, MASK_VALUE)


def _attend_fwd(q_bthd, k_bshd, v_bshd, mask_b1ts, scale):
  scores_bhts = _masked_scores(q_bthd, k_bshd, mask_b1ts, scale)
  max_bht1 = jnp.max(scores_bhts, axis=-1, keepdims=True)
  exp_bhts = jnp.exp(scores_bhts - max_bht1)
  sum_bht1 = jnp.sum(exp_bhts, axis=-1, keepdims=True)
  probs_bhts = (exp_bhts / sum_bht1).astype(v_bshd.dtype)
  out_bthd = jnp.einsum("bhts,bshd->bthd", probs_bhts, v_bshd)
  return out_bthd, (q_bthd, k_bshd, v_bshd, mask_b1ts, out_bthd, max_bht1, sum_bht1)


def _attend_bwd(scale, res, g_bthd):
  q_bthd, k_bshd, v_bshd, mask_b1ts, out_bthd, max_bht1, sum_bht1 = res
  # The probabilities again, from the scores and the saved row max and sum (flash attention's
  # backward): one more QK^T product instead of a [B, H, T, S] residual per layer.
  probs_bhts = jnp.exp(_masked_scores(q_bthd, k_bshd, mask_b1ts, scale) - max_bht1) / sum_bht1
  g32_bthd = g_bthd.astype(jnp.float32)
  dv_bshd = jnp.einsum("bhts,bthd->bshd", probs_bhts.astype(g_bthd.dtype), g_bthd)
  dprobs_bhts = jnp.einsum("bthd,bshd->bhts", g_bthd, v_bshd, preferred_element_type=jnp.float32)
  # sum_s dP * P = sum_d dO * O per query (the softmax backward's row term, from [B, T, H, D]).
  rowdot_bht1 = jnp.einsum("bthd,bthd->bht", g32_bthd,
                           out_bthd.astype(jnp.float32))[..., None]
  # Masked scores are constants (a row with no visible key, e.g. a padding query, has uniform
  # probabilities but no gradient into q or k).
  dscores_bhts = jnp.where(mask_b1ts, probs_bhts * (dprobs_bhts - rowdot_bht1) * scale,
                           0.0).astype(q_bthd.dtype)
  dq_bthd = jnp.einsum("bhts,bshd->bthd", dscores_bhts, k_bshd)
  dk_bshd = jnp.einsum("bhts,bthd->bshd", dscores_bhts, q_bthd)
  return dq_bthd, dk_bshd, dv_bshd, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attend(q_bthd, k_bshd, v_bshd, mask_b1ts, scale: float):
  """softmax(q k^T * scale, masked) v with K/V heads already repeated to the query heads. [B, T, H, D]

  The forward is the plain product; the backward recomputes the probabilities from the saved
  row max and sum instead of keeping them. Autodiff (even with a custom softmax backward) keeps
  a [B, H, T, S] float32 array per layer, which under `nn.scan` is also zero-filled and copied
  into a per-layer stack every step, and fuses the softmax backward's row sum into the dP
  product, which XLA:CPU then runs at a quarter of its matmul rate.
  """
  return _attend_fwd(q_bthd, k_bshd, v_bshd, mask_b1ts, scale)[0]


attend.defvjp(_attend_fwd, _attend_bwd)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up, whose backward keeps only `gate` and `up` (autodiff keeps five arrays of
  that size: gate, up and three pieces of silu)."""
  return nn.silu(gate) * up


def _swiglu_fwd(gate, up):
  return nn.silu(gate) * up, (gate, up)


def _swiglu_bwd(res, g):
  gate, up = res
  sig = jax.nn.sigmoid(gate)
  return g * up * (sig * (1 + gate * (1 - sig))), g * (gate * sig)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


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


def attention_mask(segment_ids_bt: jax.Array, key_segment_ids_bs: jax.Array | None = None,
                   query_offset: jax.Array | int = 0) -> jax.Array:
  """[B, 1, T, S] bool: causal, within one segment, never onto padding (segment id 0).

  With a KV cache the keys are the cache's S slots and query t sits at slot `query_offset + t`.
  """
  if key_segment_ids_bs is None:
    key_segment_ids_bs = segment_ids_bt
  t, s = segment_ids_bt.shape[1], key_segment_ids_bs.shape[1]
  causal_ts = (query_offset + jnp.arange(t))[:, None] >= jnp.arange(s)[None, :]
  same_bts = segment_ids_bt[:, :, None] == key_segment_ids_bs[:, None, :]
  real_bs = (key_segment_ids_bs != 0)[:, None, :]
  return (causal_ts[None] & same_bts & real_bs)[:, None]


class KVCache(NamedTuple):
  """One layer's cache slice as the attention sees it (stacked over layers in the decoder)."""
  k_bskd: jax.Array
  v_bskd: jax.Array
  segment_ids_bs: jax.Array  # already holds the current tokens' segments
  index: jax.Array  # int32 []: slot of the first current token


def _with_lora(base: nn.Module, x, peft: PeftConfig, name: str, in_axes, out_axes, out_shape,
               num_in_dims: int, cfg: ModelConfig, deterministic: bool):
  def layer(x_n):  # x_n: [tokens, in...], see apply_flat
    y = base(x_n)
    if peft.lora_on(name):
      y = y + LoraDelta(in_axes, out_shape, out_axes, num_in_dims, peft, cfg.compute_dtype,
                        cfg.weight_dtype, name=f"{name}_lora")(x_n, deterministic)
    return y
  return apply_flat(layer, x, num_in_dims)


class Attention(nn.Module):
  config: ModelConfig
  peft: PeftConfig = NO_PEFT
  deterministic: bool = True

  def _proj(self, x_bte, heads: int, head_axis: str, name: str):
    cfg = self.config
    base = nn.DenseGeneral(
        features=(heads, cfg.resolved_head_dim), axis=-1, use_bias=cfg.attention_bias,
        dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, name=name,
        kernel_init=logical(param_init(cfg), ("embed", head_axis, "head_dim")),
        bias_init=logical(nn.initializers.zeros, (head_axis, "head_dim")))
    return _with_lora(base, x_bte, self.peft, name, ("embed",), (head_axis, "head_dim"),
                      (heads, cfg.resolved_head_dim), 1, cfg, self.deterministic)

  @nn.compact
  def __call__(self, x_bte, segment_ids_bt, positions_bt, cache: KVCache | None = None):
    cfg = self.config
    q_bthd = self._proj(x_bte, cfg.num_heads, "heads", "q")
    k_btkd = self._proj(x_bte, cfg.num_kv_heads, "kv_heads", "k")
    v_btkd = self._proj(x_bte, cfg.num_kv_heads, "kv_heads", "v")
    q_bthd = rotary_embedding(q_bthd, positions_bt, cfg.rope_theta)
    k_btkd = rotary_embedding(k_btkd, positions_bt, cfg.rope_theta)
    if cache is None:
      mask_b1ts = attention_mask(segment_ids_bt)
      new_cache = None
    else:  # write this step's keys and values into their slots, then attend over every slot
      k_btkd = jax.lax.dynamic_update_slice(cache.k_bskd, k_btkd.astype(cache.k_bskd.dtype),
                                            (0, cache.index, 0, 0))
      v_btkd = jax.lax.dynamic_update_slice(cache.v_bskd, v_btkd.astype(cache.v_bskd.dtype),
                                            (0, cache.index, 0, 0))
      mask_b1ts = attention_mask(segment_ids_bt, cache.segment_ids_bs, cache.index)
      new_cache = (k_btkd, v_btkd)
    # Repeating KV heads keeps the score product a 4-D batched matmul, which XLA:CPU runs about
    # twice as fast as the 5-D grouped einsum (PERF-NOTES); on GPU/TPU the cost is the same.
    groups = cfg.num_heads // cfg.num_kv_heads
    if groups > 1:
      k_btkd = jnp.repeat(k_btkd, groups, axis=2)
      v_btkd = jnp.repeat(v_btkd, groups, axis=2)
    out_bthd = attend(q_bthd.astype(cfg.compute_dtype), k_btkd.astype(cfg.compute_dtype),
                      v_btkd.astype(cfg.compute_dtype), mask_b1ts, cfg.resolved_head_dim ** -0.5)
    base = nn.DenseGeneral(
        features=cfg.hidden_size, axis=(-2, -1), use_bias=False, dtype=cfg.compute_dtype,
        param_dtype=cfg.weight_dtype, name="o",
        kernel_init=logical(param_init(cfg), ("heads", "head_dim", "embed")))
    out_bte = _with_lora(base, out_bthd, self.peft, "o", ("heads", "head_dim"), ("embed",),
                         (cfg.hidden_size,), 2, cfg, self.deterministic)
    return out_bte, new_cache


class MLP(nn.Module):
  config: ModelConfig
  peft: PeftConfig = NO_PEFT
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_bte):
    cfg = self.config

    def dense(x, features, axes, name):
      base = nn.Dense(features, use_bias=False, dtype=cfg.compute_dtype,
                      param_dtype=cfg.weight_dtype, name=name,
                      kernel_init=logical(param_init(cfg), axes))
      return _with_lora(base, x, self.peft, name, axes[:1], axes[1:], (features,), 1, cfg,
                        self.deterministic)

    gate_btf = dense(x_bte, cfg.mlp_dim, ("embed", "mlp"), "gate")
    up_btf = dense(x_bte, cfg.mlp_dim, ("embed", "mlp"), "up")
    return dense(swiglu(gate_btf, up_btf), cfg.hidden_size, ("mlp", "embed"), "down")


class DecoderBlock(nn.Module):
  """Pre-norm block. Returns (x, this layer's new KV cache or None): the body of `nn.scan`."""
  config: ModelConfig
  peft: PeftConfig = NO_PEFT
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_bte, segment_ids_bt, positions_bt, layer_kv=None, key_segments_bs=None,
               cache_index=None):
    cfg, peft = self.config, self.peft
    norm = dict(eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    cache = None if layer_kv is None else KVCache(*layer_kv, key_segments_bs, cache_index)
    h = RMSNorm(**norm, name="attn_norm")(x_bte)
    h, new_kv = Attention(cfg, peft, self.deterministic, name="attn")(h, segment_ids_bt,
                                                                      positions_bt, cache)
    if peft.method == "adapter":
      h = BottleneckAdapter(peft.adapter_dim, cfg.compute_dtype, cfg.weight_dtype,
                            name="attn_adapter")(h)
    x_bte = x_bte + h
    h = MLP(cfg, peft, self.deterministic, name="mlp")(RMSNorm(**norm, name="mlp_norm")(x_bte))
    if peft.method == "adapter":
      h = BottleneckAdapter(peft.adapter_dim, cfg.compute_dtype, cfg.weight_dtype,
                            name="mlp_adapter")(h)
    return x_bte + h, new_kv
