"""The cross-entropy's closed-form backward, and the chunked LM-head loss, against a plain
log-softmax and autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.objectives.lm import chunked_head_nll_sum, masked_nll_sum, token_nll


def _reference_nll_sum(logits, targets, mask):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * mask)


def test_token_nll_value_and_gradient_match_autodiff_of_log_softmax():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  logits = 4.0 * jax.random.normal(k1, (3, 6, 17))
  targets = jax.random.randint(k2, (3, 6), 0, 17)
  mask = (jax.random.uniform(k3, (3, 6)) > 0.3).astype(jnp.float32)
  ours = lambda x: masked_nll_sum(x, targets, mask)[0]
  ref = lambda x: _reference_nll_sum(x, targets, mask)
  np.testing.assert_allclose(ours(logits), ref(logits), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(ref)(logits), atol=1e-6)
  # Second use through a different cotangent: per-token weights, as PPO's log-probs get.
  w = jax.random.normal(k3, (3, 6))
  np.testing.assert_allclose(
      jax.grad(lambda x: jnp.sum(token_nll(x, targets) * w))(logits),
      jax.grad(lambda x: jnp.sum(-jnp.take_along_axis(jax.nn.log_softmax(x), targets[..., None],
                                                      -1)[..., 0] * w))(logits), atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_token_nll_gradient_keeps_the_logits_dtype(dtype):
  logits = jnp.zeros((2, 3, 5), dtype)
  grad = jax.grad(lambda x: jnp.sum(token_nll(x, jnp.zeros((2, 3), jnp.int32))))(logits)
  assert grad.dtype == dtype
  # Uniform logits: softmax 1/5 everywhere, minus one at the target.
  np.testing.assert_allclose(np.asarray(grad[0, 0], np.float32), [-0.8, 0.2, 0.2, 0.2, 0.2],
                             atol=1e-2)


def _numpy_head_nll_sum(hidden, kernel, targets, mask):
  logits = np.einsum("bte,ev->btv", hidden.astype(np.float64), kernel.astype(np.float64))
  logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  target_logit = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return np.sum((logz - target_logit) * mask)


@pytest.mark.parametrize("chunk_len,groups", [(1, 1), (3, 1), (12, 1), (4, 2), (6, 4)])
def test_chunked_head_loss_matches_the_whole_logits(chunk_len, groups):
  """Any chunking and grouping gives the sum a numpy log-softmax gives, and the gradients of
  autodiff through the whole [B, T, V] logits (hidden and kernel), under an arbitrary cotangent."""
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(1), 4)
  hidden = jax.random.normal(k1, (4, 12, 8))
  kernel = 0.5 * jax.random.normal(k2, (8, 29))
  targets = jax.random.randint(k3, (4, 12), 0, 29)
  mask = (jax.random.uniform(k4, (4, 12)) > 0.25).astype(jnp.int32)
  total, count = chunked_head_nll_sum(hidden, kernel, targets, mask, chunk_len, groups)
  np.testing.assert_allclose(total, _numpy_head_nll_sum(*map(np.asarray, (hidden, kernel, targets,
                                                                           mask))), rtol=1e-5)
  assert count == int(mask.sum())

  def chunked(h, w):
    return 3.0 * chunked_head_nll_sum(h, w, targets, mask, chunk_len, groups)[0]

  def whole(h, w):
    return 3.0 * masked_nll_sum(h @ w, targets, mask)[0]

  for ours, ref in zip(jax.grad(chunked, argnums=(0, 1))(hidden, kernel),
                       jax.grad(whole, argnums=(0, 1))(hidden, kernel)):
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_chunked_head_loss_rejects_a_chunk_that_does_not_divide_the_length():
  with pytest.raises(ValueError, match="chunk_len=5 must divide the length 12"):
    chunked_head_nll_sum(jnp.zeros((2, 12, 4)), jnp.zeros((4, 7)), jnp.zeros((2, 12), jnp.int32),
                         jnp.ones((2, 12)), 5)
