"""Next-token cross-entropy in float32 with a loss mask (pure jax)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from research.models.softcap import soft_cap_with_slope


@jax.custom_vjp
def token_nll(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
  """Negative log-likelihood of each target token, computed in float32. [B, T]

  Its backward is the closed form `g * (softmax(logits) - onehot(target))`, one elementwise pass
  over the logits. Autodiff of logsumexp + take_along_axis instead writes the exponentials, their
  scaled copy and a scatter-add of the one-hot into a zeroed [B, T, V] buffer: four passes over
  the largest activation of a small model.
  """
  return _token_nll_fwd(logits_btv, targets_bt)[0]


def _token_nll_fwd(logits_btv, targets_bt):
  logits32 = logits_btv.astype(jnp.float32)
  logz_bt = jax.nn.logsumexp(logits32, axis=-1)
  target_logit_bt = jnp.take_along_axis(logits32, targets_bt[..., None], axis=-1)[..., 0]
  return logz_bt - target_logit_bt, (logits_btv, targets_bt, logz_bt)


def _token_nll_bwd(res, g_bt):
  logits_btv, targets_bt, logz_bt = res
  vocab_v = jnp.arange(logits_btv.shape[-1], dtype=targets_bt.dtype)
  probs_btv = jnp.exp(logits_btv.astype(jnp.float32) - logz_bt[..., None])
  onehot_btv = (vocab_v == targets_bt[..., None]).astype(jnp.float32)
  return (g_bt[..., None] * (probs_btv - onehot_btv)).astype(logits_btv.dtype), None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def masked_nll_sum(logits_btv: jax.Array, targets_bt: jax.Array,
                   loss_mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of masked token NLL, number of masked-in tokens): divide after summing over micro-batches."""
  mask_bt = loss_mask_bt.astype(jnp.float32)
  return jnp.sum(token_nll(logits_btv, targets_bt) * mask_bt), jnp.sum(mask_bt)


def masked_lm_loss(logits_btv: jax.Array, targets_bt: jax.Array,
                   loss_mask_bt: jax.Array) -> jax.Array:
  total, count = masked_nll_sum(logits_btv, targets_bt, loss_mask_bt)
  return total / jnp.maximum(count, 1.0)


def _identity_constraint(x: jax.Array, logical_axes) -> jax.Array:
  del logical_axes
  return x


def chunked_head_nll_sum(hidden_bte: jax.Array, kernel_ev: jax.Array, targets_bt: jax.Array,
                         loss_mask_bt: jax.Array, chunk_len: int, groups: int = 1,
                         constrain=_identity_constraint,
                         softcap: float | None = None) -> tuple[jax.Array, jax.Array]:
  """`masked_nll_sum(soft_cap(hidden @ kernel, softcap), ...)` without the [B, T, V] logits or
  their gradient (`softcap`: the model's final-logit cap, None for none).

  The tokens run through the LM head in chunks of B / groups * chunk_len consecutive tokens of a
  group's rows (a scan). When differentiated, each
  chunk's logits gradient `softmax - onehot` is formed while its logits are still in cache and
  used at once: the hidden-state gradient of the chunk and the kernel gradient, summed over
  chunks, are the residuals, and the backward only scales them. Only [B, chunk_len, V] logits are
  ever live, not [B, T, V] twice (logits and their gradient).

  The kernel gradient is summed per batch group (`groups` = the batch's shard count, `constrain`
  pins group g to its shard): each device accumulates its own partial sum and the groups are
  added once, after the last chunk, instead of once per chunk.
  """
  mask_bt = loss_mask_bt.astype(jnp.float32)
  total = _chunked_nll(hidden_bte, kernel_ev, targets_bt, mask_bt, chunk_len, groups, constrain,
                       softcap)
  return total, jnp.sum(mask_bt)


def _chunks(x_bt, chunk_len: int, groups: int, constrain):
  """[B, T, ...] -> [n, (groups,) rows, ...]: the scan's chunks, each `rows` = B / groups *
  chunk_len consecutive tokens of one group's rows (a reshape, no copy, when groups == 1); the
  groups axis only when there is more than one group."""
  b, t = x_bt.shape[:2]
  rows, rest = b // groups * chunk_len, x_bt.shape[2:]
  n = t // chunk_len
  x = x_bt.reshape(groups, n, rows, *rest)
  if groups == 1:
    return x.reshape(n, rows, *rest)
  return constrain(jnp.moveaxis(x, 1, 0), (None, "batch", None) + (None,) * len(rest))


def _unchunk(x_chunks, b: int, t: int, groups: int):
  """Inverse of `_chunks` for [n, (groups,) rows, E]."""
  e = x_chunks.shape[-1]
  if groups == 1:
    return x_chunks.reshape(b, t, e)
  return jnp.moveaxis(x_chunks, 0, 1).reshape(b, t, e)


