"""Language-model pieces shared by pretraining and SFT: the model's initialiser and its LM loss."""

from __future__ import annotations

from typing import Any

import jax

from research.models.config import ModelConfig
from research.models.decoder import Decoder
from research.objectives.lm import masked_nll_sum


def merge_params(trainable: Any, frozen: Any) -> Any:
  """Union of two nested dicts (a leaf lives in exactly one of them)."""
  if not frozen:
    return trainable
  if not trainable:
    return frozen
  out = dict(frozen)
  for k, v in trainable.items():
    out[k] = merge_params(v, frozen[k]) if k in frozen and isinstance(v, dict) else v
  return out


def decoder_init(cfg: ModelConfig, seq_len: int = 8):
  """BoxedInit for full training: every decoder param trains, nothing is frozen."""
  model = Decoder(cfg)

  def init(rng: jax.Array):
    tokens_bt = jax.numpy.zeros((1, seq_len), jax.numpy.int32)
    return model.init(rng, tokens_bt)["params"], {}

  return init


def lm_loss_fn(cfg: ModelConfig):
  """(params, frozen, batch, rng) -> (sum of masked token NLL, token count, aux)."""
  model = Decoder(cfg)

  def loss_fn(params, frozen, batch, rng):
    del rng
    logits_btv, _ = model.apply({"params": merge_params(params, frozen)}, batch["inputs"],
                                batch["segment_ids"], batch["positions"])
    num, den = masked_nll_sum(logits_btv, batch["targets"], batch["loss_mask"])
    return num, den, {}

  return loss_fn
