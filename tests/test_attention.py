"""Attention behind one switch: every implementation equals the reference (forward and gradients,
grouped-query heads, packed rows, left padding), `auto` per platform, and the fused kernels lower
for their accelerators from this CPU-only jax."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.errors import ConfigError
from research.models import attention as attn
from research.models import fused_attention
from research.models.config import ModelConfig
from research.models.decoder import Decoder, init_cache, layer_streams

T = 128  # splash's smallest block
# Row 0: two packed documents, then right padding; row 1: left padding, one document.
SEGMENTS = np.ones((2, T), np.int32)
SEGMENTS[0, 50:] = 2
SEGMENTS[0, 120:] = 0
SEGMENTS[1, :7] = 0
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _qkvw(kv_heads, dtype, heads=4, d=8):
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, w = (jax.random.normal(key, (2, T, heads, d)) for key in keys[:2])
  k, v = (jax.random.normal(key, (2, T, kv_heads, d)) for key in keys[2:])
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), w


def _value_and_grads(fn, q, k, v, w):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
  return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v), jax.jit(fn)(q, k, v)


def test_reference_equals_a_numpy_loop_over_heads_and_queries():
  q, k, v, _ = _qkvw(2, jnp.float32)
  seg = jnp.asarray(SEGMENTS)
  ours = np.asarray(jax.jit(attn.reference_attention)(q, k, v, seg, seg))
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  for b, t, h in [(0, 0, 0), (0, 49, 1), (0, 50, 2), (0, 119, 3), (0, 125, 0), (1, 3, 1),
                  (1, 7, 2), (1, 127, 3)]:
    keys = [s for s in range(t + 1) if SEGMENTS[b, s] == SEGMENTS[b, t] != 0]
    want = np.zeros(8)
    if keys:
      scores = np.array([q[b, t, h] @ k[b, s, h // 2] / np.sqrt(8) for s in keys])
      p = np.exp(scores - scores.max())
      want = (p / p.sum()) @ v[b, keys, h // 2]
    np.testing.assert_allclose(ours[b, t, h], want, atol=1e-5, err_msg=f"row {b} query {t}")


def _cpu_blocked(q, k, v):
  info = attn.make_mask_info("cpu_blocked", jnp.asarray(SEGMENTS))
  return attn.attention(q, k, v, info, "cpu_blocked")


def _splash(q, k, v):
  seg = jnp.asarray(SEGMENTS)
  return fused_attention.splash_attention(q, k, v, seg, seg, q.shape[-1] ** -0.5, interpret=True)


@pytest.mark.parametrize("name,fn,kv_heads,dtype", [
    ("cpu_blocked", _cpu_blocked, 2, jnp.float32), ("cpu_blocked", _cpu_blocked, 1, jnp.bfloat16),
    ("splash", _splash, 2, jnp.float32), ("splash", _splash, 4, jnp.bfloat16)],
    ids=lambda x: getattr(x, "__name__", str(x)))
def test_every_implementation_equals_the_reference(name, fn, kv_heads, dtype):
  """Forward and q/k/v gradients, with grouped-query heads, packed rows and left padding; splash
  through Pallas interpret mode. (cuDNN needs a GPU: see the dispatch and lowering tests.) In
  bfloat16, against the float32 reference of the same inputs, to 2e-2 of the largest value."""
  q, k, v, w = _qkvw(kv_heads, dtype)
  seg = jnp.asarray(SEGMENTS)
  reference = lambda q, k, v: attn.reference_attention(q, k, v, seg, seg)
  (_, ref_grads), ref_out = _value_and_grads(
      reference, *(x.astype(jnp.float32) for x in (q, k, v)), w)
  (_, grads), out = _value_and_grads(fn, q, k, v, w)
  assert out.dtype == dtype and not np.any(np.asarray(out[1, :7], np.float32))
  for x, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
    assert a.shape == b.shape and a.dtype == dtype, x
    b = np.asarray(b)
    tol = TOLERANCE[dtype]
    atol = tol * np.max(np.abs(b)) if dtype == jnp.bfloat16 else tol
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=atol, rtol=tol,
                               err_msg=f"{name} {x}")


def test_auto_resolves_per_platform_and_dispatches_to_that_kernel(monkeypatch):
  assert [attn.resolve("auto", p) for p in ("cpu", "gpu", "cuda", "tpu", "rocm")] == \
      ["cpu_blocked", "cudnn", "cudnn", "splash", "reference"]
  assert attn.resolve("reference", "tpu") == "reference"
  assert attn.resolve("auto") == "cpu_blocked"  # this test machine's backend
  assert attn.uses_cpu_kernels("auto", "cpu") and not attn.uses_cpu_kernels("auto", "gpu")
  seen = []

  def fake_cudnn(q, k, v, mask_b1ts, q_segments_bt, scale):
    seen.append(mask_b1ts)
    return q

  monkeypatch.setattr(fused_attention, "cudnn_attention", fake_cudnn)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  q, k, v, _ = _qkvw(2, jnp.bfloat16)
  seg = jnp.asarray(SEGMENTS)
  attn.attention(q, k, v, attn.make_mask_info("auto", seg), "auto")
  assert len(seen) == 1 and seen[0].shape == (2, 1, T, T)
  np.testing.assert_array_equal(seen[0], attn.dense_mask(seg))
  # A KV cache (queries at an offset into the keys) takes the reference on GPU.
  cached = attn.make_mask_info("auto", seg[:, -1:], seg, jnp.int32(T - 1))
  out = attn.attention(q[:, -1:], k, v, cached, "auto")
  assert len(seen) == 1 and cached.dense_b1ts is None
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(
      attn.reference_attention(q, k, v, seg, seg)[:, -1:], np.float32), atol=1e-6)


def test_cudnn_attention_lowers_to_the_cudnn_kernel_for_cuda(monkeypatch):
  """Forward and backward lower to cuDNN's fused attention calls for "cuda" (its version check
  needs a CUDA install, absent here, so it is stubbed)."""
  from jax._src.cudnn import fused_attention_stablehlo
  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)
  q = jnp.zeros((2, T, 4, 64), jnp.bfloat16)
  k = jnp.zeros((2, T, 2, 64), jnp.bfloat16)
  seg = jnp.asarray(SEGMENTS)
  loss = lambda q, k, v: jnp.sum(fused_attention.cudnn_attention(
      q, k, v, attn.dense_mask(seg), seg, 0.125).astype(jnp.float32))
  text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, k).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "__cudnn$fmhaScaleBiasSoftmax" in text and "__cudnn$fmhaScaleBiasSoftmaxBackward" in text


def test_train_step_with_splash_exports_for_tpu():
  from ml_collections import ConfigDict
  from research.parallel.mesh import make_mesh
  from research.parallel.rules import batch_sharding
  from research.stages.lm import decoder_init, lm_loss_fn
  from research.train.optimizer import make_optimizer
  from research.train.state import abstract_state
  from research.train.step import jit_train_step, make_train_step
  cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=64, attention="splash")
  assert layer_streams(cfg, 8) == 1
  opt = ConfigDict(dict(lr=3e-3, warmup_steps=1, schedule="cosine", min_lr_ratio=0.1, b1=0.9,
                        b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0))
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  tx, schedule = make_optimizer(opt, total_steps=10)
  abstract, shardings = abstract_state(decoder_init(cfg), tx, mesh)
  bs = batch_sharding(mesh)
  step = jit_train_step(make_train_step(lm_loss_fn(cfg), tx, schedule, 1), shardings, bs)
  batch = {k: jax.ShapeDtypeStruct((2, T), np.float32 if k == "loss_mask" else np.int32,
                                   sharding=bs)
           for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
  exported = jax.export.export(step, platforms=["tpu"])(abstract, batch)
  assert exported.platforms == ("tpu",)
  assert "tpu_custom_call" in exported.mlir_module()


def test_options_that_cannot_run_stop_at_start_naming_one_that_does():
  with pytest.raises(ConfigError, match="model.attention='flash'"):
    ModelConfig(attention="flash")
  with pytest.raises(ConfigError, match="runs on tpu only.*model.attention=auto"):
    attn.check_backend("splash", "float32", "cpu")
  with pytest.raises(ConfigError, match="bfloat16.*model.attention=reference"):
    attn.check_backend("cudnn", "float32", "gpu")
  # `auto` on a float32 GPU run takes the reference: cuDNN takes 16-bit inputs only.
  attn.check_backend("auto", "float32", "gpu")
  assert attn.resolve("auto", "gpu", "float32") == "reference"
  assert attn.resolve("auto", "gpu", "bfloat16") == "cudnn"
  attn.check_backend("auto", "bfloat16", "gpu")
  attn.check_backend("auto", "float32", "tpu")
  with pytest.raises(ConfigError, match="multiple of 128.*model.attention=reference"):
    fused_attention.splash_block(100, 100)


def test_layer_streams_follow_the_attention_unless_set():
  cfg = ModelConfig()
  assert layer_streams(cfg, 4) == 2 and layer_streams(cfg, 3) == 1
  assert layer_streams(cfg.replace(attention="reference"), 4) == 1
  assert layer_streams(cfg.replace(attention="reference", layer_streams=2), 4) == 2
  assert layer_streams(cfg.replace(layer_streams=1), 4) == 1


@functools.partial(jax.jit, static_argnums=0)
def _prefill_and_step(cfg, params, tokens, segments):
  """Logits of a cacheless forward, of a prefill into a KV cache, and of one decoding step."""
  model = Decoder(cfg)
  full, _ = model.apply({"params": params}, tokens, segments)
  cache = init_cache(cfg, tokens.shape[0], tokens.shape[1] + 1)
  prefill, _, cache = model.apply({"params": params}, tokens, segments, cache=cache)
  step, _, _ = model.apply({"params": params}, tokens[:, -1:], jnp.ones_like(tokens[:, -1:]),
                           jnp.full_like(tokens[:, -1:], 7), cache=cache, prefill=False)
  return full, prefill, step


def test_the_plain_model_equals_the_cpu_path():
  """'reference' runs the textbook model (no CPU kernels, one stream): the same params and the
  same logits as the CPU path, with packed rows, left padding and a KV cache."""
  cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                    mlp_dim=64)
  params = nn.meta.unbox(Decoder(cfg).init(jax.random.PRNGKey(1),
                                           jnp.zeros((1, 8), jnp.int32))["params"])
  plain = nn.meta.unbox(Decoder(cfg.replace(attention="reference")).init(
      jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))["params"])
  jax.tree.map(np.testing.assert_array_equal, plain, params)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (4, 8), 0, cfg.vocab_size)
  segments = jnp.ones((4, 8), jnp.int32).at[1, 5:].set(2).at[2, :3].set(0)
  cpu = _prefill_and_step(cfg, params, tokens, segments)
  ref = _prefill_and_step(cfg.replace(attention="reference"), params, tokens, segments)
  for name, a, b in zip(("forward", "prefill", "decode"), ref, cpu):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5, err_msg=name)


def test_splash_on_a_mesh_runs_per_device_and_equals_the_reference():
  """Mosaic kernels are not partitioned by XLA: on a (2, 1, 2) mesh the kernel runs on each
  device's rows and KV heads (shard_map), and forward and gradients equal the reference."""
  from research.parallel.activations import activation_sharding
  from research.parallel.mesh import make_mesh
  from research.parallel.rules import DEFAULT_RULES
  mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])
  q, k, v, w = _qkvw(2, jnp.float32)
  seg = jnp.asarray(SEGMENTS)
  (_, ref_grads), ref_out = _value_and_grads(
      lambda q, k, v: attn.reference_attention(q, k, v, seg, seg), q, k, v, w)

  def sharded(q, k, v):
    with activation_sharding(mesh, DEFAULT_RULES):
      return _splash(q, k, v)
  (_, grads), out = _value_and_grads(sharded, q, k, v, w)
  text = jax.jit(sharded).lower(q, k, v).as_text()
  assert "shard_map" in text or "manual" in text
  np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention runs on a GPU only "
                    "(its lowering is tested above on any host)")
def test_cudnn_equals_the_reference_on_a_gpu():
  """On a GPU: cuDNN's forward and gradients in bfloat16 equal the float32 reference of the same
  inputs, with grouped-query heads, packed rows and left padding (scripts/gpu_check.sh runs it)."""
  q, k, v, w = _qkvw(2, jnp.bfloat16, d=64)
  seg = jnp.asarray(SEGMENTS)
  reference = lambda q, k, v: attn.reference_attention(q, k, v, seg, seg)
  (_, ref_grads), ref_out = _value_and_grads(
      reference, *(x.astype(jnp.float32) for x in (q, k, v)), w)

  def cudnn(q, k, v):
    return attn.attention(q, k, v, attn.make_mask_info("cudnn", seg), "cudnn")
  (_, grads), out = _value_and_grads(cudnn, q, k, v, w)
  scale = float(jnp.max(jnp.abs(ref_out)))
  np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=2e-2 * scale)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=2e-2 * float(jnp.max(jnp.abs(r))))
