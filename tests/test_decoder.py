"""Decoder properties: scanned == unrolled, packed rows == documents alone, per-segment positions."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models.config import ModelConfig
from research.models.decoder import (Decoder, default_positions, layer_streams, stack_layers,
                                     unstack_layers)

# One layer stream (on CPU 0 would pick 2), the reference the stream tests compare with.
CFG = ModelConfig(vocab_size=97, hidden_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                  mlp_dim=96, rope_theta=5000.0, layer_streams=1)


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens, segments=None, positions=None):
  """Jitted: eager applies dispatch every op of the model one by one (seconds per call)."""
  return Decoder(cfg).apply({"params": params}, tokens, segments, positions)


def _params(cfg):
  return nn.meta.unbox(Decoder(cfg).init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))["params"])


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_and_unrolled_layers_give_same_logits(remat):
  cfg = CFG.replace(remat_policy=remat)
  params = _params(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, cfg.vocab_size)
  scanned, _ = _forward(cfg, params, tokens)
  unrolled_params = unstack_layers(params, cfg.num_layers)
  unrolled, _ = _forward(cfg.replace(scan_layers=False), unrolled_params, tokens)
  np.testing.assert_allclose(scanned, unrolled, atol=1e-5, rtol=1e-5)
  restacked = stack_layers(unrolled_params, cfg.num_layers)
  jax.tree.map(np.testing.assert_array_equal, restacked, params)


@pytest.mark.parametrize("scan", [True, False])
def test_layer_streams_give_the_same_logits_and_gradients(scan):
  """Rows split into 2 streams (and 4 rows into 3, which falls back to 1): the same logits and
  parameter gradients as one stream, with packed and padded rows; the layers' products really run
  on half the rows."""
  cfg = CFG.replace(remat_policy="dots_attention", scan_layers=scan)
  params = _params(CFG)
  if not scan:
    params = unstack_layers(params, cfg.num_layers)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (4, 12), 0, cfg.vocab_size)
  segments = jnp.ones((4, 12), jnp.int32).at[1, 7:].set(2).at[2, :3].set(0)

  def loss(c, p):
    logits, hidden = Decoder(c).apply({"params": p}, tokens, segments)
    return jnp.sum(logits * jnp.cos(logits)) + jnp.sum(hidden ** 2), logits

  (_, ref_logits), ref_grads = jax.jit(jax.value_and_grad(functools.partial(loss, cfg),
                                                          has_aux=True))(params)
  for streams in (2, 3):
    c = cfg.replace(layer_streams=streams)
    (_, logits), grads = jax.jit(jax.value_and_grad(functools.partial(loss, c),
                                                    has_aux=True))(params)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads,
                 ref_grads)
  assert layer_streams(cfg.replace(layer_streams=3), 4) == 1

  def product_lhs_shapes(c):  # the layers' products see [rows x tokens, features]
    text = jax.jit(functools.partial(loss, c)).lower(params).as_text()
    return set(re.findall(r"stablehlo.dot_general .*: \(tensor<(\d+)x48xf32>", text))
  assert "24" in product_lhs_shapes(cfg.replace(layer_streams=2))  # 2 of 4 rows x 12 tokens
  assert "24" not in product_lhs_shapes(cfg)


def test_packed_row_matches_each_document_alone():
  params = _params(CFG)
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, CFG.vocab_size, n) for n in (5, 7, 4)]
  tokens = np.concatenate(docs + [np.zeros(2, np.int64)])[None].astype(np.int32)
  segments = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)]
                            + [np.zeros(2, np.int64)])[None].astype(np.int32)
  positions = default_positions(jnp.asarray(segments))
  assert positions[0, :5].tolist() == list(range(5)) and positions[0, 5:12].tolist() == list(range(7))
  packed, _ = _forward(CFG, params, tokens, segments, positions)
  start = 0
  for doc in docs:
    alone, _ = _forward(CFG, params, jnp.asarray(doc[None], jnp.int32))
    np.testing.assert_allclose(packed[0, start:start + len(doc)], alone[0], atol=2e-5, rtol=1e-5)
    start += len(doc)


def test_left_padding_does_not_change_real_tokens():
  params = _params(CFG)
  doc = jnp.asarray([[5, 9, 11, 3, 7]], jnp.int32)
  alone, _ = _forward(CFG, params, doc)
  padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), doc], axis=1)
  segments = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1]], jnp.int32)
  out, _ = _forward(CFG, params, padded, segments)
  np.testing.assert_allclose(out[:, 3:], alone, atol=2e-5, rtol=1e-5)


def test_every_param_has_logical_axes_and_param_count_matches():
  boxed = Decoder(CFG.replace(attention_bias=True)).init(jax.random.PRNGKey(0),
                                                        jnp.zeros((1, 4), jnp.int32))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
  names = {n for x in leaves for n in x.names}
  assert {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers"} <= names
  total = sum(x.value.size for x in leaves)
  assert total == CFG.replace(attention_bias=True).num_params()


def test_tied_embeddings_have_no_lm_head_and_head_dim_is_independent():
  cfg = CFG.replace(tie_embeddings=True, head_dim=10)
  params = _params(cfg)
  assert "lm_head" not in params
  assert params["layers"]["attn"]["q"]["kernel"].shape == (3, 48, 4, 10)
  logits, hidden = Decoder(cfg).apply({"params": params}, jnp.ones((1, 4), jnp.int32))
  np.testing.assert_allclose(logits, hidden @ params["embed"]["embedding"].T, atol=1e-5)
