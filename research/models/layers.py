"""Decoder building blocks: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP, the block.

Shapes use one convention throughout: B batch, T query time, S key time, E embed, H heads,
K kv heads, D head dim, F mlp, V vocab. Every parameter carries logical axis names.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from research.models.config import ModelConfig
from research.models.peft import NO_PEFT, BottleneckAdapter, LoraDelta, PeftConfig
from research.parallel import activations as act

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
    # Whole on every device (FSDP shards it over `embed`): scaling a batch-sharded activation by
    # an embed-sharded vector would make XLA reshard the activation instead.
    scale_e = act.constrain(scale_e, act.WHOLE_VECTOR)
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


@jax.custom_vjp
def _matmul_tx(x_ne: jax.Array, w_ef: jax.Array) -> jax.Array:
  return jnp.dot(x_ne, w_ef)


def _matmul_tx_fwd(x_ne, w_ef):
  return jnp.dot(x_ne, w_ef), (x_ne, w_ef)


def _matmul_tx_bwd(res, g_nf):
  x_ne, w_ef = res
  dx_ne = jax.lax.dot_general(g_nf, w_ef, (((1,), (1,)), ((), ())))
  # x^T laid out row-major before the product: XLA otherwise folds the transpose into the dot as
  # a contraction over the operands' leading (token) axis, which XLA:CPU hands to Eigen at about
  # half the rate of the same GEMM on row-major operands (a wide head: 76 vs 162 GFLOP/s at
  # [2048 x 256] x [2048 x 8192]). The copy is of the narrow activation, not of the [N, V] gradient.
  x_en = jax.lax.optimization_barrier(x_ne.T)
  return dx_ne, jnp.dot(x_en, g_nf).astype(w_ef.dtype)


_matmul_tx.defvjp(_matmul_tx_fwd, _matmul_tx_bwd)


def xt_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` for `nn.Dense` / `nn.DenseGeneral(axis=-1)` (`dot_general=...`) whose
  weight gradient is computed from a materialised x^T (see `_matmul_tx`). A kernel with several
  output axes ([in, heads, head_dim]) is multiplied as [in, heads * head_dim]. Other shapes and
  options fall through to the plain product."""
  plain = (((1,), (0,)), ((), ()))
  if (lhs.ndim == 2 and rhs.ndim >= 2 and dimension_numbers == plain and precision is None
      and preferred_element_type is None):
    y_nf = _matmul_tx(lhs, rhs.reshape(rhs.shape[0], -1))
    return y_nf.reshape(lhs.shape[:1] + rhs.shape[1:])
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type)


def _head_major(x_bthd):
  """[B, T, H, D] -> [B, H, T, D], materialised: every block's products then read contiguous
  rows. Left to XLA, the transposes fold into each product and XLA:CPU lays each block's keys out
  again (time innermost) per product: attention ran 1.15x (S) to 1.3x (M) slower."""
  return jax.lax.optimization_barrier(jnp.swapaxes(x_bthd, 1, 2))


def _masked_scores(q_bhtd, k_bhsd, mask_b1ts, scale: float):
  scores_bhts = jnp.einsum("bhtd,bhsd->bhts", q_bhtd * scale, k_bhsd,
                           preferred_element_type=jnp.float32)
  return jnp.where(mask_b1ts, scores_bhts, MASK_VALUE)


def _block_fwd(q_bhtd, k_bhsd, v_bhsd, mask_b1ts, scale):
  scores_bhts = _masked_scores(q_bhtd, k_bhsd, mask_b1ts, scale)
  max_bht1 = jnp.max(scores_bhts, axis=-1, keepdims=True)
  exp_bhts = jnp.exp(scores_bhts - max_bht1)
  sum_bht1 = jnp.sum(exp_bhts, axis=-1, keepdims=True)
  probs_bhts = (exp_bhts / sum_bht1).astype(v_bhsd.dtype)
  return jnp.einsum("bhts,bhsd->bhtd", probs_bhts, v_bhsd), max_bht1, sum_bht1


