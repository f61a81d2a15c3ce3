"""The frozen decoder's features of preference rows, and the score head a linear probe fits on
them: the baseline of scripts/probe_reward.py and the reward stage's `head_init="probe"` (linear
probing, then fine-tuning: the fine-tuning starts from a head that already ranks, not a random one).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from research import linear_probe
from research.models.config import ModelConfig
from research.models.decoder import Decoder

POOLINGS = ("last", "mean")


def pooled_features(params: Any, cfg: ModelConfig, rows: dict[str, np.ndarray],
                    batch_size: int = 8, poolings: Sequence[str] = POOLINGS,
                    log: Callable[[str], None] | None = print) -> dict[str, np.ndarray]:
  """{pooling: [N, K, E] float32} final hidden states of the frozen decoder (`params`, no PEFT)
  over the rows of research.data.preferences.tokenize_preferences: "last" at `last_index_bk`,
  where the score head reads; "mean" over `response_mask_bkt`, the response and its EOS."""
  @jax.jit
  def hidden(params, tokens, segments, positions):
    _, hidden_bte = Decoder(cfg).apply({"params": params}, tokens, segments, positions,
                                       compute_logits=False)
    return hidden_bte.astype(jnp.float32)

  n, k, _ = rows["tokens_bkt"].shape
  keys = ["tokens_bkt", "segment_ids_bkt", "positions_bkt", "last_index_bk"]
  keys += ["response_mask_bkt"] if "mean" in poolings else []
  flat = {key: rows[key].reshape(n * k, *rows[key].shape[2:]) for key in keys}
  out = {p: np.zeros((n * k, cfg.hidden_size), np.float32) for p in poolings}
  start = time.time()
  for i in range(0, n * k, batch_size):
    m = min(batch_size, n * k - i)
    pad = lambda x: np.concatenate(  # noqa: E731  (one compiled shape: pad the last batch)
        [x[i:i + m], np.zeros((batch_size - m, *x.shape[1:]), x.dtype)])
    h_bte = np.asarray(hidden(params, pad(flat["tokens_bkt"]), pad(flat["segment_ids_bkt"]),
                              pad(flat["positions_bkt"])))[:m]
    if "last" in poolings:
      out["last"][i:i + m] = h_bte[np.arange(m), flat["last_index_bk"][i:i + m]]
    if "mean" in poolings:
      mask_bt = flat["response_mask_bkt"][i:i + m]
      out["mean"][i:i + m] = (h_bte * mask_bt[..., None]).sum(1) / np.maximum(
          mask_bt.sum(1, keepdims=True), 1.0)
    if log and (i // batch_size) % 25 == 0:
      log(f"features: {i + m}/{n * k} responses, {time.time() - start:.0f} s")
  return {p: x.reshape(n, k, -1) for p, x in out.items()}


def probe_head(params: Any, cfg: ModelConfig, rows: dict[str, np.ndarray], batch_size: int,
               seed: int, log: Callable[[str], None] | None = print) -> dict[str, Any]:
  """Score-head params `{"dense": {"kernel": [E, 1]}}` (float32) fit by the linear probe on the
  frozen decoder's features where the head reads, over every pair of `rows` (L2 by 5-fold CV)."""
  features = pooled_features(params, cfg, rows, batch_size, ("last",), log)["last"]
  w, l2 = linear_probe.fit_head(features, rows["valid_bk"], seed=seed)
  if log:
    log(f"head_init=probe: fit on {len(features)} records' pairs, L2 {l2:g}")
  return {"dense": {"kernel": jnp.asarray(w[:, None], jnp.float32)}}
