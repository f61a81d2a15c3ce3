"""Sliding-window attention: every implementation with a window (packed rows, left padding, a KV
cache offset, a per-layer flag) equals the reference, and the reference equals transformers' mask
(q - window < k <= q on slots); the decoder slides exactly the layers the config marks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models import attention as attn
from research.models import fused_attention
from research.models.config import ModelConfig
from research.models.decoder import Decoder, default_positions, init_cache, unstack_layers

T = 128  # splash's smallest block
W = 20
SEGMENTS = np.ones((2, T), np.int32)
SEGMENTS[0, 50:] = 2
SEGMENTS[0, 120:] = 0
SEGMENTS[1, :7] = 0


def _qkvw(kv_heads=2, heads=4, d=8, t=T):
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, w = (jax.random.normal(key, (2, t, heads, d)) for key in keys[:2])
  k, v = (jax.random.normal(key, (2, t, kv_heads, d)) for key in keys[2:])
  return q, k, v, w


def _value_and_grads(fn, q, k, v, w):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
  return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v), jax.jit(fn)(q, k, v)


def test_windowed_reference_equals_a_numpy_loop():
  q, k, v, _ = _qkvw()
  seg = jnp.asarray(SEGMENTS)
  ours = np.asarray(jax.jit(lambda q, k, v: attn.reference_attention(
      q, k, v, seg, seg, window=W))(q, k, v))
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  for b, t, h in [(0, 0, 0), (0, 30, 1), (0, 60, 2), (0, 75, 3), (0, 119, 0), (1, 10, 1),
                  (1, 40, 2), (1, 127, 3)]:
    keys = [s for s in range(max(0, t - W + 1), t + 1) if SEGMENTS[b, s] == SEGMENTS[b, t] != 0]
    scores = np.array([q[b, t, h] @ k[b, s, h // 2] / np.sqrt(8) for s in keys])
    p = np.exp(scores - scores.max())
    np.testing.assert_allclose(ours[b, t, h], (p / p.sum()) @ v[b, keys, h // 2], atol=1e-5)


def _reference(window, sliding=True):
  seg = jnp.asarray(SEGMENTS)
  return lambda q, k, v: attn.reference_attention(q, k, v, seg, seg, window=window,
                                                  sliding=sliding)


def _through_switch(impl, sliding):
  """`attention(impl)` with the window on a layer whose flag is `sliding` (a Python bool, or a
  traced scalar as under nn.scan)."""
  seg = jnp.asarray(SEGMENTS)

  def fn(q, k, v):
    info = attn.make_mask_info(impl, seg, window=W)
    flag = sliding if isinstance(sliding, bool) else jnp.asarray(sliding)
    return attn.attention(q, k, v, info, impl, window=W, sliding=flag)
  return fn


def _splash(window, flag=True):
  seg = jnp.asarray(SEGMENTS)

  def fn(q, k, v):
    def run(w):
      return fused_attention.splash_attention(q, k, v, seg, seg, q.shape[-1] ** -0.5, window=w,
                                              interpret=True)
    if isinstance(flag, bool):
      return run(window if flag else None)
    return jax.lax.cond(jnp.asarray(flag), lambda: run(window), lambda: run(None))
  return fn


@pytest.mark.parametrize("name,fn,want", [
    ("cpu_blocked", _through_switch("cpu_blocked", True), _reference(W)),
    ("cpu_blocked traced on", _through_switch("cpu_blocked", np.bool_(True)), _reference(W)),
    ("cpu_blocked traced off", _through_switch("cpu_blocked", np.bool_(False)), _reference(None)),
    ("reference traced on", _through_switch("reference", np.bool_(True)), _reference(W)),
    ("reference static off", _through_switch("reference", False), _reference(None)),
    ("splash", _splash(W), _reference(W)),
    ("splash traced on", _splash(W, np.bool_(True)), _reference(W)),
    ("splash traced off", _splash(W, np.bool_(False)), _reference(None)),
], ids=lambda x: x if isinstance(x, str) else "")
def test_every_implementation_with_a_window_equals_the_reference(name, fn, want):
  q, k, v, w = _qkvw()
  (_, ref_grads), ref_out = _value_and_grads(want, q, k, v, w)
  (_, grads), out = _value_and_grads(fn, q, k, v, w)
  for x, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5,
                               err_msg=f"{name} {x}")


def test_the_window_differs_from_full_attention():
  q, k, v, _ = _qkvw()
  assert not np.allclose(_reference(W)(q, k, v), _reference(None)(q, k, v), atol=1e-3)


def test_the_traced_flag_selects_inside_one_program():
  q, k, v, _ = _qkvw()
  seg = jnp.asarray(SEGMENTS)
  info = attn.make_mask_info("cpu_blocked", seg, window=W)
  run = jax.jit(lambda flag: attn.attention(q, k, v, info, "cpu_blocked", window=W, sliding=flag))
  np.testing.assert_allclose(run(True), _reference(W)(q, k, v), atol=1e-5)
  np.testing.assert_allclose(run(False), _reference(None)(q, k, v), atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "cpu_blocked"])
def test_a_cache_offset_windows_on_slots(impl):
  """Decoding: the last 3 queries at slot offset T - 3 over all T cached keys."""
  q, k, v, _ = _qkvw()
  seg = jnp.asarray(SEGMENTS)
  info = attn.make_mask_info(impl, seg[:, -3:], seg, jnp.int32(T - 3), window=W, full=False)
  out = attn.attention(q[:, -3:], k, v, info, impl, window=W, sliding=True)
  np.testing.assert_allclose(out, _reference(W)(q, k, v)[:, -3:], atol=1e-5)


def test_cudnn_gets_the_windowed_mask_and_lowers_for_cuda(monkeypatch):
  from jax._src.cudnn import fused_attention_stablehlo
  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)
  seen = []
  real = fused_attention.cudnn_attention

  def spy(q, k, v, mask_b1ts, q_segments_bt, scale):
    seen.append(mask_b1ts)
    return real(q, k, v, mask_b1ts, q_segments_bt, scale)
  monkeypatch.setattr(fused_attention, "cudnn_attention", spy)
  q = jnp.zeros((2, T, 4, 64), jnp.bfloat16)
  k = jnp.zeros((2, T, 2, 64), jnp.bfloat16)
  seg = jnp.asarray(SEGMENTS)
  info = attn.make_mask_info("cudnn", seg, window=W, full=False)
  np.testing.assert_array_equal(info.window_dense_b1ts, attn.dense_mask(seg, window=W))
  loss = lambda q, k, v: jnp.sum(attn.attention(q, k, v, info, "cudnn", window=W).astype(
      jnp.float32))
  text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, k).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "__cudnn$fmhaScaleBiasSoftmax" in text and "__cudnn$fmhaScaleBiasSoftmaxBackward" in text
  np.testing.assert_array_equal(seen[0], attn.dense_mask(seg, window=W))


def _decoder_logits(cfg, params, tokens, segments):
  return Decoder(cfg).apply({"params": params}, tokens, segments)[0]


@pytest.mark.parametrize("layer_types", [None, ("sliding_attention", "full_attention",
                                                "sliding_attention")])
def test_the_decoder_slides_the_marked_layers_scanned_unrolled_and_streamed(layer_types):
  """Per-layer windows: the scanned model (flags scanned in), the unrolled one (static flags),
  the CPU path with two layer streams and the reference all give the same logits, which differ
  from full attention."""
  cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                    mlp_dim=64, sliding_window=5, layer_types=layer_types, attention="reference")
  params = nn.meta.unbox(Decoder(cfg).init(jax.random.PRNGKey(1),
                                           jnp.zeros((1, 8), jnp.int32))["params"])
  tokens = jax.random.randint(jax.random.PRNGKey(2), (4, 24), 0, cfg.vocab_size)
  segments = jnp.ones((4, 24), jnp.int32).at[1, 15:].set(2).at[2, :3].set(0)
  want = _decoder_logits(cfg, params, tokens, segments)
  for variant in (dict(attention="cpu_blocked", layer_streams=2),
                  dict(attention="cpu_blocked", layer_streams=1)):
    got = _decoder_logits(cfg.replace(**variant), params, tokens, segments)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=str(variant))
  unrolled = cfg.replace(scan_layers=False)
  got = _decoder_logits(unrolled, unstack_layers(params, 3), tokens, segments)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  full = _decoder_logits(cfg.replace(sliding_window=None, layer_types=None), params, tokens,
                         segments)
  assert not np.allclose(full, want, atol=1e-4)
  # A cache: prefill then one decoding step per token equals the cacheless forward.
  model = Decoder(cfg)
  cache = init_cache(cfg, 4, 24)
  pre, _, cache = model.apply({"params": params}, tokens[:, :10], segments[:, :10], cache=cache)
  np.testing.assert_allclose(pre, want[:, :10], atol=2e-5, rtol=1e-5)
  positions = default_positions(segments)
  for t in range(10, 24):
    step, _, cache = model.apply({"params": params}, tokens[:, t:t + 1], segments[:, t:t + 1],
                                 positions[:, t:t + 1], cache=cache, prefill=False)
    np.testing.assert_allclose(step[:, 0], want[:, t], atol=2e-5, rtol=1e-5, err_msg=str(t))


def test_alike_layers_trace_no_per_layer_selection():
  """Every layer sliding: one static windowed mask, no flag scanned in, no full mask built."""
  cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=64, sliding_window=5, attention="cpu_blocked", layer_streams=1)
  params = nn.meta.unbox(Decoder(cfg).init(jax.random.PRNGKey(1),
                                           jnp.zeros((1, 8), jnp.int32))["params"])
  tokens = jnp.zeros((2, 16), jnp.int32)
  text = str(jax.make_jaxpr(lambda p: Decoder(cfg).apply({"params": p}, tokens))(params))
  mixed = cfg.replace(layer_types=("sliding_attention", "full_attention"))
  text_mixed = str(jax.make_jaxpr(lambda p: Decoder(mixed).apply({"params": p}, tokens))(params))
  assert "select_n" in text_mixed and text_mixed.count("select_n") > text.count("select_n")


def _init(cfg):
  return nn.meta.unbox(Decoder(cfg).init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))
                       ["params"])


def test_sliding_layers_rotate_by_the_local_rope_base():
  """`rope_local_theta`: every layer sliding equals rope_theta set to that base; mixed layers give
  the same logits scanned (flag scanned in) and unrolled (static flags), and differ from one base."""
  cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=64, sliding_window=6, rope_local_theta=100.0, attention="reference")
  params = _init(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 20), 0, cfg.vocab_size)
  logits = lambda c, p=params: np.asarray(Decoder(c).apply({"params": p}, tokens)[0])
  np.testing.assert_allclose(logits(cfg), logits(cfg.replace(rope_theta=100.0,
                                                             rope_local_theta=None)), atol=1e-5)
  mixed = cfg.replace(layer_types=("sliding_attention", "full_attention"))
  want = logits(mixed)
  np.testing.assert_allclose(logits(mixed.replace(scan_layers=False), unstack_layers(params, 2)),
                             want, atol=1e-5)
  assert not np.allclose(want, logits(mixed.replace(rope_local_theta=None)), atol=1e-4)


def test_mixed_windows_with_splash_export_for_tpu():
  """Mixed layers under splash: the scanned flag picks one of two kernels (lax.cond), forward and
  backward, and the program lowers to TPU kernels."""
  cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=64, attention="splash", sliding_window=32,
                    layer_types=("sliding_attention", "full_attention"))
  params = jax.eval_shape(lambda: _init(cfg.replace(attention="reference")))

  def loss(p, tokens):
    return jnp.mean(Decoder(cfg).apply({"params": p}, tokens)[0])
  exported = jax.export.export(jax.jit(jax.grad(loss)), platforms=["tpu"])(
      params, jax.ShapeDtypeStruct((2, T), jnp.int32))
  text = exported.mlir_module()
  assert "tpu_custom_call" in text and ("stablehlo.case" in text or "stablehlo.if" in text)