def _block_bwd(scale, q_bhtd, k_bhsd, v_bhsd, mask_b1ts, out_bhtd, max_bht1, sum_bht1, g_bhtd):
  # Keys are the rows here: every product but dQ's then has the block's keys (up to S) as its
  # rows, and dK, dV come out of plain row-major products; the probabilities again, from the
  # scores and the saved row max and sum (flash attention's backward): one more QK^T product
  # instead of a [B, H, T, S] residual per layer.
  rows_t = lambda x_bht1: jnp.swapaxes(x_bht1, -1, -2)  # [B, H, T, 1] -> [B, H, 1, T]: free
  mask_b1st = jnp.swapaxes(mask_b1ts, -1, -2)
  scores_bhst = jnp.einsum("bhsd,bhtd->bhst", k_bhsd, q_bhtd * scale,
                           preferred_element_type=jnp.float32)
  scores_bhst = jnp.where(mask_b1st, scores_bhst, MASK_VALUE)
  probs_bhst = jnp.exp(scores_bhst - rows_t(max_bht1)) / rows_t(sum_bht1)
  dv_bhsd = jnp.einsum("bhst,bhtd->bhsd", probs_bhst.astype(g_bhtd.dtype), g_bhtd)
  dprobs_bhst = jnp.einsum("bhsd,bhtd->bhst", v_bhsd, g_bhtd, preferred_element_type=jnp.float32)
  # sum_s dP * P = sum_d dO * O per query (the softmax backward's row term).
  rowdot_bht1 = jnp.sum(g_bhtd.astype(jnp.float32) * out_bhtd.astype(jnp.float32), axis=-1,
                        keepdims=True)
  dscores_bhst = jnp.where(mask_b1st, probs_bhst * (dprobs_bhst - rows_t(rowdot_bht1)) * scale,
                           0.0).astype(q_bhtd.dtype)
  dk_bhsd = jnp.einsum("bhst,bhtd->bhsd", dscores_bhst, q_bhtd)
  dq_bhtd = jnp.einsum("bhst,bhsd->bhtd", dscores_bhst, k_bhsd)
  return dq_bhtd, dk_bhsd, dv_bhsd


def _blocks(t: int, s: int, blocks: int):
  """(query slice, number of keys) per query block: block i sees keys [0, end of block i)."""
  if blocks == 1:
    return [(slice(0, t), s)]
  c = t // blocks
  return [(slice(i * c, (i + 1) * c), (i + 1) * c) for i in range(blocks)]


def _row_visible(mask_b1ts):
  return jnp.any(mask_b1ts, axis=-1, keepdims=True)  # [B, 1, T, 1]


