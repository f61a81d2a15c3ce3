"""Greedy decoding in one compiled loop (each step re-runs the causal forward over a fixed buffer)."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from research.models.config import ModelConfig
from research.models.decoder import Decoder


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, P], segment_ids [B, P]) with prompts right-aligned; segment 0 marks padding."""
  width = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  segments = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, width - len(p):] = p
    segments[i, width - len(p):] = 1
  return tokens, segments


def greedy_generate(params: Any, cfg: ModelConfig, prompts: Sequence[Sequence[int]],
                    max_new_tokens: int, pad_id: int, eos_id: int | None = None) -> list[list[int]]:
  """Greedy continuations of left-padded prompts; each row stops at its own EOS."""
  tokens_bp, segments_bp = left_pad(prompts, pad_id)
  out = _greedy(params, cfg, jnp.asarray(tokens_bp), jnp.asarray(segments_bp), max_new_tokens,
                -1 if eos_id is None else eos_id)
  results = []
  for row in np.asarray(out):
    row = row.tolist()
    if eos_id is not None and eos_id in row:
      row = row[:row.index(eos_id) + 1]
    results.append(row)
  return results


@functools.partial(jax.jit, static_argnums=(1, 4, 5))
def _greedy(params, cfg: ModelConfig, tokens_bp, segments_bp, max_new_tokens: int, eos_id):
  model = Decoder(cfg)
  b, p = tokens_bp.shape
  total = p + max_new_tokens
  tokens_bt = jnp.concatenate([tokens_bp, jnp.zeros((b, max_new_tokens), jnp.int32)], axis=1)
  # Generated slots belong to the prompt's segment; future slots are invisible through causality.
  segments_bt = jnp.concatenate([segments_bp, jnp.ones((b, max_new_tokens), jnp.int32)], axis=1)

  def body(i, carry):
    tokens_bt, done_b = carry
    logits_btv, _ = model.apply({"params": params}, tokens_bt, segments_bt)
    cur = p + i
    next_b = jnp.argmax(logits_btv[:, cur - 1].astype(jnp.float32), axis=-1).astype(jnp.int32)
    next_b = jnp.where(done_b, eos_id if eos_id >= 0 else 0, next_b)
    tokens_bt = jax.lax.dynamic_update_slice(tokens_bt, next_b[:, None], (0, cur))
    return tokens_bt, done_b | (next_b == eos_id)

  tokens_bt, _ = jax.lax.fori_loop(0, max_new_tokens, body, (tokens_bt, jnp.zeros((b,), bool)))
  return tokens_bt[:, p:total]
