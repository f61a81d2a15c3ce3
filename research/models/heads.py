"""Scalar heads on the decoder's hidden states: the reward model's score and PPO's value.

A model with a head has params `{**decoder_params, "<head>": {"kernel": [E, 1]}}`: the decoder part
keeps its names (so imports, exports and LoRA treat it as any decoder) and the head sits beside it.
Like transformers' `score` layer it has no bias.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models.config import ModelConfig
from research.models.decoder import Decoder
from research.models.layers import logical
from research.models.peft import NO_PEFT, PeftConfig

SCORE_HEAD = "score"
VALUE_HEAD = "value_head"


class ScalarHead(nn.Module):
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden_bte):
    kernel = nn.Dense(1, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="dense",
                      kernel_init=logical(nn.initializers.normal(0.02), ("embed", None)))
    return kernel(hidden_bte)[..., 0].astype(jnp.float32)


def init_with_head(cfg: ModelConfig, peft: PeftConfig, head: str, rng: jax.Array,
                   seq_len: int = 8) -> dict:
  """Boxed params of decoder + head (`head` is SCORE_HEAD or VALUE_HEAD)."""
  r_dec, r_head = jax.random.split(rng)
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  params = dict(Decoder(cfg, peft).init(r_dec, tokens)["params"])
  hidden = jnp.zeros((1, seq_len, cfg.hidden_size), cfg.compute_dtype)
  params[head] = ScalarHead(cfg.compute_dtype, cfg.weight_dtype).init(r_head, hidden)["params"]
  return params


def split_head(params: dict, head: str) -> tuple[dict, dict]:
  return {k: v for k, v in params.items() if k != head}, params[head]


def apply_with_head(params: dict, cfg: ModelConfig, head: str, tokens_bt, segment_ids_bt=None,
                    positions_bt=None, *, peft: PeftConfig = NO_PEFT, deterministic: bool = True,
                    rngs=None, compute_logits: bool = False):
  """(scalar per token [B, T] float32, logits or None, hidden)."""
  decoder_params, head_params = split_head(params, head)
  logits_btv, hidden_bte = Decoder(cfg, peft, deterministic=deterministic).apply(
      {"params": decoder_params}, tokens_bt, segment_ids_bt, positions_bt,
      compute_logits=compute_logits, rngs=rngs)
  values_bt = ScalarHead(cfg.compute_dtype, cfg.weight_dtype).apply({"params": head_params},
                                                                    hidden_bte)
  return values_bt, logits_btv, hidden_bte


def gather_last(values_bt: jax.Array, last_index_b: jax.Array) -> jax.Array:
  """values[b, last_index[b]]: the score read at each row's last real token."""
  return jnp.take_along_axis(values_bt, last_index_b[:, None].astype(jnp.int32), axis=1)[:, 0]


def last_real_index(segment_ids_bt: jax.Array) -> jax.Array:
  """Index of each row's last non-padding token (right or left padding)."""
  t = segment_ids_bt.shape[1]
  idx_bt = jnp.broadcast_to(jnp.arange(t), segment_ids_bt.shape)
  return jnp.max(jnp.where(segment_ids_bt != 0, idx_bt, -1), axis=1)
