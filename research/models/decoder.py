"""The decoder every stage uses: embed -> (scanned) blocks -> final norm -> LM head.

`Decoder.apply({'params': params}, tokens, segment_ids, positions)` returns `(logits, hidden)`;
value and score heads read `hidden`. Params are stacked over a leading `layers` axis when
`scan_layers` is on; `stack_layers` / `unstack_layers` move between the two layouts.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.models import cpu_kernels
from research.models.attention import make_mask_info, uses_cpu_kernels
from research.models.config import ModelConfig
from research.models.layers import DecoderBlock, RMSNorm, logical, param_init
from research.models.rope import rotary_tables
from research.models.peft import NO_PEFT, PeftConfig
from research.models.softcap import soft_cap
from research.parallel import activations as act

Params = dict[str, Any]

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The weight matmuls' outputs, plus what attention's backward reads: the rotated q and k and
    # attention's output with its row max and sum (names set in cpu_kernels.py; the fused kernels
    # name theirs alike). Only norms and SwiGLU are recomputed; attention's forward is not run
    # twice.
    "dots_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("attention", "rotary")),
}


def default_positions(segment_ids_bt: jax.Array) -> jax.Array:
  """Per-segment positions: each run of equal nonzero segment ids counts from 0.

  Works for packed rows (segments follow each other) and for left padding (segment 0 first).
  """
  t = segment_ids_bt.shape[1]
  idx_bt = jnp.broadcast_to(jnp.arange(t), segment_ids_bt.shape)
  starts_bt = jnp.concatenate(
      [jnp.ones_like(segment_ids_bt[:, :1], dtype=bool),
       segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=1)
  start_idx_bt = jax.lax.cummax(jnp.where(starts_bt, idx_bt, 0), axis=1)
  return (idx_bt - start_idx_bt).astype(jnp.int32)


def layer_streams(cfg: ModelConfig, rows: int) -> int:
  """How many row slices the layers run on: `cfg.layer_streams` (0: 2 on the CPU path, 1
  elsewhere) when every batch shard's rows divide by it, else 1."""
  requested = cfg.layer_streams or (2 if uses_cpu_kernels(cfg.attention) else 1)
  return cpu_kernels.stream_count(requested, rows)


