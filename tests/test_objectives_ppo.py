"""PPO pieces against TRL's formulas written out in numpy: GAE (rows ending early, gaps), whitening,
clipped policy and value losses, KL estimators, shaped rewards, entropy, the adaptive KL update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.objectives import ppo as ppo_eager


class _Jitted:
  """ppo's functions, each jitted once (eager jax compiles every primitive, slow on a busy CPU)."""

  def __getattr__(self, name):
    fn = getattr(ppo_eager, name)
    statics = {"kl_penalty": ("kind",), "masked_var": ("unbiased",), "masked_mean": ("axis",),
               "masked_whiten": ("shift_mean",), "gae_advantages": ("gamma", "lam")}
    return jax.jit(fn, static_argnames=statics.get(name, ()))


ppo = _Jitted()

B, T = 4, 7
LENGTHS_B = np.array([7, 5, 1, 3])  # rows end early; right padding after


def response_mask():
  return np.arange(T)[None, :] < LENGTHS_B[:, None]


def rng_inputs(seed=0):
  rng = np.random.default_rng(seed)
  return rng, rng.normal(size=(B, T)).astype(np.float32)


def trl_gae(values_bt, rewards_bt, gamma, lam):
  """TRL PPOTrainer's loop, verbatim in numpy."""
  lastgaelam = 0.0
  advantages_reversed = []
  gen_length = values_bt.shape[1]
  for t in reversed(range(gen_length)):
    nextvalues = values_bt[:, t + 1] if t < gen_length - 1 else 0.0
    delta = rewards_bt[:, t] + gamma * nextvalues - values_bt[:, t]
    lastgaelam = delta + gamma * lam * lastgaelam
    advantages_reversed.append(lastgaelam)
  advantages = np.stack(advantages_reversed[::-1], axis=1)
  return advantages, advantages + values_bt


def trl_masked_mean(x, mask):
  return (x * mask).sum() / mask.sum()


def trl_masked_var(x, mask):
  centered = x - trl_masked_mean(x, mask)
  n = mask.sum()
  return trl_masked_mean(centered ** 2, mask) * n / (n - 1)


def test_gae_matches_trl_loop_with_rows_ending_early():
  rng, values_bt = rng_inputs()
  rewards_bt = rng.normal(size=(B, T)).astype(np.float32)
  mask_bt = response_mask()
  # TRL zeroes values and rewards past each row's end before its loop.
  want_adv, want_ret = trl_gae(values_bt * mask_bt, rewards_bt * mask_bt, 0.99, 0.95)
  adv_bt, ret_bt = ppo.gae_advantages(
      values_bt, rewards_bt, mask_bt, 0.99, 0.95)
  np.testing.assert_allclose(np.asarray(adv_bt), want_adv, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ret_bt), want_ret, rtol=1e-5, atol=1e-6)
  assert not np.asarray(adv_bt)[~mask_bt].any()
  # TRL then whitens the advantages over the response tokens.
  want_white = (want_adv - trl_masked_mean(want_adv, mask_bt)) / np.sqrt(
      trl_masked_var(want_adv, mask_bt) + 1e-8)
  got_white = ppo.masked_whiten(adv_bt, mask_bt)
  np.testing.assert_allclose(np.asarray(got_white)[mask_bt], want_white[mask_bt], rtol=1e-4,
                             atol=1e-5)
  got_unshifted = ppo.masked_whiten(adv_bt, mask_bt, shift_mean=False)
  np.testing.assert_allclose(np.asarray(got_unshifted)[mask_bt],
                             want_white[mask_bt] + trl_masked_mean(want_adv, mask_bt), rtol=1e-4,
                             atol=1e-5)


def test_gae_skips_masked_positions_inside_a_row():
  rng, values_bt = rng_inputs(1)
  rewards_bt = rng.normal(size=(B, T)).astype(np.float32)
  mask_bt = np.ones((B, T), bool)
  mask_bt[:, :2] = False  # prompt positions before the response
  mask_bt[0, 4] = False  # a gap
  adv_bt, ret_bt = ppo.gae_advantages(values_bt, rewards_bt, mask_bt, 0.9, 0.8)
  for b in range(B):
    keep = mask_bt[b]
    want_adv, want_ret = trl_gae(values_bt[b:b + 1, keep], rewards_bt[b:b + 1, keep], 0.9, 0.8)
    np.testing.assert_allclose(np.asarray(adv_bt)[b, keep], want_adv[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ret_bt)[b, keep], want_ret[0], rtol=1e-5, atol=1e-6)
  assert not np.asarray(adv_bt)[~mask_bt].any() and not np.asarray(ret_bt)[~mask_bt].any()


