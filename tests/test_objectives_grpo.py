"""GRPO's advantages and losses against plain numpy loops and against TRL's GRPOTrainer formulas
(written here in torch as trl/trainer/grpo_trainer.py writes them), for every loss type and clip
setting; and a group of equal rewards gives no policy gradient."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.objectives import grpo

B, G, T = 3, 4, 6
N = B * G


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  logp = rng.normal(-1.5, 0.5, (N, T)).astype(np.float32)
  old = (logp + rng.normal(0.0, 0.3, (N, T))).astype(np.float32)  # ratios well outside 1 +- 0.2
  ref = (logp + rng.normal(0.0, 0.4, (N, T))).astype(np.float32)
  lengths = rng.integers(1, T + 1, N)
  lengths[0] = T
  mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
  rewards = rng.integers(0, 3, (B, G)).astype(np.float32)
  rewards[1] = 2.0  # one group with equal rewards
  return logp, old, ref, mask, rewards


def test_group_advantages_against_loops():
  *_, rewards = _inputs()
  for kind in grpo.ADVANTAGES:
    got = np.asarray(grpo.group_advantages(rewards, kind))
    for b, g in itertools.product(range(B), range(G)):
      group = [float(r) for r in rewards[b]]
      mean = sum(group) / G
      if kind == "group_std":
        std = (sum((r - mean) ** 2 for r in group) / (G - 1)) ** 0.5
        want = (group[g] - mean) / (std + 1e-4)
      elif kind == "group_mean":
        want = group[g] - mean
      else:  # leave-one-out baseline: the mean of the other G - 1 rewards
        want = group[g] - (sum(group) - group[g]) / (G - 1)
      assert got[b, g] == pytest.approx(want, abs=1e-5), (kind, b, g)
    np.testing.assert_array_equal(got[1], 0.0)  # the equal group
  stats = grpo.group_stats(rewards)
  assert float(stats["frac_reward_zero_std"]) == pytest.approx(
      np.mean([len(set(r)) == 1 for r in rewards.tolist()]))
  assert float(stats["reward_std"]) == pytest.approx(np.mean(np.std(rewards, axis=1, ddof=1)))


def _trl_loss(logp, old, ref, advantages, mask, loss_type, eps_low, eps_high, beta, max_len):
  """TRL GRPOTrainer._compute_loss (token-level importance sampling, one process), verbatim."""
  import torch
  per_token_logps, old_per_token_logps = torch.tensor(logp), torch.tensor(old)
  ref_per_token_logps, completion_mask = torch.tensor(ref), torch.tensor(mask)
  advantages = torch.tensor(advantages)
  per_token_kl = (torch.exp(ref_per_token_logps - per_token_logps)
                  - (ref_per_token_logps - per_token_logps) - 1)
  log_ratio = per_token_logps - old_per_token_logps
  coef_1 = torch.exp(log_ratio)
  coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
  per_token_loss1 = coef_1 * advantages.unsqueeze(1)
  per_token_loss2 = coef_2 * advantages.unsqueeze(1)
  per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
  if beta != 0.0:
    per_token_loss = per_token_loss + beta * per_token_kl
  if loss_type == "grpo":
    loss = ((per_token_loss * completion_mask).sum(-1)
            / completion_mask.sum(-1).clamp(min=1.0)).mean()
  elif loss_type == "dr_grpo":
    loss = (per_token_loss * completion_mask).sum() / (per_token_loss.size(0) * max_len)
  else:  # dapo: normalizer = num_items_in_batch / num_processes, the batch's token count
    loss = (per_token_loss * completion_mask).sum() / completion_mask.sum()
  count = completion_mask.sum().clamp(min=1.0)
  low = (coef_1 < 1 - eps_low) & (advantages.unsqueeze(1) < 0)
  high = (coef_1 > 1 + eps_high) & (advantages.unsqueeze(1) > 0)
  metric = lambda x: float((x.float() * completion_mask).sum() / count)  # noqa: E731
  return {"loss": float(loss), "kl": metric(per_token_kl), "low": metric(low),
          "high": metric(high), "region": metric(low | high)}


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.2, 0.28), (0.1, 0.4)])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_matches_trl(loss_type, eps_low, eps_high, beta):
  logp, old, ref, mask, rewards = _inputs(1)
  advantages = np.asarray(grpo.group_advantages(rewards)).reshape(N)
  num, den, sums = grpo.grpo_loss(logp, old, advantages, mask, loss_type=loss_type,
                                  epsilon_low=eps_low, epsilon_high=eps_high,
                                  max_completion_length=T + 2, ref_logprobs_nt=ref, beta=beta)
  trl = _trl_loss(logp, old, ref, advantages, mask, loss_type, eps_low, eps_high, beta, T + 2)
  assert float(num / den) == pytest.approx(trl["loss"], abs=1e-6, rel=1e-6)
  tokens = float(sums["tokens"])
  assert tokens == mask.sum()
  for ours, theirs in (("low_clipped", "low"), ("high_clipped", "high"),
                       ("region_clipped", "region")):
    assert float(sums[ours]) / tokens == pytest.approx(trl[theirs], abs=1e-6)
  assert trl["low"] > 0 and trl["high"] > 0  # both clip sides are exercised
  if beta:
    assert float(sums["kl"]) / tokens == pytest.approx(trl["kl"], abs=1e-6)
  else:
    assert "kl" not in sums


def test_loss_against_loops():
  """The per-token loss and each normaliser by hand, one token at a time."""
  logp, old, ref, mask, rewards = _inputs(2)
  adv = np.asarray(grpo.group_advantages(rewards, "rloo")).reshape(N)
  eps_low, eps_high, beta, max_len = 0.2, 0.3, 0.1, 9
  tok = np.zeros((N, T))
  for n, t in itertools.product(range(N), range(T)):
    ratio = np.exp(float(logp[n, t]) - float(old[n, t]))
    clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
    d = float(ref[n, t]) - float(logp[n, t])
    tok[n, t] = -min(ratio * adv[n], clipped * adv[n]) + beta * (np.exp(d) - d - 1)
  want = {
      "grpo": np.mean([sum(tok[n, t] for t in range(T) if mask[n, t]) / mask[n].sum()
                       for n in range(N)]),
      "dapo": sum(tok[n, t] for n in range(N) for t in range(T) if mask[n, t]) / mask.sum(),
      "dr_grpo": sum(tok[n, t] for n in range(N) for t in range(T) if mask[n, t]) / (N * max_len),
  }
  for loss_type, value in want.items():
    num, den, _ = grpo.grpo_loss(logp, old, adv, mask, loss_type=loss_type, epsilon_low=eps_low,
                                 epsilon_high=eps_high, max_completion_length=max_len,
                                 ref_logprobs_nt=ref, beta=beta)
    assert float(num / den) == pytest.approx(value, rel=1e-5, abs=1e-6), loss_type


def test_micro_batches_add_up_to_the_batch():
  """Numerators and denominators of row halves sum to the whole batch's (accumulation is exact)."""
  logp, old, ref, mask, rewards = _inputs(3)
  adv = np.asarray(grpo.group_advantages(rewards)).reshape(N)
  for loss_type in grpo.LOSS_TYPES:
    kw = dict(loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, max_completion_length=T)
    num, den, _ = grpo.grpo_loss(logp, old, adv, mask, **kw)
    parts = [grpo.grpo_loss(logp[s], old[s], adv[s], mask[s], **kw)
             for s in (slice(0, N // 2), slice(N // 2, N))]
    assert float(num / den) == pytest.approx(
        float(sum(p[0] for p in parts) / sum(p[1] for p in parts)), rel=1e-6)


@pytest.mark.parametrize("kind", grpo.ADVANTAGES)
def test_equal_rewards_give_no_policy_gradient(kind):
  """A group whose completions all scored the same has advantage 0: the gradient of the loss with
  respect to its log-probs is exactly 0, whatever the ratios; other groups' rows get gradient."""
  logp, old, _, mask, rewards = _inputs(4)
  adv = grpo.group_advantages(rewards, kind).reshape(N)
  for loss_type in grpo.LOSS_TYPES:
    def loss(lp):
      num, den, _ = grpo.grpo_loss(lp, old, adv, mask, loss_type=loss_type, epsilon_low=0.2,
                                   epsilon_high=0.28, max_completion_length=T)
      return num / den
    grad = np.asarray(jax.grad(loss)(jnp.asarray(logp)))
    np.testing.assert_array_equal(grad[G:2 * G], 0.0)  # group 1: rewards all 2.0
    assert np.abs(grad[:G]).sum() > 0 and np.abs(grad[2 * G:]).sum() > 0


def test_unknown_kinds_are_named():
  with pytest.raises(ValueError, match="advantage kind='std'"):
    grpo.group_advantages(np.zeros((1, 2)), "std")
  with pytest.raises(ValueError, match="loss_type='bnpo'"):
    grpo.normalized_loss_sum(np.zeros((1, 2)), np.ones((1, 2)), "bnpo", 2)