class Decoder(nn.Module):
  """The decoder, optionally with a PEFT method composed on (`peft`) and dropout on (`deterministic`).

  With `cache` (see `init_cache`) it runs incrementally: the tokens given fill the cache's next
  slots and attend to everything before them; it then returns `(logits, hidden, new_cache)`.
  """
  config: ModelConfig
  peft: PeftConfig = NO_PEFT
  deterministic: bool = True

  @nn.compact
  def __call__(self, tokens_bt, segment_ids_bt=None, positions_bt=None, *,
               compute_logits: bool = True, cache: dict | None = None, prefill: bool = True):
    cfg, peft = self.config, self.peft
    if segment_ids_bt is None:
      segment_ids_bt = jnp.ones_like(tokens_bt, dtype=jnp.int32)
    if positions_bt is None:
      positions_bt = default_positions(segment_ids_bt)
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype,
                     param_dtype=cfg.weight_dtype, name="embed",
                     embedding_init=logical(param_init(cfg), ("vocab", "embed")))
    # The lookup reads a table whose `embed` axis is whole: gathering rows from an FSDP-sharded
    # table gives embed-sharded rows, which XLA cannot reshard to the batch sharding efficiently.
    table_ve = act.constrain(embed.embedding, act.EMBED_TABLE).astype(cfg.compute_dtype)
    x_bte = jnp.take(table_ve, tokens_bt, axis=0)
    if cfg.embed_scale:
      x_bte = x_bte * embed_multiplier(cfg)
    x_bte = act.constrain(x_bte, act.RESIDUAL)
    n_virtual = peft.num_virtual_tokens if peft.method == "prompt" and prefill else 0
    if n_virtual:
      x_bte, segment_ids_bt, positions_bt = self._prepend_soft_prompt(
          x_bte, segment_ids_bt, positions_bt, n_virtual)
    if cache is None:
      x_bte = self._layers(x_bte, segment_ids_bt, positions_bt)
    else:
      x_bte, new_cache = self._cached_layers(x_bte, segment_ids_bt, positions_bt, cache)
    hidden_bte = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.weight_dtype,
                         offset=cfg.norm_offset, name="final_norm")(x_bte)
    if n_virtual:
      hidden_bte = hidden_bte[:, n_virtual:]
    hidden_bte = act.constrain(hidden_bte, act.RESIDUAL)
    logits_btv = self._logits(embed, hidden_bte) if compute_logits else None
    if cache is None:
      return logits_btv, hidden_bte
    return logits_btv, hidden_bte, new_cache

  def _rotary(self, positions_bt):
    # Built once per call and read by every layer (made inside each layer, XLA fuses the
    # trigonometry into the layer's q/k transposes and recomputes it per head, per layer and again
    # under remat); with a local rope base, both tables, and each layer picks its own
    # (layers.layer_rope). The local layers take plain RoPE.
    cfg = self.config
    scaling = None if cfg.rope_scaling is None else dict(cfg.rope_scaling)
    full = rotary_tables(positions_bt, cfg.resolved_head_dim, cfg.rope_theta, scaling,
                         cfg.max_position_embeddings)
    if cfg.rope_local_theta is None:
      return full
    return full, rotary_tables(positions_bt, cfg.resolved_head_dim, cfg.rope_local_theta)

  def _mask_info(self, q_segments_bt, kv_segments_bs=None, q_offset=None):
    """One mask info for every layer: the windowed dense mask only if some layer slides, the full
    one only if some layer does not."""
    cfg = self.config
    sliding = cfg.sliding_layers()
    return make_mask_info(cfg.attention, q_segments_bt, kv_segments_bs, q_offset,
                          window=cfg.sliding_window if any(sliding) else None,
                          full=not all(sliding))

  def _layers(self, x_bte, segment_ids_bt, positions_bt):
    """Training and cacheless forward: each token attends to the tokens before it in its segment.
    The CPU path runs the layers on row slices (`layer_streams`)."""
    cfg = self.config
    mask_info = self._mask_info(segment_ids_bt)
    rope = self._rotary(positions_bt)
    streams = layer_streams(cfg, x_bte.shape[0])
    if streams == 1:
      return self._stack(DecoderBlock, x_bte, mask_info, rope)[0]
    slices = (cpu_kernels.split_rows(a, streams) for a in (x_bte, mask_info, rope))
    xs_bte, _ = self._stack(cpu_kernels.streamed(DecoderBlock), *slices)
    return cpu_kernels.merge_rows(xs_bte)

  def _cached_layers(self, x_bte, segment_ids_bt, positions_bt, cache: dict):
    """Prefill (the prompt) or a decoding step (one token) with a KV cache: the tokens fill the
    cache's next slots and attend to every slot before them. Returns (x, the new cache)."""
    cfg = self.config
    index = cache["index"]
    kv_segments_bs = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids_bt,
                                                  (0, index))
    mask_info = self._mask_info(segment_ids_bt, kv_segments_bs, index)
    rope = self._rotary(positions_bt)
    x_bte, new_kv = self._stack(DecoderBlock, x_bte, mask_info, rope, (cache["k"], cache["v"]))
    return x_bte, {"k": new_kv[0], "v": new_kv[1], "segment_ids": kv_segments_bs,
                   "index": index + x_bte.shape[1]}

  def _stack(self, block, x_bte, mask_info, rope, layers_kv=None):
    """`block` once per layer, scanned or unrolled, under the remat policy. Returns (x, the
    layers' new KV caches stacked, or None)."""
    cfg, peft = self.config, self.peft
    if cfg.remat_policy != "none":
      block = nn.remat(block, policy=_REMAT_POLICIES[cfg.remat_policy],
                       prevent_cse=not cfg.scan_layers)
    sliding = cfg.sliding_layers()
    if cfg.scan_layers:
      # Layers that differ get their sliding flag as a scanned input; alike, none is traced.
      flags_l = None if len(set(sliding)) == 1 else jnp.asarray(sliding)
      return nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast, nn.broadcast, 0, 0), length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, peft, self.deterministic, name="layers")(x_bte, mask_info, rope, layers_kv, flags_l)
    new_kv = []
    for i in range(cfg.num_layers):
      layer_kv = None if layers_kv is None else (layers_kv[0][i], layers_kv[1][i])
      x_bte, kv = block(cfg, peft, self.deterministic, sliding[i], name=f"layers_{i}")(
          x_bte, mask_info, rope, layer_kv)
      new_kv.append(kv)
    if layers_kv is None:
      return x_bte, None
    return x_bte, jax.tree.map(lambda *xs: jnp.stack(xs), *new_kv)

  def _logits(self, embed: nn.Embed, hidden_bte):
    cfg = self.config
    cpu = uses_cpu_kernels(cfg.attention)
    head = embed.attend if cfg.tie_embeddings else nn.Dense(
        cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
        name="lm_head", dot_general=cpu_kernels.xt_dot_general if cpu else jax.lax.dot_general,
        kernel_init=logical(param_init(cfg), ("embed", "vocab")))
    # On the CPU path a flat [tokens, E] input: the head's weight gradient then needs no
    # transposed copy of the [tokens, V] logits gradient (see cpu_kernels.apply_flat).
    logits_btv = cpu_kernels.apply_flat(head, hidden_bte) if cpu else head(hidden_bte)
    return act.constrain(soft_cap(logits_btv, cfg.final_logit_softcap), act.LOGITS)

  def _prepend_soft_prompt(self, x_bte, segment_ids_bt, positions_bt, n_virtual: int):
    """Prompt tuning: n learned embeddings before each row, in the row's (single) segment."""
    cfg = self.config
    soft_ne = self.param("soft_prompt", logical(param_init(cfg), ("virtual_tokens", "embed")),
                         (n_virtual, cfg.hidden_size), cfg.weight_dtype)
    b = x_bte.shape[0]
    soft_bne = jnp.broadcast_to(soft_ne.astype(x_bte.dtype), (b, *soft_ne.shape))
    row_segment_b1 = jnp.max(segment_ids_bt, axis=1, keepdims=True)
    segments = jnp.concatenate([jnp.broadcast_to(row_segment_b1, (b, n_virtual)),
                                segment_ids_bt], axis=1)
    positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(n_virtual), (b, n_virtual)),
                                 positions_bt + n_virtual], axis=1)
    return jnp.concatenate([soft_bne, x_bte], axis=1), segments, positions


