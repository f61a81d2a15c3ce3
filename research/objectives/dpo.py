"""Preference optimisation without a reward model: DPO and its family as losses per pair, the
per-sequence log-probs they read (chunked through the LM head), and TRL-named metrics (pure jax).

A pair is (chosen, rejected): chosen ranks above rejected. Sums of token log-probs are `logps`,
their per-token means `avg_logps`; `h = (pi_c - pi_r) - (ref_c - ref_r)` is the implicit reward
margin of DPO. Every loss returns one value per pair, so the stage sums them (numerator) and
counts pairs (denominator), which adds up exactly over micro-batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from research.models.softcap import soft_cap
from research.objectives.ranking import pair_mask

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
# Losses on per-token means of the log-probs (as TRL: IPO, SimPO and ORPO), others on sums.
LENGTH_NORMALISED = ("ipo", "simpo", "orpo")


def sigmoid_loss(h_p: jax.Array, beta: float, label_smoothing: float = 0.0) -> jax.Array:
  """DPO, Rafailov et al. 2023 (arXiv:2305.18290) eq. 7: `-log sigmoid(beta h)`. With
  `label_smoothing` eps, conservative DPO (Mitchell 2023, cDPO eq. 3): the label is flipped with
  probability eps, `-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)`. [P]"""
  z_p = beta * h_p
  return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z_p) - \
      label_smoothing * jax.nn.log_sigmoid(-z_p)


def ipo_loss(h_p: jax.Array, beta: float) -> jax.Array:
  """IPO, Azar et al. 2023 (arXiv:2310.12036) eq. 17 with tau = beta: `(h - 1 / (2 beta))^2`;
  h from length-averaged log-probs, as TRL. [P]"""
  return jnp.square(h_p - 1.0 / (2.0 * beta))


def hinge_loss(h_p: jax.Array, beta: float) -> jax.Array:
  """SLiC-HF hinge, Zhao et al. 2023 (arXiv:2305.10425) eq. 2 on the DPO margin:
  `max(0, 1 - beta h)`. [P]"""
  return jax.nn.relu(1.0 - beta * h_p)


def simpo_loss(avg_chosen_p: jax.Array, avg_rejected_p: jax.Array, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> jax.Array:
  """SimPO, Meng et al. 2024 (arXiv:2405.14734) eq. 6, reference-free and length-normalised:
  `-log sigmoid(beta (avg_c - avg_r) - gamma)` with target margin gamma (label smoothing as
  cDPO, as TRL's CPO trainer). [P]"""
  return sigmoid_loss(avg_chosen_p - avg_rejected_p - gamma / beta, beta, label_smoothing)


def log_odds(avg_logps: jax.Array) -> jax.Array:
  """`log(p / (1 - p))` of a sequence with mean token log-prob `avg_logps` (< 0)."""
  # log1p(-exp(x)) loses nothing for x near 0 only via expm1: log(-expm1(x)).
  return avg_logps - jnp.log(-jnp.expm1(avg_logps))


def orpo_loss(avg_chosen_p: jax.Array, avg_rejected_p: jax.Array, beta: float
              ) -> tuple[jax.Array, jax.Array]:
  """ORPO, Hong et al. 2024 (arXiv:2403.07691) eq. 6-7: the SFT loss on the chosen response plus
  `beta` (lambda) times the odds-ratio loss `-log sigmoid(log odds_c - log odds_r)`; no reference.
  The SFT term is the chosen response's mean token NLL, `-avg_c`. Returns (loss [P], log odds
  ratio [P])."""
  ratio_p = log_odds(avg_chosen_p) - log_odds(avg_rejected_p)
  return -avg_chosen_p - beta * jax.nn.log_sigmoid(ratio_p), ratio_p


def expand_pairs(x_bk: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[B, K] per completion -> ([B, K, K] of the better i, [B, K, K] of the worse j) for every
  ordered pair i < j (K = 2: the one pair at [b, 0, 1])."""
  return jnp.broadcast_to(x_bk[:, :, None], x_bk.shape + x_bk.shape[-1:]), \
      jnp.broadcast_to(x_bk[:, None, :], x_bk.shape + x_bk.shape[-1:])


def preference_losses(logps_bk: jax.Array, counts_bk: jax.Array, valid_bk: jax.Array,
                      ref_logps_bk: jax.Array | None, *, loss_type: str, beta: float,
                      label_smoothing: float = 0.0, gamma: float = 0.0
                      ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """(sum of pair losses, number of pairs, metric sums) over every ordered pair i < j of valid
  completions of each prompt, completions ranked best first (K = 2: chosen, rejected).

  `logps_bk` are summed response-token log-probs, `counts_bk` their token counts,
  `ref_logps_bk` the reference's sums (ignored by reference-free losses). Metric sums, each over
  pairs (divide by `num_pairs`), as TRL's: rewards/chosen, rewards/rejected (beta times the log-
  ratio to the reference; beta times the policy log-prob for reference-free losses),
  rewards/accuracies (chosen reward > rejected), rewards/margins, logps/chosen, logps/rejected
  (the log-probs the loss reads: sums, or means for length-normalised losses).
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"dpo loss_type={loss_type!r}; known: {LOSS_TYPES}")
  valid_bk = valid_bk.astype(bool)
  pairs_bkk = pair_mask(valid_bk)
  on_bkk = pairs_bkk > 0
  # Padded completions are zeroed before any arithmetic, so nothing non-finite reaches a gradient.
  logps_bk = jnp.where(valid_bk, logps_bk.astype(jnp.float32), 0.0)
  counts_bk = jnp.where(valid_bk, counts_bk.astype(jnp.float32), 1.0)
  if loss_type in LENGTH_NORMALISED:
    logps_bk = logps_bk / jnp.maximum(counts_bk, 1.0)
    if ref_logps_bk is not None:
      ref_logps_bk = ref_logps_bk / jnp.maximum(counts_bk, 1.0)
  pi_c, pi_r = expand_pairs(logps_bk)
  extra = {}
  if loss_type in REFERENCE_FREE:
    reward_c, reward_r = beta * pi_c, beta * pi_r
    if loss_type == "simpo":
      losses = simpo_loss(pi_c, pi_r, beta, gamma, label_smoothing)
    else:
      # Mean log-probs must stay < 0 for the odds; a length-1 response of prob 1 would be inf.
      losses, ratio = orpo_loss(jnp.minimum(pi_c, -1e-6), jnp.minimum(pi_r, -1e-6), beta)
      extra["log_odds_ratio"] = jnp.sum(jnp.where(on_bkk, ratio, 0.0))
  else:
    if ref_logps_bk is None:
      raise ValueError(f"loss_type={loss_type!r} needs the reference log-probs")
    ref_bk = jnp.where(valid_bk, ref_logps_bk.astype(jnp.float32), 0.0)
    ref_c, ref_r = expand_pairs(ref_bk)
    h = (pi_c - pi_r) - (ref_c - ref_r)
    reward_c, reward_r = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    losses = {"sigmoid": lambda: sigmoid_loss(h, beta, label_smoothing),
              "ipo": lambda: ipo_loss(h, beta),
              "hinge": lambda: hinge_loss(h, beta)}[loss_type]()
  masked = lambda x: jnp.sum(jnp.where(on_bkk, x, 0.0))  # noqa: E731
  sums = {"rewards/chosen": masked(reward_c), "rewards/rejected": masked(reward_r),
          "rewards/accuracies": masked((reward_c > reward_r).astype(jnp.float32)),
          "rewards/margins": masked(reward_c - reward_r),
          "logps/chosen": masked(pi_c), "logps/rejected": masked(pi_r), **extra}
  return masked(losses), jnp.sum(pairs_bkk), sums


