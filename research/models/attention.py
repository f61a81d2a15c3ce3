"""Attention behind one switch: `attention(q, k, v, mask_info, impl)` runs the implementation that
`model.attention` names, and `reference_attention` is the plain product every one is tested against.

Every implementation is causal, grouped-query (query head h reads KV head h // (H / K)) and masks
by segment ids: a query sees the keys of its own segment up to its own position; segment 0 is
padding, never seen, and a query on it gets zeros.

A sliding window (`window`, transformers' `sliding_window`) narrows that further by key slot: the
query at slot q sees keys at slots k with q - window < k <= q. Slots, not position ids: inside one
packed segment they differ by a constant, and with a KV cache the query's slot is q_offset + t, as
transformers counts cache positions. Per layer (`sliding`) the window is on or off: a Python bool
picks statically, a traced bool scalar (a scanned layer's flag) selects inside the program.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from research.errors import ConfigError
from research.models import cpu_kernels, fused_attention
from research.models.config import ATTENTION as IMPLEMENTATIONS
from research.models.softcap import soft_cap
# What 'auto' runs per backend: each backend's fused kernel; the plain product where none is known.
AUTO = {"cpu": "cpu_blocked", "gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}
# Where each fused kernel runs (the others run anywhere).
PLATFORMS = {"cudnn": ("gpu", "cuda"), "splash": ("tpu",)}
FUSED = tuple(PLATFORMS)


def resolve(impl: str, platform: str | None = None, dtype: Any = None,
            softcap: float | None = None) -> str:
  """The implementation `impl` names on `platform` (default: jax's default backend) for inputs of
  `dtype` and attention-logit soft cap `softcap`: a choice made in Python when the model is
  traced, never a branch inside the program. `auto` takes the reference where cuDNN would get
  inputs wider than 16 bits, which it refuses, or a soft cap, which it has no option for."""
  if impl != "auto":
    return impl
  name = AUTO.get(platform or jax.default_backend(), "reference")
  if name == "cudnn" and ((dtype is not None and jnp.dtype(dtype).itemsize > 2)
                          or softcap is not None):
    return "reference"
  return name


def uses_cpu_kernels(impl: str, platform: str | None = None) -> bool:
  """Whether the model takes the CPU path (research/models/cpu_kernels.py) for its projections and
  layer streams as well as its attention."""
  return resolve(impl, platform) == "cpu_blocked"


def check_backend(impl: str, dtype: str, platform: str | None = None,
                  softcap: float | None = None) -> None:
  """Stops a run at start when `impl` cannot run here (or cannot soft-cap the attention logits by
  `softcap`); the message names an option that does."""
  platform = platform or jax.default_backend()
  name = resolve(impl, platform, dtype, softcap)
  if name == "cudnn" and softcap is not None:
    raise ConfigError(f"model.attention=cudnn has no attention-logit soft-capping "
                      f"(model.attn_logit_softcap={softcap}); set model.attention=auto or "
                      f"reference")
  if name in PLATFORMS and platform not in PLATFORMS[name]:
    raise ConfigError(f"model.attention={name} runs on {PLATFORMS[name][0]} only, not on "
                      f"{platform}; set model.attention=auto")
  if name == "cudnn" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    raise ConfigError(f"model.attention=cudnn needs model.dtype bfloat16 or float16, got {dtype}; "
                      f"set model.dtype=bfloat16 or model.attention=reference")


class MaskInfo(NamedTuple):
  """What attention masks by, built once per decoder call and read by every layer.

  Segment ids rather than a dense mask: the fused kernels take segment ids. The dense mask is
  built here as well only for the implementations that read one.
  """
  q_segments_bt: jax.Array  # int32 [B, T]
  kv_segments_bs: jax.Array  # int32 [B, S]
  # The KV cache's slot of query 0 (int32 []); None without a cache: queries and keys are then the
  # same T positions.
  q_offset: jax.Array | None = None
  dense_b1ts: jax.Array | None = None  # bool [B, 1, T, S], see `dense_mask`
  # The same with the sliding window (`dense_mask(..., window)`), for the implementations that
  # read a dense mask when some layer slides; None otherwise.
  window_dense_b1ts: jax.Array | None = None


def window_ts(t: int, s: int, window: int, q_offset: jax.Array | int = 0) -> jax.Array:
  """[T, S] bool: key slot k is inside query t's window, (q_offset + t) - k < window."""
  return (q_offset + jnp.arange(t))[:, None] - jnp.arange(s)[None, :] < window


def dense_mask(q_segments_bt: jax.Array, kv_segments_bs: jax.Array | None = None,
               q_offset: jax.Array | int = 0, window: int | None = None) -> jax.Array:
  """[B, 1, T, S] bool: causal, within one segment, never onto padding (segment id 0), and with
  `window` inside the sliding window. Query t sits at key slot `q_offset + t`; without
  `kv_segments_bs` the keys are the queries."""
  if kv_segments_bs is None:
    kv_segments_bs = q_segments_bt
  t, s = q_segments_bt.shape[1], kv_segments_bs.shape[1]
  causal_ts = (q_offset + jnp.arange(t))[:, None] >= jnp.arange(s)[None, :]
  if window is not None:
    causal_ts = causal_ts & window_ts(t, s, window, q_offset)
  same_bts = q_segments_bt[:, :, None] == kv_segments_bs[:, None, :]
  real_bs = (kv_segments_bs != 0)[:, None, :]
  return (causal_ts[None] & same_bts & real_bs)[:, None]


def _select(sliding, windowed, full):
  """`windowed` on a sliding layer, `full` elsewhere: static for a Python bool, else a select."""
  if isinstance(sliding, bool):
    return windowed if sliding else full
  return jnp.where(sliding, windowed, full)


def layer_dense_mask(mask_info: MaskInfo, window: int | None, sliding) -> jax.Array:
  """The dense mask of one layer: windowed where `sliding` (see the module docstring)."""
  if window is None or sliding is False:
    return mask_info.dense_b1ts
  return _select(sliding, mask_info.window_dense_b1ts, mask_info.dense_b1ts)


def _reads_dense(name: str, cached: bool) -> bool:
  return name == "cpu_blocked" or (name == "cudnn" and not cached)


def make_mask_info(impl: str, q_segments_bt: jax.Array, kv_segments_bs: jax.Array | None = None,
                   q_offset: jax.Array | None = None, *, window: int | None = None,
                   full: bool = True) -> MaskInfo:
  """The mask info for `impl`; without a cache (`q_offset` None) the keys are the queries.
  `window`: some layer slides (its dense mask is built too); `full`: some layer does not."""
  kv_segments_bs = q_segments_bt if kv_segments_bs is None else kv_segments_bs
  dense_b1ts = window_dense_b1ts = None
  if _reads_dense(resolve(impl), q_offset is not None):
    offset = 0 if q_offset is None else q_offset
    if full or window is None:
      dense_b1ts = dense_mask(q_segments_bt, kv_segments_bs, offset)
    if window is not None:
      window_dense_b1ts = dense_mask(q_segments_bt, kv_segments_bs, offset, window)
  return MaskInfo(q_segments_bt, kv_segments_bs, q_offset, dense_b1ts, window_dense_b1ts)


def reference_attention(q_bthd, k_bskd, v_bskd, q_segments_bt, kv_segments_bs, *,
                        q_offset: jax.Array | int = 0, scale: float | None = None,
                        softcap: float | None = None, window: int | None = None, sliding=True):
  """softmax(soft_cap(q k^T * scale, softcap), masked) v in plain einsums, the softmax in float32:
  q [B, T, H, D], k and v [B, S, K, D] with K dividing H. Returns [B, T, H, D] in q's dtype.
  `window` and `sliding` as in the module docstring."""
  b, t, h, d = q_bthd.shape
  kv_heads = k_bskd.shape[2]
  scale = d ** -0.5 if scale is None else scale
  q_btkgd = q_bthd.reshape(b, t, kv_heads, h // kv_heads, d)
  scores_bkgts = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k_bskd,
                            preferred_element_type=jnp.float32) * scale
  scores_bkgts = soft_cap(scores_bkgts, softcap)
  mask_b1ts = dense_mask(q_segments_bt, kv_segments_bs, q_offset)
  if window is not None and sliding is not False:
    in_window_ts = window_ts(t, k_bskd.shape[1], window, q_offset)
    mask_b1ts = mask_b1ts & _select(sliding, in_window_ts, True)
  mask_b11ts = mask_b1ts[:, :, None]
  scores_bkgts = jnp.where(mask_b11ts, scores_bkgts, jnp.finfo(jnp.float32).min)
  probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(v_bskd.dtype)
  out_btkgd = jnp.einsum("bkgts,bskd->btkgd", probs_bkgts, v_bskd)
  visible_bt11 = (q_segments_bt != 0)[:, :, None, None]
  return jnp.where(visible_bt11, out_btkgd.reshape(b, t, h, d), 0).astype(q_bthd.dtype)


def attention(q_bthd, k_bskd, v_bskd, mask_info: MaskInfo, impl: str = "auto", *,
              scale: float | None = None, softcap: float | None = None,
              window: int | None = None, sliding=True):
  """Causal grouped-query attention by the implementation `impl` resolves to; q [B, T, H, D],
  k and v [B, S, K, D], returns [B, T, H, D]. Scores are q k^T * `scale` (None: 1 / sqrt(D)),
  then `softcap * tanh(scores / softcap)` when `softcap` is set (Gemma 2), before the mask. With
  `window`, the layer attends through the sliding window where `sliding` (a Python bool, or a
  traced bool scalar); `mask_info` must then come from `make_mask_info(..., window=window)`.

  With a KV cache (`mask_info.q_offset` set: prefill into a cache, or decoding) the queries sit
  at an offset into the keys, which neither fused kernel's causal mask expresses: the CPU kernel
  runs it on CPU, the reference elsewhere. Training and cacheless prefill run the fused kernels.
  """
  name = resolve(impl, dtype=q_bthd.dtype, softcap=softcap)
  scale = q_bthd.shape[-1] ** -0.5 if scale is None else scale
  cached = mask_info.q_offset is not None
  if name == "cpu_blocked":
    # Without a cache the queries and keys are the same T positions under a causal mask.
    blocks = 1 if cached else cpu_kernels.causal_blocks(q_bthd.shape[1])
    return cpu_kernels.attend(q_bthd, k_bskd, v_bskd, layer_dense_mask(mask_info, window, sliding),
                              scale, blocks, softcap)
  if name == "reference" or cached:
    out_bthd = reference_attention(
        q_bthd, k_bskd, v_bskd, mask_info.q_segments_bt, mask_info.kv_segments_bs,
        q_offset=0 if mask_info.q_offset is None else mask_info.q_offset, scale=scale,
        softcap=softcap, window=window, sliding=sliding)
    return checkpoint_name(out_bthd, "attention")
  if name == "cudnn":
    if softcap is not None:
      raise ConfigError(f"model.attention=cudnn has no attention-logit soft-capping "
                        f"(softcap={softcap}); set model.attention=auto or reference")
    return fused_attention.cudnn_attention(q_bthd, k_bskd, v_bskd,
                                           layer_dense_mask(mask_info, window, sliding),
                                           mask_info.q_segments_bt, scale)
  if name == "splash":
    run = lambda w: fused_attention.splash_attention(  # noqa: E731
        q_bthd, k_bskd, v_bskd, mask_info.q_segments_bt, mask_info.kv_segments_bs, scale,
        window=w, softcap=softcap)
    if window is None or sliding is False:
      return run(None)
    if sliding is True:
      return run(window)
    # Two kernels, one per mask; the layer's flag picks which runs.
    return jax.lax.cond(sliding, lambda: run(window), lambda: run(None))
  raise ConfigError(f"model.attention={impl!r}; choose one of {IMPLEMENTATIONS}")
