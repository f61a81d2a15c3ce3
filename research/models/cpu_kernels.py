"""The CPU path: kernels and layouts tuned for XLA:CPU, which the model reaches only when
`model.attention` resolves to 'cpu_blocked' (see research/models/attention.py).

A blocked causal attention with a recomputing backward (`attend`), projections whose weight gradient
reads a row-major x^T (`xt_dot_general`, `apply_flat`), and layer streams: each layer run on
independent slices of the batch's rows (`streamed`). Same math as the plain model, row for row.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from research.models.softcap import soft_cap, soft_cap_with_slope
from research.parallel import activations as act

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def apply_flat(layer: Callable[[jax.Array], jax.Array], x: jax.Array, feature_axes: int = 1):
  """`layer(x)` with every leading axis ([B, T]) merged into one token axis, then split back.

  The params are the same; what changes is the weight gradient, which then contracts a single
  token axis. Contracting [B, T] makes XLA:CPU's dot canonicalisation write a transposed copy of
  the output gradient (fused with its producer, strided), a large share of a small model's step.
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
  # half the rate of the same GEMM on row-major operands (docs/performance.md). The copy is of the
  # narrow activation, not of the [N, V] gradient.
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
  again (time innermost) per product, which slows attention (docs/performance.md)."""
  return jax.lax.optimization_barrier(jnp.swapaxes(x_bthd, 1, 2))


def _masked_scores(q_bhtd, k_bhsd, mask_b1ts, scale: float, softcap: float | None):
  scores_bhts = jnp.einsum("bhtd,bhsd->bhts", q_bhtd * scale, k_bhsd,
                           preferred_element_type=jnp.float32)
  return jnp.where(mask_b1ts, soft_cap(scores_bhts, softcap), MASK_VALUE)


def _block_fwd(q_bhtd, k_bhsd, v_bhsd, mask_b1ts, scale, softcap):
  scores_bhts = _masked_scores(q_bhtd, k_bhsd, mask_b1ts, scale, softcap)
  max_bht1 = jnp.max(scores_bhts, axis=-1, keepdims=True)
  exp_bhts = jnp.exp(scores_bhts - max_bht1)
  sum_bht1 = jnp.sum(exp_bhts, axis=-1, keepdims=True)
  probs_bhts = (exp_bhts / sum_bht1).astype(v_bhsd.dtype)
  return jnp.einsum("bhts,bhsd->bhtd", probs_bhts, v_bhsd), max_bht1, sum_bht1


def _block_bwd(scale, softcap, q_bhtd, k_bhsd, v_bhsd, mask_b1ts, out_bhtd, max_bht1, sum_bht1,
               g_bhtd):
  # Keys are the rows here: every product but dQ's then has the block's keys (up to S) as its
  # rows, and dK, dV come out of plain row-major products; the probabilities again, from the
  # scores and the saved row max and sum (flash attention's backward): one more QK^T product
  # instead of a [B, H, T, S] residual per layer.
  rows_t = lambda x_bht1: jnp.swapaxes(x_bht1, -1, -2)  # [B, H, T, 1] -> [B, H, 1, T]: free
  mask_b1st = jnp.swapaxes(mask_b1ts, -1, -2)
  scores_bhst = jnp.einsum("bhsd,bhtd->bhst", k_bhsd, q_bhtd * scale,
                           preferred_element_type=jnp.float32)
  # With a soft cap the probabilities come from the capped scores, and the scores' gradient
  # is the capped scores' times the cap's slope.
  scores_bhst, slope_bhst = soft_cap_with_slope(scores_bhst, softcap)
  scores_bhst = jnp.where(mask_b1st, scores_bhst, MASK_VALUE)
  probs_bhst = jnp.exp(scores_bhst - rows_t(max_bht1)) / rows_t(sum_bht1)
  dv_bhsd = jnp.einsum("bhst,bhtd->bhsd", probs_bhst.astype(g_bhtd.dtype), g_bhtd)
  dprobs_bhst = jnp.einsum("bhsd,bhtd->bhst", v_bhsd, g_bhtd, preferred_element_type=jnp.float32)
  # sum_s dP * P = sum_d dO * O per query (the softmax backward's row term).
  rowdot_bht1 = jnp.sum(g_bhtd.astype(jnp.float32) * out_bhtd.astype(jnp.float32), axis=-1,
                        keepdims=True)
  dcapped_bhst = probs_bhst * (dprobs_bhst - rows_t(rowdot_bht1))
  if slope_bhst is not None:
    dcapped_bhst = dcapped_bhst * slope_bhst
  dscores_bhst = jnp.where(mask_b1st, dcapped_bhst * scale, 0.0).astype(q_bhtd.dtype)
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


def _attend_fwd(q_bthd, k_bskd, v_bskd, mask_b1ts, scale, blocks, softcap):
  heads, kv_heads = q_bthd.shape[2], k_bskd.shape[2]
  q_bhtd, k_bksd, v_bksd = _head_major(q_bthd), _head_major(k_bskd), _head_major(v_bskd)
  outs, maxes, sums = [], [], []
  for rows, n in _blocks(q_bthd.shape[1], k_bskd.shape[1], blocks):
    out, mx, sm = _block_fwd(_grouped(q_bhtd[:, :, rows], kv_heads), k_bksd[:, :, :n],
                             v_bksd[:, :, :n],
                             _grouped_mask(mask_b1ts[:, :, rows, :n], heads // kv_heads), scale,
                             softcap)
    outs.append(_ungrouped(out, heads)), maxes.append(_ungrouped(mx, heads))
    sums.append(_ungrouped(sm, heads))
  out_bhtd = jnp.where(_row_visible(mask_b1ts), jnp.concatenate(outs, axis=2), 0.0)
  out_bthd = jnp.swapaxes(out_bhtd, 1, 2)
  max_bht1, sum_bht1 = jnp.concatenate(maxes, axis=2), jnp.concatenate(sums, axis=2)
  # Named for remat policies that keep them (see decoder._REMAT_POLICIES' 'dots_attention').
  out_bthd, max_bht1, sum_bht1 = (checkpoint_name(x, "attention")
                                  for x in (out_bthd, max_bht1, sum_bht1))
  return out_bthd, (q_bthd, k_bskd, v_bskd, mask_b1ts, out_bthd, max_bht1, sum_bht1)


def _attend_bwd(scale, blocks, softcap, res, g_bthd):
  q_bthd, k_bskd, v_bskd, mask_b1ts, out_bthd, max_bht1, sum_bht1 = res
  heads, kv_heads = q_bthd.shape[2], k_bskd.shape[2]
  q_bhtd, k_bksd, v_bksd = _head_major(q_bthd), _head_major(k_bskd), _head_major(v_bskd)
  out_bhtd = _head_major(out_bthd)
  g_bhtd = jnp.where(_row_visible(mask_b1ts), _head_major(g_bthd), 0.0)
  s = k_bskd.shape[1]
  group = lambda x: _grouped(x, kv_heads)
  dqs, dk_bksd, dv_bksd = [], 0.0, 0.0
  for rows, n in _blocks(q_bthd.shape[1], s, blocks):
    dq, dk, dv = _block_bwd(scale, softcap, group(q_bhtd[:, :, rows]), k_bksd[:, :, :n], v_bksd[:, :, :n],
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def attend(q_bthd, k_bskd, v_bskd, mask_b1ts, scale: float, blocks: int = 1,
           softcap: float | None = None):
  """softmax(soft_cap(q k^T * scale, softcap), masked) v: q [B, T, H, D], k and v [B, S, K, D]
  with K dividing H (grouped-query attention; query head h reads KV head h // (H / K)). Returns
  [B, T, H, D]. `softcap` None: no cap.

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
  return _attend_fwd(q_bthd, k_bskd, v_bskd, mask_b1ts, scale, blocks, softcap)[0]


attend.defvjp(_attend_fwd, _attend_bwd)


def stream_count(requested: int, rows: int) -> int:
  """How many row slices the layers run on: `requested` when every batch shard's rows divide by
  it, else 1."""
  return requested if requested > 1 and rows % (requested * act.batch_shards()) == 0 else 1


def split_rows(x, k: int):
  """[B, ...] -> k arrays [B / k, ...]; slice i holds rows i, i + k, ... so each batch shard's
  rows split locally (as `split_micro_batches` does). Pytrees of arrays give a tuple of pytrees."""
  def split(a):
    a = a.reshape(a.shape[0] // k, k, *a.shape[1:])
    return tuple(a[:, i] for i in range(k))
  leaves, treedef = jax.tree.flatten(x)
  parts = [split(a) for a in leaves]
  return tuple(jax.tree.unflatten(treedef, [p[i] for p in parts]) for i in range(k))


def merge_rows(xs):
  """The inverse of `split_rows`."""
  return jnp.stack(xs, axis=1).reshape(-1, *xs[0].shape[1:])


@functools.cache
def streamed(block_cls):
  """`block_cls` whose call takes tuples of row slices (`split_rows` of x, the mask info and the
  rotary tables) and runs each slice through the same weights on its own.

  XLA:CPU runs most of a layer's operations on one thread each; the slices' products and
  elementwise passes do not depend on each other, so it can run them side by side. Subclassing
  keeps the block's parameter paths, and one remat region (and one scan body) spans all slices.
  """
  class Streamed(block_cls):
    def __call__(self, xs_bte, mask_infos, ropes, layer_kv=None, sliding=None):
      assert layer_kv is None, "layer streams never run with a KV cache"
      outs = tuple(block_cls.__call__(self, x_bte, mask_info, rope, None, sliding)[0]
                   for x_bte, mask_info, rope in zip(xs_bte, mask_infos, ropes))
      return outs, None

  Streamed.__name__ = f"Streamed{block_cls.__name__}"
  return Streamed
