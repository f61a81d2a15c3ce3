"""DPO-family losses against plain numpy loops and TRL's formulas (written here in torch as TRL
writes them: DPOTrainer.dpo_loss, CPOTrainer simpo, ORPOTrainer.odds_ratio_loss), and the chunked
per-sequence log-probs against the whole-logits ones."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from research.objectives import dpo

RNG = np.random.default_rng(0)
B = 6
PI_C, PI_R = -RNG.uniform(5, 30, B), -RNG.uniform(5, 30, B)
REF_C, REF_R = -RNG.uniform(5, 30, B), -RNG.uniform(5, 30, B)
N_C, N_R = RNG.integers(3, 12, B).astype(float), RNG.integers(3, 12, B).astype(float)


def _logsig(x):
  return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _pairs_bk(a, b):
  return jnp.asarray(np.stack([a, b], axis=1), jnp.float32)


def _ours(loss_type, beta, label_smoothing=0.0, gamma=0.0):
  num, den, sums = dpo.preference_losses(
      _pairs_bk(PI_C, PI_R), _pairs_bk(N_C, N_R), jnp.ones((B, 2), bool),
      _pairs_bk(REF_C, REF_R), loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
      gamma=gamma)
  assert float(den) == B
  return float(num) / B, {k: float(v) / B for k, v in sums.items()}


def _trl_dpo_loss(loss_type, beta, label_smoothing, pc, pr, rc, rr):
  """TRL DPOTrainer.dpo_loss (sigmoid / hinge / ipo), its rewards and the mean loss."""
  pc, pr, rc, rr = (torch.tensor(x, dtype=torch.float64) for x in (pc, pr, rc, rr))
  logits = (pc - pr) - (rc - rr)
  if loss_type == "sigmoid":
    losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
              - F.logsigmoid(-beta * logits) * label_smoothing)
  elif loss_type == "hinge":
    losses = torch.relu(1 - beta * logits)
  else:
    losses = (logits - 1 / (2 * beta)) ** 2
  chosen_rewards = beta * (pc - rc)
  rejected_rewards = beta * (pr - rr)
  return losses.mean().item(), chosen_rewards, rejected_rewards


@pytest.mark.parametrize("loss_type,beta,ls", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2),
                                              ("hinge", 0.1, 0.0), ("ipo", 0.3, 0.0)])
def test_reference_losses_match_hand_loop_and_trl(loss_type, beta, ls):
  loss, sums = _ours(loss_type, beta, label_smoothing=ls)
  # IPO reads per-token means (TRL's concatenated_forward divides by the completion length).
  norm = (N_C, N_R) if loss_type == "ipo" else (1.0, 1.0)
  pc, pr, rc, rr = PI_C / norm[0], PI_R / norm[1], REF_C / norm[0], REF_R / norm[1]
  hand = []
  for i in range(B):
    h = (pc[i] - pr[i]) - (rc[i] - rr[i])
    hand.append({"sigmoid": -(1 - ls) * _logsig(beta * h) - ls * _logsig(-beta * h),
                 "hinge": max(0.0, 1 - beta * h), "ipo": (h - 1 / (2 * beta)) ** 2}[loss_type])
  np.testing.assert_allclose(loss, np.mean(hand), rtol=1e-6)
  trl_loss, trl_c, trl_r = _trl_dpo_loss(loss_type, beta, ls, pc, pr, rc, rr)
  np.testing.assert_allclose(loss, trl_loss, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(sums["rewards/chosen"], trl_c.mean().item(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(sums["rewards/rejected"], trl_r.mean().item(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(sums["rewards/margins"], (trl_c - trl_r).mean().item(), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(sums["rewards/accuracies"], (trl_c > trl_r).double().mean().item())
  np.testing.assert_allclose(sums["logps/chosen"], np.mean(pc), rtol=1e-6)


def test_simpo_matches_hand_loop_and_trl_cpo():
  beta, gamma, ls = 2.0, 0.5, 0.1
  loss, sums = _ours("simpo", beta, label_smoothing=ls, gamma=gamma)
  ac, ar = PI_C / N_C, PI_R / N_R
  hand = [-(1 - ls) * _logsig(beta * (ac[i] - ar[i]) - gamma)
          - ls * _logsig(-(beta * (ac[i] - ar[i]) - gamma)) for i in range(B)]
  np.testing.assert_allclose(loss, np.mean(hand), rtol=1e-6)
  # TRL CPOTrainer.cpo_loss, loss_type="simpo" (average_log_prob=True).
  c, r = torch.tensor(ac), torch.tensor(ar)
  logits = (c - r) - gamma / beta
  trl = (-F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls).mean()
  np.testing.assert_allclose(loss, trl.item(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(sums["rewards/chosen"], (beta * c).mean().item(), rtol=1e-6)


def test_orpo_matches_hand_loop_and_trl():
  beta = 0.1
  loss, sums = _ours("orpo", beta)
  ac, ar = PI_C / N_C, PI_R / N_R
  odds = lambda a: a - math.log(1 - math.exp(a))  # noqa: E731
  hand = [-ac[i] - beta * _logsig(odds(ac[i]) - odds(ar[i])) for i in range(B)]
  np.testing.assert_allclose(loss, np.mean(hand), rtol=1e-6)
  # TRL ORPOTrainer.odds_ratio_loss; its NLL is the mean over chosen tokens: with per-sequence
  # means averaged, as here, equal when the chosen responses have one length.
  c, r = torch.tensor(ac, dtype=torch.float64), torch.tensor(ar, dtype=torch.float64)
  log_odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
  ratio = F.logsigmoid(log_odds)
  trl = (-c).mean() - (beta * ratio).mean()
  np.testing.assert_allclose(loss, trl.item(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(sums["log_odds_ratio"], log_odds.mean().item(), rtol=1e-5)


def test_k_wise_counts_every_ordered_pair_and_skips_padding():
  """K=3 with one prompt's third completion padded: pairs (0,1), (0,2), (1,2) and (0,1)."""
  logps = jnp.asarray([[-3.0, -5.0, -4.0], [-2.0, -6.0, jnp.inf]])
  ref = jnp.asarray([[-4.0, -4.0, -4.0], [-3.0, -3.0, jnp.nan]])
  valid = jnp.asarray([[True, True, True], [True, True, False]])
  num, den, sums = dpo.preference_losses(logps, jnp.ones((2, 3)), valid, ref,
                                         loss_type="sigmoid", beta=1.0)
  hs = [(-3 + 5) - 0, (-3 + 4) - 0, (-5 + 4) - 0, (-2 + 6) - 0]
  assert float(den) == 4
  np.testing.assert_allclose(float(num), sum(-_logsig(h) for h in hs), rtol=1e-6)
  assert float(sums["rewards/accuracies"]) == 3
  grads = jax.grad(lambda x: dpo.preference_losses(x, jnp.ones((2, 3)), valid, ref,
                                                   loss_type="sigmoid", beta=1.0)[0])(logps)
  assert np.isfinite(np.asarray(grads)).all() and float(grads[1, 2]) == 0.0


