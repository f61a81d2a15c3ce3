"""Knowledge distillation: per-token divergences between a student's and a teacher's next-token
distributions (forward KL, reverse KL, GKD's generalised Jensen-Shannon), and their masked sum
with both LM heads run over chunks of tokens, so no [tokens, vocab] logits are whole (pure jax).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from research.models.softcap import soft_cap

DIVERGENCES = {"forward_kl": 0.0, "reverse_kl": 1.0}  # their beta in `generalized_jsd`


def _kl(logp_nv: jax.Array, logq_nv: jax.Array) -> jax.Array:
  """KL(p || q) per row, from log-probs. [N]"""
  return jnp.sum(jnp.exp(logp_nv) * (logp_nv - logq_nv), axis=-1)


def generalized_jsd(student_logits_nv: jax.Array, teacher_logits_nv: jax.Array, beta: float,
                    temperature: float = 1.0) -> jax.Array:
  """Per-token divergence of GKD, Agarwal et al. 2024 (arXiv:2306.13649) eq. 1, as TRL's
  `GKDTrainer.generalized_jsd_loss`: with S, T the temperature-scaled distributions and the
  mixture M = beta T + (1 - beta) S, `beta KL(T || M) + (1 - beta) KL(S || M)`. The ends, where
  that vanishes, are the KLs themselves: beta = 0 is the forward KL(T || S) (mass-covering),
  beta = 1 the reverse KL(S || T) (mode-seeking). Computed in float32. [N]"""
  logs_nv = jax.nn.log_softmax(student_logits_nv.astype(jnp.float32) / temperature, axis=-1)
  logt_nv = jax.nn.log_softmax(teacher_logits_nv.astype(jnp.float32) / temperature, axis=-1)
  if beta == 0.0:
    return _kl(logt_nv, logs_nv)
  if beta == 1.0:
    return _kl(logs_nv, logt_nv)
  logm_nv = jnp.logaddexp(logs_nv + jnp.log1p(-beta), logt_nv + jnp.log(beta))
  return beta * _kl(logt_nv, logm_nv) + (1.0 - beta) * _kl(logs_nv, logm_nv)


def _nll(logits_nv: jax.Array, targets_n: jax.Array) -> jax.Array:
  logits32 = logits_nv.astype(jnp.float32)
  target_n = jnp.take_along_axis(logits32, targets_n[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits32, axis=-1) - target_n


def chunked_distill_sums(student_hidden_bte: jax.Array, student_kernel_ev: jax.Array,
                         teacher_hidden_bte: jax.Array, teacher_kernel_ev: jax.Array,
                         targets_bt: jax.Array, mask_bt: jax.Array, chunk_len: int, beta: float,
                         temperature: float = 1.0, student_softcap: float | None = None,
                         teacher_softcap: float | None = None, nll_mask_bt: jax.Array | None = None,
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(masked sum of `generalized_jsd`, masked sum of the student's NLL of `targets`, mask count).

  Each model's logits are `soft_cap(hidden @ kernel, its softcap)` (the models' final-logit caps,
  None for none), as their decoders compute them. The NLL sums over `nll_mask` where given
  (on-policy rows: the data's responses only), else over `mask`; the count is always `mask`'s.

  Both heads run over chunks of `chunk_len` positions of every row (0: all at once) inside a
  rematerialised scan: only [B, chunk_len, V] logits of each model are live, and the backward
  recomputes a chunk's logits instead of keeping them. The teacher gets no gradient.
  """
  b, t, _ = student_hidden_bte.shape
  teacher_hidden_bte = jax.lax.stop_gradient(teacher_hidden_bte)
  teacher_kernel_ev = jax.lax.stop_gradient(teacher_kernel_ev)
  mask_bt = mask_bt.astype(jnp.float32)
  nll_mask_bt = mask_bt if nll_mask_bt is None else nll_mask_bt.astype(jnp.float32)

  def sums(h_s, h_t, targets, mask, nll_mask):
    logits_s = soft_cap(h_s @ student_kernel_ev, student_softcap)  # [B, chunk, V]
    logits_t = soft_cap(h_t @ teacher_kernel_ev, teacher_softcap)
    div = generalized_jsd(logits_s, logits_t, beta, temperature)
    nll = _nll(logits_s, targets)
    return jnp.sum(div * mask), jnp.sum(nll * nll_mask)

  if not chunk_len or chunk_len >= t:
    div, nll = sums(student_hidden_bte, teacher_hidden_bte, targets_bt, mask_bt, nll_mask_bt)
    return div, nll, jnp.sum(mask_bt)
  if t % chunk_len:
    raise ValueError(f"chunked distillation loss: chunk_len={chunk_len} must divide the length {t}")
  n = t // chunk_len
  to_chunks = lambda x: jnp.moveaxis(x.reshape(b, n, chunk_len, *x.shape[2:]), 1, 0)  # noqa: E731

  @jax.checkpoint
  def body(carry, chunk):
    div, nll = sums(*chunk)
    return (carry[0] + div, carry[1] + nll), None

  zero = jnp.zeros((), jnp.float32)
  (div, nll), _ = jax.lax.scan(body, (zero, zero), tuple(
      to_chunks(x) for x in (student_hidden_bte, teacher_hidden_bte, targets_bt, mask_bt,
                             nll_mask_bt)))
  return div, nll, jnp.sum(mask_bt)
