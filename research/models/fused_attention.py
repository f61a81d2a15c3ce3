"""The accelerators' fused attention kernels: cuDNN flash attention (GPU) and Pallas splash
attention (TPU), wrapped to the decoder's layouts and masking (see research/models/attention.py).

Both compute causal, grouped-query attention over packed rows (segment ids, 0 = padding) with the
same semantics as `attention.reference_attention`: a query on padding gets zeros.
"""

from __future__ import annotations

import functools

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from research.errors import ConfigError
from research.parallel import activations as act
from research.parallel.rules import logical_to_spec

SPLASH_BLOCKS = (512, 256, 128)  # the kernel wants key blocks a multiple of 128 lanes


def _zero_padding_queries(out_bthd, q_segments_bt):
  return jnp.where((q_segments_bt != 0)[:, :, None, None], out_bthd, 0).astype(out_bthd.dtype)


def cudnn_attention(q_bthd, k_bskd, v_bskd, mask_b1ts, q_segments_bt, scale: float):
  """cuDNN flash attention through `jax.nn.dot_product_attention`, which takes grouped-query heads
  as they are ([B, T, H, D] queries, [B, S, K, D] keys and values).

  Packed rows and padding reach cuDNN as `mask_b1ts` (cuDNN reads it as an additive bias): the
  public API has no segment ids, and its sequence lengths describe right padding only. `is_causal`
  still lets cuDNN skip the blocks above the diagonal.
  """
  out_bthd = jax.nn.dot_product_attention(q_bthd, k_bskd, v_bskd, mask=mask_b1ts, scale=scale,
                                          is_causal=True, implementation="cudnn")
  return checkpoint_name(_zero_padding_queries(out_bthd, q_segments_bt), "attention")


def splash_block(t: int, s: int) -> int:
  """The largest of SPLASH_BLOCKS dividing both lengths."""
  for block in SPLASH_BLOCKS:
    if t % block == 0 and s % block == 0:
      return block
  raise ConfigError(f"model.attention=splash needs a sequence length that is a multiple of "
                    f"{SPLASH_BLOCKS[-1]}, got {t}; set the data's sequence length to one or "
                    f"model.attention=reference")


def _splash_kernel(t: int, s: int, groups: int, block: int, interpret: bool,
                   window: int | None = None, softcap: float | None = None):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  if window is None:
    head_mask = splash.CausalMask((t, s))
  else:  # query i sees keys i - (window - 1) .. i: causal and windowed in one local mask
    head_mask = splash.LocalMask((t, s), window_size=(window - 1, 0), offset=0)
  mask = splash.MultiHeadMask([head_mask] * groups)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  # Residuals named as the CPU kernel's, so remat policy 'dots_attention' keeps them.
  # The kernel caps q k^T as it comes out of the product, which is the scaled score here since
  # the queries are scaled before the kernel.
  return splash.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                residual_checkpoint_name="attention", interpret=interpret,
                                attn_logits_soft_cap=softcap)


def splash_attention(q_bthd, k_bskd, v_bskd, q_segments_bt, kv_segments_bs, scale: float, *,
                     window: int | None = None, softcap: float | None = None,
                     interpret: bool = False):
  """Pallas splash attention: per batch row and KV head, the multi-query kernel over the H / K
  query heads that share that KV head (query head h reads KV head h // (H / K)). With `window`,
  a query sees only the keys less than `window` slots back (splash's local mask).

  Padding (segment 0) queries attend to padding keys, so no query row is fully masked (the kernel
  needs that); their outputs are then zeroed. `interpret` runs the kernel's Pallas program with
  plain XLA operations, on any backend. `softcap`: the scores' tanh cap (None: none).
  """
  sharded = act.active()
  if sharded is None:
    return _splash_local(q_bthd, k_bskd, v_bskd, q_segments_bt, kv_segments_bs, scale,
                         interpret, window, softcap)
  # Mosaic kernels are not partitioned by XLA: each device runs the kernel on its own rows and
  # KV heads (with the query heads that read them); every device holds all of the sequence.
  mesh, rules = sharded
  kv_spec = logical_to_spec(act.KV_HEADS, k_bskd.shape, mesh, rules)
  kv_spec = P(kv_spec[0], None, kv_spec[2], None)
  q_spec = P(kv_spec[0], None, kv_spec[2], None)  # query heads split as their KV heads are
  seg_spec = P(kv_spec[0], None)
  local = functools.partial(_splash_local, scale=scale, interpret=interpret, window=window,
                            softcap=softcap)
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                       out_specs=q_spec, check_vma=False)(
                           q_bthd, k_bskd, v_bskd, q_segments_bt, kv_segments_bs)


def _splash_local(q_bthd, k_bskd, v_bskd, q_segments_bt, kv_segments_bs, scale: float,
                  interpret: bool = False, window: int | None = None,
                  softcap: float | None = None):
  """`splash_attention` on the arrays as given (one device's shard, or unsharded)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  b, t, h, d = q_bthd.shape
  s, kv_heads = k_bskd.shape[1], k_bskd.shape[2]
  groups = h // kv_heads
  kernel = _splash_kernel(t, s, groups, splash_block(t, s), interpret, window, softcap)
  # The kernel does not scale the scores.
  q_bkgtd = (q_bthd * scale).astype(q_bthd.dtype).reshape(b, t, kv_heads, groups, d)
  q_bkgtd = q_bkgtd.transpose(0, 2, 3, 1, 4)
  k_bksd, v_bksd = (jnp.swapaxes(x, 1, 2) for x in (k_bskd, v_bskd))

  def row(q_kgtd, k_ksd, v_ksd, q_segments_t, kv_segments_s):
    segments = splash.SegmentIds(q=q_segments_t, kv=kv_segments_s)
    return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(q_kgtd, k_ksd, v_ksd)

  out_bkgtd = jax.vmap(row)(q_bkgtd, k_bksd, v_bksd, q_segments_bt, kv_segments_bs)
  out_bthd = out_bkgtd.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
  return checkpoint_name(_zero_padding_queries(out_bthd, q_segments_bt), "attention")