def test_masked_mean_and_var():
  _, x_bt = rng_inputs(2)
  mask_bt = response_mask()
  np.testing.assert_allclose(float(ppo.masked_mean(x_bt, mask_bt)), trl_masked_mean(x_bt, mask_bt),
                             rtol=1e-6)
  np.testing.assert_allclose(float(ppo.masked_var(x_bt, mask_bt)), trl_masked_var(x_bt, mask_bt),
                             rtol=1e-5)
  np.testing.assert_allclose(float(ppo.masked_var(x_bt, mask_bt, unbiased=False)),
                             np.var(x_bt[mask_bt]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(ppo.masked_mean(x_bt, mask_bt, axis=1)),
                             [x_bt[b, :n].mean() for b, n in enumerate(LENGTHS_B)], rtol=1e-5)
  assert float(ppo.masked_mean(x_bt, np.zeros_like(mask_bt))) == 0.0


def test_policy_and_value_losses_match_trl():
  rng, old_bt = rng_inputs(3)
  old_bt = -np.abs(old_bt)
  new_bt = old_bt + rng.normal(scale=0.3, size=(B, T)).astype(np.float32)
  adv_bt = rng.normal(size=(B, T)).astype(np.float32)
  mask_bt = response_mask()
  eps = 0.2
  ratio = np.exp(new_bt - old_bt)
  pg_losses = -adv_bt * ratio
  pg_losses2 = -adv_bt * np.clip(ratio, 1 - eps, 1 + eps)
  loss, clipfrac, approxkl = ppo.policy_loss(new_bt, old_bt, adv_bt, mask_bt, eps)
  np.testing.assert_allclose(float(loss), trl_masked_mean(np.maximum(pg_losses, pg_losses2),
                                                          mask_bt), rtol=1e-5)
  want_clipfrac = trl_masked_mean((pg_losses2 > pg_losses).astype(np.float32), mask_bt)
  assert 0 < want_clipfrac < 1  # the inputs do exercise clipping
  np.testing.assert_allclose(float(clipfrac), want_clipfrac, rtol=1e-6)
  np.testing.assert_allclose(float(approxkl),
                             0.5 * trl_masked_mean((new_bt - old_bt) ** 2, mask_bt), rtol=1e-5)

  old_v = rng.normal(size=(B, T)).astype(np.float32)
  new_v = old_v + rng.normal(scale=0.5, size=(B, T)).astype(np.float32)
  returns = rng.normal(size=(B, T)).astype(np.float32)
  vclip = old_v + np.clip(new_v - old_v, -eps, eps)
  vf1, vf2 = (new_v - returns) ** 2, (vclip - returns) ** 2
  vloss, vclipfrac = ppo.value_loss(new_v, old_v, returns, mask_bt, eps)
  np.testing.assert_allclose(float(vloss), 0.5 * trl_masked_mean(np.maximum(vf1, vf2), mask_bt),
                             rtol=1e-5)
  want_vclipfrac = trl_masked_mean((vf2 > vf1).astype(np.float32), mask_bt)
  assert 0 < want_vclipfrac < 1
  np.testing.assert_allclose(float(vclipfrac), want_vclipfrac, rtol=1e-6)


def test_kl_estimators_and_shaped_rewards():
  rng, ref_bt = rng_inputs(4)
  logp_bt = ref_bt + rng.normal(scale=0.5, size=(B, T)).astype(np.float32)
  k1 = np.asarray(ppo.kl_penalty(logp_bt, ref_bt, "k1"))
  k3 = np.asarray(ppo.kl_penalty(logp_bt, ref_bt, "k3"))
  np.testing.assert_allclose(k1, logp_bt - ref_bt, rtol=1e-6)
  logr = ref_bt - logp_bt
  np.testing.assert_allclose(k3, (np.exp(logr) - 1) - logr, rtol=1e-5, atol=1e-7)
  assert (k3 >= 0).all()
  with pytest.raises(ValueError, match="k2"):
    ppo.kl_penalty(logp_bt, ref_bt, "k2")

  scores_b = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
  mask_bt = response_mask()
  mask_bt[3, 0] = False  # a row whose response starts late: mask ends at 2
  rewards_bt = np.asarray(ppo.per_token_rewards(scores_b, k1, 0.1, mask_bt))
  want = -0.1 * k1 * mask_bt
  for b, n in enumerate(LENGTHS_B):
    want[b, n - 1] += scores_b[b]
  np.testing.assert_allclose(rewards_bt, want, rtol=1e-5, atol=1e-6)
  # A row with no response token gets nothing.
  empty = ppo.per_token_rewards(scores_b, k1, 0.1, np.zeros((B, T), bool))
  assert not np.asarray(empty).any()


def test_entropy_explained_variance_and_adaptive_kl():
  rng = np.random.default_rng(5)
  logits_btv = rng.normal(scale=3, size=(2, 3, 11)).astype(np.float32)
  p = np.exp(logits_btv - logits_btv.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = -(p * np.log(p)).sum(-1)
  got = ppo.entropy_from_logits(jnp.asarray(logits_btv, jnp.bfloat16))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(ppo.entropy_from_logits(logits_btv)), want, rtol=1e-5)
  masked_btv = logits_btv.copy()
  masked_btv[..., 5:] = -np.inf
  assert np.isfinite(np.asarray(ppo.entropy_from_logits(masked_btv))).all()

  values_bt = rng.normal(size=(B, T)).astype(np.float32)
  returns_bt = values_bt + rng.normal(scale=0.3, size=(B, T)).astype(np.float32)
  mask_bt = response_mask()
  want_ev = 1 - np.var(returns_bt[mask_bt] - values_bt[mask_bt]) / np.var(returns_bt[mask_bt])
  np.testing.assert_allclose(float(ppo.explained_variance(values_bt, returns_bt, mask_bt)),
                             want_ev, rtol=1e-5)
  assert float(ppo.explained_variance(values_bt, np.ones_like(values_bt), mask_bt)) == 0.0

  for current in (0.5, 5.9, 6.0, 6.3, 30.0):
    err = np.clip(current / 6.0 - 1, -0.2, 0.2)
    want_coef = 0.05 * (1 + err * 256 / 10000)
    got_coef = ppo.adaptive_kl_update(0.05, current, target=6.0, horizon=10000, n_steps=256)
    np.testing.assert_allclose(float(got_coef), want_coef, rtol=1e-6)
