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

from research.models.config import ModelConfig
from research.models.layers import DecoderBlock, RMSNorm, logical, param_init

Params = dict[str, Any]

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
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


class Decoder(nn.Module):
  config: ModelConfig

  def _block(self):
    cfg = self.config
    block = DecoderBlock
    if cfg.remat_policy != "none":
      block = nn.remat(block, policy=_REMAT_POLICIES[cfg.remat_policy],
                       prevent_cse=not cfg.scan_layers)
    return block

  @nn.compact
  def __call__(self, tokens_bt, segment_ids_bt=None, positions_bt=None, *,
               compute_logits: bool = True):
    cfg = self.config
    if segment_ids_bt is None:
      segment_ids_bt = jnp.ones_like(tokens_bt, dtype=jnp.int32)
    if positions_bt is None:
      positions_bt = default_positions(segment_ids_bt)
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype,
                     param_dtype=cfg.weight_dtype, name="embed",
                     embedding_init=logical(param_init(cfg), ("vocab", "embed")))
    x_bte = embed(tokens_bt)
    block = self._block()
    if cfg.scan_layers:
      x_bte, _ = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, name="layers")(x_bte, segment_ids_bt, positions_bt)
    else:
      for i in range(cfg.num_layers):
        x_bte, _ = block(cfg, name=f"layers_{i}")(x_bte, segment_ids_bt, positions_bt)
    hidden_bte = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.weight_dtype,
                         name="final_norm")(x_bte)
    if not compute_logits:
      return None, hidden_bte
    if cfg.tie_embeddings:
      logits_btv = embed.attend(hidden_bte)
    else:
      logits_btv = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                            param_dtype=cfg.weight_dtype, name="lm_head",
                            kernel_init=logical(param_init(cfg), ("embed", "vocab")))(hidden_bte)
    return logits_btv, hidden_bte


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
