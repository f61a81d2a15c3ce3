"""The CPU path's kernels against plain jax: the blocked attention's custom backward, its causal
blocks, and the x^T weight-gradient product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models.attention import dense_mask
from research.models.cpu_kernels import MASK_VALUE, attend, causal_blocks, xt_dot_general


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_backward_matches_autodiff_of_plain_softmax_attention(kv_heads):
  """`attend` recomputes the probabilities in its backward; its gradients equal autodiff of the
  plain product, with packed segments, padding queries (no visible key: zeros) and padding keys.
  With causal query blocks (the upper triangle skipped) it is the same function. With fewer KV
  heads than query heads (grouped-query attention, multiplied as grouped rows) it equals the plain
  product over KV heads repeated per query head, as Hugging Face's `repeat_kv`."""
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, w = (jax.random.normal(key, (2, 8, 4, 3)) for key in keys[:2])
  k, v = (jax.random.normal(key, (2, 8, kv_heads, 3)) for key in keys[2:])
  mask = dense_mask(jnp.array([[1, 1, 1, 2, 2, 2, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]]))

  def plain(q, k, v):
    k, v = (jnp.repeat(x, 4 // kv_heads, axis=2) for x in (k, v))
    scores = jnp.where(mask, jnp.einsum("bthd,bshd->bhts", q * 0.5, k), MASK_VALUE)
    out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)
    return out * jnp.any(mask, axis=-1)[:, 0, :, None, None]

  ref_out = plain(q, k, v)
  assert not np.any(np.asarray(ref_out[0, 6:])) and not np.any(np.asarray(ref_out[1, :2]))
  ref = jax.grad(lambda *a: jnp.sum(plain(*a) * w), (0, 1, 2))(q, k, v)
  for blocks in (1, 2, 4):
    np.testing.assert_allclose(attend(q, k, v, mask, 0.5, blocks), ref_out, atol=1e-6,
                               err_msg=f"blocks={blocks}")
    ours = jax.grad(lambda *a: jnp.sum(attend(*a, mask, 0.5, blocks) * w), (0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", ours, ref):
      assert a.shape == b.shape
      np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"d{name}, blocks={blocks}")


def test_causal_blocks_are_at_least_64_queries_and_at_most_8():
  assert [causal_blocks(t) for t in (7, 64, 127, 128, 256, 512, 2048, 4096, 320)] == \
      [1, 1, 1, 2, 4, 8, 8, 8, 5]


def test_xt_dot_general_gradients_equal_the_plain_product():
  """The LM head's and q/k/v's product computes its weight gradient from a row-major x^T; both
  gradients equal autodiff of the plain dot, and any other dot shape falls through to
  lax.dot_general."""
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(3), 3)
  x, w, g = jax.random.normal(kx, (12, 5)), jax.random.normal(kw, (5, 9)), jax.random.normal(kg, (12, 9))
  dims = (((1,), (0,)), ((), ()))
  ours = jax.grad(lambda x, w: jnp.sum(xt_dot_general(x, w, dims) * g), (0, 1))(x, w)
  ref = jax.grad(lambda x, w: jnp.sum(jnp.dot(x, w) * g), (0, 1))(x, w)
  for name, a, b in zip(("dx", "dw"), ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
  x3 = x.reshape(3, 4, 5)
  np.testing.assert_allclose(xt_dot_general(x3, w, (((2,), (0,)), ((), ()))), x3 @ w,
                             rtol=1e-5, atol=1e-5)
  # A [in, heads, head_dim] kernel (the q/k/v projections) is multiplied flattened.
  w3, g3 = w[:, :8].reshape(5, 2, 4), g[:, :8].reshape(12, 2, 4)
  ours = jax.grad(lambda x, w: jnp.sum(xt_dot_general(x, w, dims) * g3), (0, 1))(x, w3)
  ref = jax.grad(lambda x, w: jnp.sum(jnp.einsum("nd,dhk->nhk", x, w) * g3), (0, 1))(x, w3)
  for name, a, b in zip(("dx", "dw"), ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"3-D kernel {name}")
