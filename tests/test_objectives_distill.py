"""Distillation divergences against a numpy loop and TRL's GKDTrainer.generalized_jsd_loss
(written here in torch as TRL writes it), and the chunked sums against whole logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from research.objectives import distill

RNG = np.random.default_rng(0)
STUDENT = RNG.normal(size=(5, 11)) * 2
TEACHER = RNG.normal(size=(5, 11)) * 2


def _trl_generalized_jsd(student_logits, teacher_logits, beta, temperature):
  """TRL GKDTrainer.generalized_jsd_loss, per token (reduction='none' summed over the vocab)."""
  student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
  teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
  if beta == 0:
    jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
  elif beta == 1:
    jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
  else:
    beta = torch.tensor(beta, dtype=student_log_probs.dtype)
    mixture_log_probs = torch.logsumexp(
        torch.stack([student_log_probs + torch.log(1 - beta), teacher_log_probs + torch.log(beta)]),
        dim=0)
    kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
    jsd = beta * kl_teacher + (1 - beta) * kl_student
  return jsd.sum(-1)


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (1.0, 1.0), (0.5, 1.0), (0.1, 2.0),
                                              (0.9, 0.7)])
def test_generalized_jsd_matches_hand_loop_and_trl(beta, temperature):
  ours = np.asarray(distill.generalized_jsd(jnp.asarray(STUDENT, jnp.float32),
                                            jnp.asarray(TEACHER, jnp.float32), beta, temperature))
  for n in range(5):
    s, t = _softmax(STUDENT[n] / temperature), _softmax(TEACHER[n] / temperature)
    m = beta * t + (1 - beta) * s
    kl = lambda p, q: sum(p[v] * np.log(p[v] / q[v]) for v in range(11))  # noqa: E731
    hand = kl(t, s) if beta == 0 else kl(s, t) if beta == 1 else (
        beta * kl(t, m) + (1 - beta) * kl(s, m))
    np.testing.assert_allclose(ours[n], hand, rtol=1e-5, atol=1e-7)
  trl = _trl_generalized_jsd(torch.tensor(STUDENT), torch.tensor(TEACHER), beta, temperature)
  np.testing.assert_allclose(ours, trl.numpy(), rtol=1e-5, atol=1e-6)
  assert (ours >= -1e-7).all()
  same = distill.generalized_jsd(jnp.asarray(TEACHER), jnp.asarray(TEACHER), beta, temperature)
  np.testing.assert_allclose(same, 0.0, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_chunked_sums_equal_whole_logits_and_their_gradient(beta):
  k = jax.random.split(jax.random.PRNGKey(0), 6)
  hs, ht = jax.random.normal(k[0], (2, 8, 16)), jax.random.normal(k[1], (2, 8, 24))
  ws, wt = jax.random.normal(k[2], (16, 30)) * 0.3, jax.random.normal(k[3], (24, 30)) * 0.3
  targets = jax.random.randint(k[4], (2, 8), 0, 30)
  mask = (jax.random.uniform(k[5], (2, 8)) > 0.3).astype(jnp.float32)

  def loss(h, w, chunk):
    div, nll, count = distill.chunked_distill_sums(h, w, ht, wt, targets, mask, chunk, beta, 1.5)
    return div + 0.3 * nll, (div, nll, count)

  (_, whole), g_whole = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(hs, ws, 0)
  (_, chunked), g_chunk = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(hs, ws, 2)
  np.testing.assert_allclose(chunked, whole, rtol=1e-5)
  per_token = distill.generalized_jsd(hs @ ws, ht @ wt, beta, 1.5)
  np.testing.assert_allclose(whole[0], jnp.sum(per_token * mask), rtol=1e-5)
  assert float(whole[2]) == float(mask.sum())
  for a, b in zip(g_chunk, g_whole):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # A separate NLL mask (on-policy rows: the data's responses only) leaves divergence and count.
  nll_mask = mask.at[0].set(0.0)
  div, nll, count = distill.chunked_distill_sums(hs, ws, ht, wt, targets, mask, 2, beta, 1.5,
                                                 nll_mask_bt=nll_mask)
  np.testing.assert_allclose((div, count), (whole[0], whole[2]), rtol=1e-5)
  logits = jax.nn.log_softmax(hs @ ws)
  per_nll = -jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(nll, jnp.sum(per_nll * nll_mask), rtol=1e-5)
