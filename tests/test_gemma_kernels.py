"""Gemma's pieces one at a time: attention-logit soft-capping in every attention implementation,
the final-logit cap in the chunked losses (value and gradient), GeGLU's backward, the offset
RMSNorm, and the backend choice for a soft-capped model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.errors import ConfigError
from research.models import attention as attn
from research.models import fused_attention
from research.models.config import ModelConfig
from research.models.layers import RMSNorm, geglu
from research.models.softcap import soft_cap
from research.objectives import distill, dpo
from research.objectives.lm import chunked_head_nll_sum, masked_nll_sum
from research.stages.lm import lm_loss_fn

T = 128
SEGMENTS = np.ones((2, T), np.int32)  # packed documents, right and left padding
SEGMENTS[0, 50:] = 2
SEGMENTS[0, 120:] = 0
SEGMENTS[1, :7] = 0
CAP, SCALE = 1.5, 0.3  # scores of these inputs reach several times the cap


def _qkvw(kv_heads, dtype, heads=4, d=8):
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, w = (jax.random.normal(key, (2, T, heads, d)) for key in keys[:2])
  k, v = (jax.random.normal(key, (2, T, kv_heads, d)) for key in keys[2:])
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), w


def _value_and_grads(fn, q, k, v, w):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)  # noqa: E731
  return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v), jax.jit(fn)(q, k, v)


def _reference(q, k, v, softcap=CAP):
  seg = jnp.asarray(SEGMENTS)
  return attn.reference_attention(q, k, v, seg, seg, scale=SCALE, softcap=softcap)


def _cpu_blocked(q, k, v):
  info = attn.make_mask_info("cpu_blocked", jnp.asarray(SEGMENTS))
  return attn.attention(q, k, v, info, "cpu_blocked", scale=SCALE, softcap=CAP)


def _splash(q, k, v):
  seg = jnp.asarray(SEGMENTS)
  return fused_attention.splash_attention(q, k, v, seg, seg, SCALE, softcap=CAP, interpret=True)


def test_capped_reference_equals_a_numpy_loop():
  q, k, v, _ = _qkvw(2, jnp.float32)
  ours = np.asarray(jax.jit(_reference)(q, k, v))
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  for b, t, h in [(0, 0, 0), (0, 49, 1), (0, 60, 2), (1, 7, 3), (1, 127, 0)]:
    keys = [s for s in range(t + 1) if SEGMENTS[b, s] == SEGMENTS[b, t] != 0]
    scores = np.array([CAP * np.tanh(q[b, t, h] @ k[b, s, h // 2] * SCALE / CAP) for s in keys])
    p = np.exp(scores - scores.max())
    np.testing.assert_allclose(ours[b, t, h], (p / p.sum()) @ v[b, keys, h // 2], atol=1e-5)
  uncapped = np.asarray(jax.jit(lambda q, k, v: _reference(q, k, v, None))(q, k, v))
  assert np.abs(uncapped - ours).max() > 0.1  # the cap binds on these inputs


@pytest.mark.parametrize("name,fn,kv_heads,dtype", [
    ("cpu_blocked", _cpu_blocked, 2, jnp.float32), ("cpu_blocked", _cpu_blocked, 1, jnp.bfloat16),
    ("splash", _splash, 2, jnp.float32), ("splash", _splash, 4, jnp.bfloat16)])
def test_every_implementation_caps_as_the_reference(name, fn, kv_heads, dtype):
  """Forward and q/k/v gradients with the scale and soft cap; in bfloat16 against the float32
  reference to 2e-2 of the largest value. (cuDNN has no cap: see the backend test.)"""
  q, k, v, w = _qkvw(kv_heads, dtype)
  (_, ref_grads), ref_out = _value_and_grads(_reference, *(x.astype(jnp.float32)
                                                           for x in (q, k, v)), w)
  (_, grads), out = _value_and_grads(fn, q, k, v, w)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for x, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
    b = np.asarray(b)
    atol = tol * (np.max(np.abs(b)) if dtype == jnp.bfloat16 else 1.0)
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=atol, rtol=tol,
                               err_msg=f"{name} {x}")


def test_a_soft_capped_model_never_gets_cudnn():
  assert attn.resolve("auto", "gpu", "bfloat16") == "cudnn"
  assert attn.resolve("auto", "gpu", "bfloat16", softcap=50.0) == "reference"
  assert attn.resolve("auto", "tpu", "bfloat16", softcap=50.0) == "splash"
  attn.check_backend("auto", "bfloat16", "gpu", softcap=50.0)
  with pytest.raises(ConfigError, match="model.attention=cudnn has no attention-logit soft-cap"
                                        ".*model.attention=auto or reference"):
    attn.check_backend("cudnn", "bfloat16", "gpu", softcap=50.0)
  q, k, v, _ = _qkvw(2, jnp.bfloat16)
  info = attn.make_mask_info("reference", jnp.asarray(SEGMENTS))
  with pytest.raises(ConfigError, match="cudnn has no attention-logit soft-cap"):
    attn.attention(q, k, v, info, "cudnn", softcap=50.0)


@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_loss_with_a_final_cap_equals_the_whole_one(groups):
  """Value and both gradients (hidden, kernel): the cap's slope is in the chunked backward."""
  rng = np.random.default_rng(0)
  b, t, e, v, cap = 4, 12, 8, 40, 2.0
  hidden = jnp.asarray(rng.standard_normal((b, t, e)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((e, v)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  mask = jnp.asarray(rng.random((b, t)) < 0.8)

  def whole(h, w):
    return 3.0 * masked_nll_sum(soft_cap(h @ w, cap), targets, mask)[0]

  def chunked(h, w):
    return 3.0 * chunked_head_nll_sum(h, w, targets, mask, 4, groups, softcap=cap)[0]

  want, want_grads = jax.value_and_grad(whole, (0, 1))(hidden, kernel)
  got, grads = jax.jit(jax.value_and_grad(chunked, (0, 1)))(hidden, kernel)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
  uncapped = jax.grad(lambda h, w: 3.0 * masked_nll_sum(h @ w, targets, mask)[0])(hidden, kernel)
  assert np.abs(uncapped - want_grads[0]).max() > 0.1


def test_dpo_and_distill_heads_apply_the_cap():
  rng = np.random.default_rng(1)
  b, t, e, v = 2, 8, 8, 30
  h, ht = (jnp.asarray(rng.standard_normal((b, t, e)), jnp.float32) for _ in range(2))
  w, wt = (jnp.asarray(rng.standard_normal((e, v)), jnp.float32) for _ in range(2))
  targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  mask = jnp.ones((b, t), jnp.float32)
  want = dpo.sequence_logps(soft_cap(h @ w, 2.0), targets, mask)
  for chunk in (0, 2):
    np.testing.assert_allclose(dpo.chunked_sequence_logps(h, w, targets, mask, chunk, 2.0),
                               want, rtol=1e-5)
  whole = distill.chunked_distill_sums(h, w, ht, wt, targets, mask, 0, 0.5, 1.0, 2.0, 3.0)
  # The capped logits as hidden states through identity heads: the sums without any cap.
  direct = distill.chunked_distill_sums(soft_cap(h @ w, 2.0), jnp.eye(v), soft_cap(ht @ wt, 3.0),
                                        jnp.eye(v), targets, mask, 0, 0.5, 1.0)
  chunked = distill.chunked_distill_sums(h, w, ht, wt, targets, mask, 4, 0.5, 1.0, 2.0, 3.0)
  for a, c, d in zip(whole, chunked, direct):
    np.testing.assert_allclose(a, d, rtol=1e-5)
    np.testing.assert_allclose(c, d, rtol=1e-5)


def test_geglu_backward_equals_autodiff():
  rng = np.random.default_rng(2)
  gate, up, g = (jnp.asarray(3 * rng.standard_normal((5, 7)), jnp.float32) for _ in range(3))
  plain = lambda a, b: jnp.sum(nn.gelu(a, approximate=True) * b * g)  # noqa: E731
  ours = lambda a, b: jnp.sum(geglu(a, b) * g)  # noqa: E731
  np.testing.assert_allclose(ours(gate, up), plain(gate, up), rtol=1e-6)
  for a, b in zip(jax.grad(ours, (0, 1))(gate, up), jax.grad(plain, (0, 1))(gate, up)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_offset_norm_starts_at_zero_and_scales_by_one_plus_weight():
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 3, 8)), jnp.float32)
  norm = RMSNorm(eps=1e-6, offset=1.0)
  params = norm.init(jax.random.PRNGKey(0), x)["params"]
  assert not np.any(np.asarray(nn.meta.unbox(params)["scale"]))
  w = jnp.linspace(-0.5, 0.5, 8)
  normed = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(norm.apply({"params": {"scale": w}}, x), normed * (1 + w),
                             rtol=1e-6)


def test_gemma_lm_loss_chunked_equals_whole_and_cpu_path_gradients_equal_reference():
  """The stage's loss over a soft-capped Gemma decoder: chunked head == whole logits, and the
  CPU path's blocked attention (custom backward with the cap) == the reference, in gradient."""
  cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=48, norm_offset=1.0, mlp_activation="gelu_tanh", embed_scale=True,
                    post_norms=True, query_pre_attn_scalar=12.0, attn_logit_softcap=1.0,
                    final_logit_softcap=2.0, tie_embeddings=True, loss_chunk_tokens=16)
  from research.models.decoder import Decoder  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(4)
  params = nn.meta.unbox(Decoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  params = jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape).astype(x.dtype),
                        params["params"])
  b, t = 4, 16
  batch = {"inputs": rng.integers(0, 64, (b, t)), "targets": rng.integers(0, 64, (b, t)),
           "segment_ids": np.ones((b, t)), "positions": np.tile(np.arange(t), (b, 1)),
           "loss_mask": rng.random((b, t)) < 0.9}
  batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}

  def grads(c):
    loss = lambda p: lm_loss_fn(c)(p, {}, batch, None)[0]  # noqa: E731
    return jax.jit(jax.value_and_grad(loss))(params)

  want = grads(cfg.replace(loss_chunk_tokens=0, attention="reference"))
  for c in (cfg.replace(attention="reference"), cfg.replace(attention="cpu_blocked")):
    got = grads(c)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), got[1],
                 want[1])
