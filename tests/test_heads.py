"""Scalar heads: the score is read at each row's last real token, with left or right padding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.models.config import ModelConfig
from research.models.heads import (SCORE_HEAD, apply_with_head, gather_last, init_with_head,
                                   last_real_index)
from research.models.peft import PeftConfig, split_trainable

CFG = ModelConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=64)


def test_score_at_last_real_token_ignores_padding():
  params = nn.meta.unbox(init_with_head(CFG, PeftConfig(), SCORE_HEAD, jax.random.PRNGKey(0)))
  seq = [3, 4, 5, 6]
  alone, _, _ = apply_with_head(params, CFG, SCORE_HEAD, jnp.asarray([seq]))
  right = jnp.asarray([seq + [0, 0]])
  right_seg = jnp.asarray([[1, 1, 1, 1, 0, 0]])
  left = jnp.asarray([[0, 0] + seq])
  left_seg = jnp.asarray([[0, 0, 1, 1, 1, 1]])
  for tokens, seg in ((right, right_seg), (left, left_seg)):
    values, _, _ = apply_with_head(params, CFG, SCORE_HEAD, tokens, seg)
    score = gather_last(values, last_real_index(seg))
    np.testing.assert_allclose(score, alone[:, -1], atol=1e-5)
  assert last_real_index(right_seg).tolist() == [3] and last_real_index(left_seg).tolist() == [5]


def test_head_trains_under_lora():
  boxed = init_with_head(CFG, PeftConfig(method="lora", targets=("q",)), SCORE_HEAD,
                         jax.random.PRNGKey(0))
  trainable, frozen = split_trainable(nn.meta.unbox(boxed), PeftConfig(method="lora", targets=("q",)))
  assert SCORE_HEAD in trainable and SCORE_HEAD not in frozen
  assert "q_lora" in trainable["layers"]["attn"] and "embed" in frozen
