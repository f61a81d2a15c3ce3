"""The cross-entropy's closed-form backward against autodiff of a plain log-softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.objectives.lm import masked_nll_sum, token_nll


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