def next_token_targets(tokens_bt: jax.Array, response_mask_bt: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
  """(targets [B, T], mask [B, T]): position t predicts token t + 1, counted when that token is a
  response token. The length stays T (the last position predicts nothing), so chunks divide it."""
  targets_bt = jnp.concatenate([tokens_bt[:, 1:], jnp.zeros_like(tokens_bt[:, :1])], axis=1)
  mask_bt = jnp.concatenate([response_mask_bt[:, 1:], jnp.zeros_like(response_mask_bt[:, :1])],
                            axis=1)
  return targets_bt, mask_bt.astype(jnp.float32)


def sequence_logps(logits_btv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array
                   ) -> jax.Array:
  """Sum over masked positions of `log softmax(logits)[target]`, per row, in float32. [B]"""
  logits32 = logits_btv.astype(jnp.float32)
  logz_bt = jax.nn.logsumexp(logits32, axis=-1)
  target_bt = jnp.take_along_axis(logits32, targets_bt[..., None], axis=-1)[..., 0]
  return jnp.sum((target_bt - logz_bt) * mask_bt, axis=-1)


def chunked_sequence_logps(hidden_bte: jax.Array, kernel_ev: jax.Array, targets_bt: jax.Array,
                           mask_bt: jax.Array, chunk_len: int,
                           softcap: float | None = None) -> jax.Array:
  """`sequence_logps(soft_cap(hidden @ kernel, softcap), ...)` with only [B, chunk_len, V] logits
  live: a scan over chunks of positions whose body is rematerialised, so the backward recomputes
  each chunk's logits instead of keeping them all (`softcap`: the model's final-logit cap). [B]"""
  b, t, e = hidden_bte.shape
  if not chunk_len or chunk_len >= t:
    return sequence_logps(soft_cap(hidden_bte @ kernel_ev, softcap), targets_bt, mask_bt)
  if t % chunk_len:
    raise ValueError(f"chunked log-probs: chunk_len={chunk_len} must divide the length {t}")
  n = t // chunk_len
  to_chunks = lambda x: jnp.moveaxis(x.reshape(b, n, chunk_len, *x.shape[2:]), 1, 0)  # noqa: E731

  @jax.checkpoint
  def body(total_b, chunk):
    h_bce, targets_bc, mask_bc = chunk
    logits_bcv = soft_cap(h_bce @ kernel_ev, softcap)
    return total_b + sequence_logps(logits_bcv, targets_bc, mask_bc), None

  total_b, _ = jax.lax.scan(body, jnp.zeros((b,), jnp.float32),
                            (to_chunks(hidden_bte), to_chunks(targets_bt), to_chunks(mask_bt)))
  return total_b