def embed_multiplier(cfg: ModelConfig) -> jax.Array:
  """sqrt(hidden_size) in the compute dtype, as transformers' Gemma casts its float32 scale to
  the weights' dtype (in bfloat16, sqrt(2304) = 48 exactly but sqrt(3072) rounds to 55.5)."""
  return jnp.asarray(np.float32(cfg.hidden_size ** 0.5)).astype(cfg.compute_dtype)


def lm_head_kernel(params: Params, cfg: ModelConfig) -> jax.Array:
  """The LM head's [embed, vocab] kernel in the compute dtype (the embedding table's transpose when
  tied): `logits = soft_cap(hidden @ lm_head_kernel(params, cfg), cfg.final_logit_softcap)` is
  what `Decoder` computes; every loss that runs the head itself applies that cap."""
  if cfg.tie_embeddings:
    return params["embed"]["embedding"].astype(cfg.compute_dtype).T
  return params["lm_head"]["kernel"].astype(cfg.compute_dtype)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
  """An empty KV cache of `max_len` slots: k, v [layers, batch, slots, kv_heads, head_dim]."""
  dtype = dtype or cfg.compute_dtype
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.resolved_head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
          "index": jnp.zeros((), jnp.int32)}


def stack_layers(params: Params, num_layers: int) -> Params:
  """Unrolled params (`layers_0..N-1`) -> scanned params (`layers`, leading axis N)."""
  per_layer = [params[f"layers_{i}"] for i in range(num_layers)]
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
  return out


def unstack_layers(params: Params, num_layers: int) -> Params:
  """Scanned params -> unrolled params."""
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  return out


def to_scanned(params: Params, config: ModelConfig) -> Params:
  """The canonical (scanned) layout, whatever layout `config` trains with."""
  return params if config.scan_layers else stack_layers(params, config.num_layers)


def from_scanned(params: Params, config: ModelConfig) -> Params:
  return params if config.scan_layers else unstack_layers(params, config.num_layers)