def _grouped(x_bhtx, kv_heads: int):
  """[B, H, T, X] -> [B, K, G*T, X]: the G query heads that share a KV head become rows of one
  product (query head h reads KV head h // G, as Hugging Face's `repeat_kv`). A free reshape."""
  b, h, t, x = x_bhtx.shape
  return x_bhtx.reshape(b, kv_heads, (h // kv_heads) * t, x)


def _ungrouped(x_bkrx, heads: int):
  b, k, r, x = x_bkrx.shape
  return x_bkrx.reshape(b, heads, r * k // heads, x)


def _grouped_mask(mask_b1ts, groups: int):
  return jnp.tile(mask_b1ts, (1, 1, groups, 1)) if groups > 1 else mask_b1ts


def _attend_fwd(q_bthd, k_bskd, v_bskd, mask_b1ts, scale, blocks):
  heads, kv_heads = q_bthd.shape[2], k_bskd.shape[2]
  q_bhtd, k_bksd, v_bksd = _head_major(q_bthd), _head_major(k_bskd), _head_major(v_bskd)
  outs, maxes, sums = [], [], []
  for rows, n in _blocks(q_bthd.shape[1], k_bskd.shape[1], blocks):
    out, mx, sm = _block_fwd(_grouped(q_bhtd[:, :, rows], kv_heads), k_bksd[:, :, :n],
                             v_bksd[:, :, :n],
                             _grouped_mask(mask_b1ts[:, :, rows, :n], heads // kv_heads), scale)
    outs.append(_ungrouped(out, heads)), maxes.append(_ungrouped(mx, heads))
    sums.append(_ungrouped(sm, heads))
  out_bhtd = jnp.where(_row_visible(mask_b1ts), jnp.concatenate(outs, axis=2), 0.0)
  out_bthd = jnp.swapaxes(out_bhtd, 1, 2)
  max_bht1, sum_bht1 = jnp.concatenate(maxes, axis=2), jnp.concatenate(sums, axis=2)
  # Named for remat policies that keep them (see decoder._REMAT_POLICIES' 'dots_attention').
  out_bthd, max_bht1, sum_bht1 = (checkpoint_name(x, "attention")
                                  for x in (out_bthd, max_bht1, sum_bht1))
  return out_bthd, (q_bthd, k_bskd, v_bskd, mask_b1ts, out_bthd, max_bht1, sum_bht1)


def _attend_bwd(scale, blocks, res, g_bthd):
  q_bthd, k_bskd, v_bskd, mask_b1ts, out_bthd, max_bht1, sum_bht1 = res
  heads, kv_heads = q_bthd.shape[2], k_bskd.shape[2]
  q_bhtd, k_bksd, v_bksd = _head_major(q_bthd), _head_major(k_bskd), _head_major(v_bskd)
  out_bhtd = _head_major(out_bthd)
  g_bhtd = jnp.where(_row_visible(mask_b1ts), _head_major(g_bthd), 0.0)
  s = k_bskd.shape[1]
  group = lambda x: _grouped(x, kv_heads)
  dqs, dk_bksd, dv_bksd = [], 0.0, 0.0
  for rows, n in _blocks(q_bthd.shape[1], s, blocks):
    dq, dk, dv = _block_bwd(scale, group(q_bhtd[:, :, rows]), k_bksd[:, :, :n], v_bksd[:, :, :n],
                            _grouped_mask(mask_b1ts[:, :, rows, :n], heads // kv_heads),
                            group(out_bhtd[:, :, rows]), group(max_bht1[:, :, rows]),
                            group(sum_bht1[:, :, rows]), group(g_bhtd[:, :, rows]))
    pad = ((0, 0), (0, 0), (0, s - n), (0, 0))
    dqs.append(_ungrouped(dq, heads))
    dk_bksd, dv_bksd = dk_bksd + jnp.pad(dk, pad), dv_bksd + jnp.pad(dv, pad)
  return (jnp.swapaxes(jnp.concatenate(dqs, axis=2), 1, 2), jnp.swapaxes(dk_bksd, 1, 2),
          jnp.swapaxes(dv_bksd, 1, 2), None)


def causal_blocks(t: int) -> int:
  """Query blocks for `attend` over T causal queries and keys: blocks of at least 64 queries, at
  most 8 of them (block i then computes (i+1)/8 of the full score matrix; 8 blocks do 56%)."""
  blocks = min(8, t // 64)
  while blocks > 1 and t % blocks:
    blocks -= 1
  return max(blocks, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def attend(q_bthd, k_bskd, v_bskd, mask_b1ts, scale: float, blocks: int = 1):
  """softmax(q k^T * scale, masked) v: q [B, T, H, D], k and v [B, S, K, D] with K dividing H
  (grouped-query attention; query head h reads KV head h // (H / K)). Returns [B, T, H, D].

  The H / K query heads that share a KV head are multiplied as rows of one product (a 4-D batched
  matmul over [B, K]), so K/V are never repeated per query head and dK/dV need no sum over the
  group: at bench_train's M (8 heads, 2 KV) the products are 4x taller, which XLA:CPU's batched
  matmul (one thread per product) runs closer to its rate.

  A query with no visible key (padding) gets zeros. The backward recomputes the probabilities
  from the saved row max and sum instead of keeping them. Autodiff (even with a custom softmax
  backward) keeps a [B, H, T, S] float32 array per layer, which under `nn.scan` is also
  zero-filled and copied into a per-layer stack every step, and fuses the softmax backward's row
  sum into the dP product, which XLA:CPU then runs at a quarter of its matmul rate.

  `blocks` > 1 (T == S, and a causal mask: no query sees a later key) splits the queries into
  equal blocks, and block i computes scores only against the keys up to its own end: the
  never-visible upper triangle is skipped, forward and backward (`causal_blocks` picks the count).
  """
  return _attend_fwd(q_bthd, k_bskd, v_bskd, mask_b1ts, scale, blocks)[0]


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


def rotary_tables(positions_bt: jax.Array, head_dim: int, theta: float):
  """(cos, sin), float32 [B, T, 1, D], in the Hugging Face half-rotation layout (first half pairs
  with second half). The decoder builds them once per call and every layer reads them: made inside
  each layer, XLA fuses the trigonometry into the layer's q/k transposes and recomputes it per head,
  per layer and again under remat."""
  inv_freq_h = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs_bth = positions_bt.astype(jnp.float32)[..., None] * inv_freq_h
  angles_btd = jnp.concatenate([freqs_bth, freqs_bth], axis=-1)[:, :, None, :]
  return jnp.cos(angles_btd), jnp.sin(angles_btd)


def apply_rotary(x_bthd: jax.Array, cos_bt1d: jax.Array, sin_bt1d: jax.Array) -> jax.Array:
  x32 = x_bthd.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos_bt1d + rotated * sin_bt1d).astype(x_bthd.dtype)


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
    # The weight gradient from a row-major x^T (`xt_dot_general`): XLA:CPU otherwise transposes
    # each of q/k/v's gradients to [heads * head_dim, tokens], in a fusion with the rotary and
    # head-major backward that runs far below copy speed (1.02-1.03x the S step). The o and MLP
    # projections measured no gain from it (README).
    cfg = self.config
    base = nn.DenseGeneral(
        features=(heads, cfg.resolved_head_dim), axis=-1, use_bias=cfg.attention_bias,
        dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, name=name,
        dot_general=xt_dot_general,
        kernel_init=logical(param_init(cfg), ("embed", head_axis, "head_dim")),
        bias_init=logical(nn.initializers.zeros, (head_axis, "head_dim")))
    return _with_lora(base, x_bte, self.peft, name, ("embed",), (head_axis, "head_dim"),
                      (heads, cfg.resolved_head_dim), 1, cfg, self.deterministic)

  @nn.compact
  def __call__(self, x_bte, mask_b1ts, rope, cache: KVCache | None = None):
    """`mask_b1ts` from `attention_mask`, `rope` = `rotary_tables(...)`: both built once by the
    decoder for all layers. With `cache`, the mask's S axis is the cache's slots."""
    cfg = self.config
    q_bthd = act.constrain(self._proj(x_bte, cfg.num_heads, "heads", "q"), act.QUERY_HEADS)
    k_btkd = act.constrain(self._proj(x_bte, cfg.num_kv_heads, "kv_heads", "k"), act.KV_HEADS)
    v_btkd = act.constrain(self._proj(x_bte, cfg.num_kv_heads, "kv_heads", "v"), act.KV_HEADS)
    # Named for remat policies that keep them (see decoder._REMAT_POLICIES' 'dots_attention').
    q_bthd = checkpoint_name(apply_rotary(q_bthd, *rope), "rotary")
    k_btkd = checkpoint_name(apply_rotary(k_btkd, *rope), "rotary")
    if cache is None:
      new_cache = None
    else:  # write this step's keys and values into their slots, then attend over every slot
      k_btkd = jax.lax.dynamic_update_slice(cache.k_bskd, k_btkd.astype(cache.k_bskd.dtype),
                                            (0, cache.index, 0, 0))
      v_btkd = jax.lax.dynamic_update_slice(cache.v_bskd, v_btkd.astype(cache.v_bskd.dtype),
                                            (0, cache.index, 0, 0))
      new_cache = (k_btkd, v_btkd)
    # Without a cache, queries and keys are the same T positions under a causal mask.
    blocks = causal_blocks(x_bte.shape[1]) if cache is None else 1
    out_bthd = attend(q_bthd.astype(cfg.compute_dtype), k_btkd.astype(cfg.compute_dtype),
                      v_btkd.astype(cfg.compute_dtype), mask_b1ts, cfg.resolved_head_dim ** -0.5,
                      blocks)
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

    gate_btf = act.constrain(dense(x_bte, cfg.mlp_dim, ("embed", "mlp"), "gate"), act.MLP_HIDDEN)
    up_btf = act.constrain(dense(x_bte, cfg.mlp_dim, ("embed", "mlp"), "up"), act.MLP_HIDDEN)
    return dense(swiglu(gate_btf, up_btf), cfg.hidden_size, ("mlp", "embed"), "down")


class DecoderBlock(nn.Module):
  """Pre-norm block. Returns (x, this layer's new KV cache or None): the body of `nn.scan`.

  `x_bte` may be a tuple of row slices (`ModelConfig.layer_streams`), with `mask_b1ts` and `rope`
  tuples to match: each slice goes through the same weights on its own, and a tuple comes back.
  """
  config: ModelConfig
  peft: PeftConfig = NO_PEFT
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_bte, mask_b1ts, rope, layer_kv=None, cache_index=None):
    cfg, peft = self.config, self.peft
    norm = dict(eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    attn_norm = RMSNorm(**norm, name="attn_norm")
    attn = Attention(cfg, peft, self.deterministic, name="attn")
    mlp_norm = RMSNorm(**norm, name="mlp_norm")
    mlp = MLP(cfg, peft, self.deterministic, name="mlp")
    adapters = None
    if peft.method == "adapter":
      adapters = [BottleneckAdapter(peft.adapter_dim, cfg.compute_dtype, cfg.weight_dtype,
                                    name=name) for name in ("attn_adapter", "mlp_adapter")]

    def block(x_bte, mask_b1ts, rope, cache):
      h, new_kv = attn(attn_norm(x_bte), mask_b1ts, rope, cache)
      if adapters:
        h = adapters[0](h)
      x_bte = x_bte + h
      h = mlp(mlp_norm(x_bte))
      if adapters:
        h = adapters[1](h)
      return act.constrain(x_bte + h, act.RESIDUAL), new_kv

    if isinstance(x_bte, tuple):
      return tuple(block(x, m, r, None)[0] for x, m, r in zip(x_bte, mask_b1ts, rope)), None
    cache = None if layer_kv is None else KVCache(*layer_kv, cache_index)
    return block(x_bte, mask_b1ts, rope, cache)