def _chunked_nll_scan(hidden_bte, kernel_ev, targets_bt, mask_bt, chunk_len, groups, constrain,
                      softcap, with_grads: bool):
  """(masked NLL sum, (d hidden, d kernel) or None). Arrays in the scan are [(groups,) rows, ...]:
  `g` below is the optional groups axis, `n` the chunk's rows."""
  b, t, _ = hidden_bte.shape
  if t % chunk_len or b % groups:
    raise ValueError(f"chunked LM loss: chunk_len={chunk_len} must divide the length {t} and "
                     f"groups={groups} the batch {b}")
  kernel_ev = constrain(kernel_ev, (None, "vocab"))
  vocab_v = jnp.arange(kernel_ev.shape[1], dtype=targets_bt.dtype)
  xs = tuple(_chunks(a, chunk_len, groups, constrain) for a in (hidden_bte, targets_bt, mask_bt))
  grouped = (lambda x, *axes: constrain(x, ("batch", *axes))) if groups > 1 else (
      lambda x, *axes: constrain(x, axes))

  def body(dkernel_gev, chunk):
    h_gne, targets_gn, mask_gn = chunk
    logits_gnv, slope_gnv = soft_cap_with_slope(grouped(h_gne @ kernel_ev, None, "vocab"),
                                                softcap)
    logits32_gnv = logits_gnv.astype(jnp.float32)
    logz_gn = jax.nn.logsumexp(logits32_gnv, axis=-1)
    target_logit_gn = jnp.take_along_axis(logits32_gnv, targets_gn[..., None], axis=-1)[..., 0]
    # Summed per group, so that no cross-device sum runs inside the loop.
    nll_g = jnp.sum((logz_gn - target_logit_gn) * mask_gn, axis=-1)
    if not with_grads:
      return dkernel_gev, (nll_g, None)
    onehot_gnv = vocab_v == targets_gn[..., None]
    dlogits_gnv = (jnp.exp(logits32_gnv - logz_gn[..., None]) - onehot_gnv) * mask_gn[..., None]
    if slope_gnv is not None:  # through the cap, back to the head's product
      dlogits_gnv = dlogits_gnv * slope_gnv
    dlogits_gnv = dlogits_gnv.astype(logits_gnv.dtype)
    dh_gne = jnp.einsum("...nv,ev->...ne", dlogits_gnv, kernel_ev).astype(hidden_bte.dtype)
    # h^T laid out row-major before the product (see layers._matmul_tx): an [E, rows] operand.
    h_gen = jax.lax.optimization_barrier(jnp.swapaxes(h_gne, -1, -2))
    dkernel_gev = dkernel_gev + jnp.einsum("...en,...nv->...ev", h_gen, dlogits_gnv,
                                           preferred_element_type=jnp.float32)
    return grouped(dkernel_gev, None, "vocab"), (nll_g, dh_gne)

  dkernel0 = None
  if with_grads:
    # Zeros, not the first chunk's product run before the loop, which would keep a second
    # float32 [embed, vocab] buffer live.
    shape = kernel_ev.shape if groups == 1 else (groups, *kernel_ev.shape)
    dkernel0 = grouped(jnp.zeros(shape, jnp.float32), None, "vocab")
  dkernel_gev, (nll_ng, dh_chunks) = jax.lax.scan(body, dkernel0, xs)
  total = jnp.sum(nll_ng)
  if not with_grads:
    return total, None
  # Summed across the groups straight into the kernel's own sharding (a reduce-scatter under FSDP).
  dkernel_ev = constrain(dkernel_gev if groups == 1 else jnp.sum(dkernel_gev, axis=0),
                         ("embed", "vocab"))
  return total, (_unchunk(dh_chunks, b, t, groups), dkernel_ev.astype(kernel_ev.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _chunked_nll(hidden_bte, kernel_ev, targets_bt, mask_bt, chunk_len, groups, constrain,
                 softcap):
  return _chunked_nll_scan(hidden_bte, kernel_ev, targets_bt, mask_bt, chunk_len, groups,
                           constrain, softcap, with_grads=False)[0]


def _chunked_nll_fwd(hidden_bte, kernel_ev, targets_bt, mask_bt, chunk_len, groups, constrain,
                     softcap):
  return _chunked_nll_scan(hidden_bte, kernel_ev, targets_bt, mask_bt, chunk_len, groups,
                           constrain, softcap, with_grads=True)


def _chunked_nll_bwd(chunk_len, groups, constrain, softcap, grads, g):
  del softcap  # already in the residual gradients
  dhidden_bte, dkernel_ev = grads
  return (g * dhidden_bte).astype(dhidden_bte.dtype), (g * dkernel_ev).astype(dkernel_ev.dtype), \
      None, None


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)