def test_chunked_sequence_logps_equal_whole_logits_and_their_gradient():
  rng = jax.random.PRNGKey(0)
  k1, k2, k3, k4 = jax.random.split(rng, 4)
  hidden = jax.random.normal(k1, (3, 8, 16))
  kernel = jax.random.normal(k2, (16, 40)) * 0.3
  tokens = jax.random.randint(k3, (3, 8), 0, 40)
  response = (jax.random.uniform(k4, (3, 8)) > 0.4).astype(jnp.float32)
  targets, mask = dpo.next_token_targets(tokens, response)
  assert float(mask[:, -1].sum()) == 0 and (np.asarray(targets[:, :-1]) == tokens[:, 1:]).all()
  whole = lambda h, w: dpo.sequence_logps(h @ w, targets, mask)  # noqa: E731
  chunked = lambda h, w: dpo.chunked_sequence_logps(h, w, targets, mask, 2)  # noqa: E731
  np.testing.assert_allclose(chunked(hidden, kernel), whole(hidden, kernel), rtol=1e-5)
  # By hand: log-softmax at each counted position.
  logp = jax.nn.log_softmax(hidden @ kernel, axis=-1)
  hand = [sum(float(logp[b, t, targets[b, t]]) for t in range(8) if mask[b, t]) for b in range(3)]
  np.testing.assert_allclose(whole(hidden, kernel), hand, rtol=1e-5)
  weights = jnp.asarray([1.0, -2.0, 0.5])
  g_whole = jax.grad(lambda h, w: jnp.sum(weights * whole(h, w)), argnums=(0, 1))(hidden, kernel)
  g_chunk = jax.grad(lambda h, w: jnp.sum(weights * chunked(h, w)), argnums=(0, 1))(hidden, kernel)
  for a, b in zip(g_chunk, g_whole):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
