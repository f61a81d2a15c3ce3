"""KV-cache decoding: incremental logits equal the full forward; greedy, stops, padding, filters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models.config import ModelConfig
from research.models.decoder import Decoder, init_cache
from research.models.peft import PeftConfig
from research.sampling import SamplingConfig, filter_logits, generate, left_pad

CFG = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=64)


def _params(cfg=CFG, peft=PeftConfig()):
  return nn.meta.unbox(Decoder(cfg, peft).init(jax.random.PRNGKey(3),
                                               jnp.zeros((1, 4), jnp.int32))["params"])


@pytest.mark.parametrize("scan", [True, False])
def test_incremental_decoding_matches_full_forward(scan):
  cfg = CFG.replace(scan_layers=scan)
  params = _params(cfg)
  tokens = jnp.asarray([[0, 0, 7, 8, 9, 10, 11, 12], [1, 2, 3, 4, 5, 6, 7, 8]], jnp.int32)
  segments = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8], jnp.int32)
  apply = jax.jit(lambda p, *a, **kw: Decoder(cfg).apply({"params": p}, *a, **kw))
  full, _ = apply(params, tokens, segments)
  cache = init_cache(cfg, 2, 8)
  prefill, _, cache = apply(params, tokens[:, :5], segments[:, :5], cache=cache)
  real = np.asarray(segments[:, :5]) == 1  # padding's outputs are never read
  np.testing.assert_allclose(np.asarray(prefill)[real], np.asarray(full)[:, :5][real], atol=1e-5)
  positions = np.asarray([[3, 4, 5], [5, 6, 7]])
  for t in range(5, 8):
    step, _, cache = apply(params, tokens[:, t:t + 1], segments[:, t:t + 1],
                           positions[:, t - 5:t - 4], cache=cache)
    np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5, err_msg=f"t={t}")


@jax.jit
def _full_logits(params, tokens_bt, segments_bt):
  return Decoder(CFG).apply({"params": params}, tokens_bt, segments_bt)[0]


def _greedy_reference(params, prompt, n, width=16):
  """Full forward passes, no cache: the sequence is right-padded to one width (one compile); a
  causal model's logits at the last real token do not see the padding after it."""
  seq = list(prompt)
  for _ in range(n):
    pad = width - len(seq)
    logits = _full_logits(params, jnp.asarray([seq + [0] * pad], jnp.int32),
                          jnp.asarray([[1] * len(seq) + [0] * pad], jnp.int32))
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_greedy_matches_full_recompute_with_left_padding():
  params = _params()
  prompts = [[5, 6, 7, 8, 9], [3], [11, 12]]
  out = generate(params, CFG, prompts, SamplingConfig(max_new_tokens=6), pad_id=0)
  for p, o in zip(prompts, out):
    assert o == _greedy_reference(params, p, 6)


def test_rows_stop_on_their_own_stop_token():
  params = _params()
  prompts = [[5, 6, 7], [3, 4]]
  free = generate(params, CFG, prompts, SamplingConfig(max_new_tokens=6), pad_id=0)
  stop = free[0][2]  # row 0 stops at its 3rd token; row 1 only if it emits the same token
  out = generate(params, CFG, prompts, SamplingConfig(max_new_tokens=6, stop_tokens=(stop,)),
                 pad_id=0)
  assert out[0] == free[0][:3]
  cut = free[1].index(stop) + 1 if stop in free[1] else 6
  assert out[1] == free[1][:cut]


def test_sampling_is_seeded_and_respects_top_k():
  params = _params()
  s = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=1)
  greedy = generate(params, CFG, [[1, 2, 3]], SamplingConfig(max_new_tokens=8), pad_id=0)
  assert generate(params, CFG, [[1, 2, 3]], s, pad_id=0, rng=jax.random.PRNGKey(7)) == greedy
  s = SamplingConfig(max_new_tokens=8, temperature=1.5, top_p=0.9)
  a = generate(params, CFG, [[1, 2, 3]], s, pad_id=0, rng=jax.random.PRNGKey(1))
  b = generate(params, CFG, [[1, 2, 3]], s, pad_id=0, rng=jax.random.PRNGKey(1))
  assert a == b


def test_filter_logits_matches_numpy():
  logits = np.log(np.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]], np.float32))
  top_p = np.asarray(filter_logits(jnp.asarray(logits), 1.0, 0, 0.7))
  assert np.isfinite(top_p[0, :2]).all() and np.isneginf(top_p[0, 2:]).all()  # 0.5+0.2 reaches 0.7
  top_k = np.asarray(filter_logits(jnp.asarray(logits), 2.0, 3, 1.0))
  np.testing.assert_allclose(top_k[0, :3], logits[0, :3] / 2.0, rtol=1e-6)
  assert np.isneginf(top_k[0, 3:]).all()


def test_prompt_tuning_decoding_matches_full_forward():
  peft = PeftConfig(method="prompt", num_virtual_tokens=3)
  params = _params(peft=peft)
  prompt = [4, 5, 6]
  out = generate(params, CFG, [prompt], SamplingConfig(max_new_tokens=4), pad_id=0, peft=peft)
  apply = jax.jit(lambda p, t, s: Decoder(CFG, peft).apply({"params": p}, t, s)[0])
  seq = list(prompt)
  for _ in range(4):  # right-padded to one width, as in _greedy_reference
    pad = 8 - len(seq)
    logits = apply(params, jnp.asarray([seq + [0] * pad], jnp.int32),
                   jnp.asarray([[1] * len(seq) + [0] * pad], jnp.int32))
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  assert out[0] == seq[3:]


def test_left_pad_layout():
  tokens, segments = left_pad([[1, 2], [3]], pad_id=9)
  assert tokens.tolist() == [[1, 2], [9, 3]] and segments.tolist() == [[1, 1], [0, 1]]


def test_long_generations_report_progress_and_decode_the_same(capfd):
  """`progress_every` prints from inside the compiled loop and changes no token."""
  params = _params()
  prompts = [[5, 6, 7], [3, 4]]
  plain = generate(params, CFG, prompts, SamplingConfig(max_new_tokens=9), pad_id=0)
  capfd.readouterr()
  shown = generate(params, CFG, prompts, SamplingConfig(max_new_tokens=9, progress_every=4),
                   pad_id=0)
  assert shown == plain
  err = capfd.readouterr().err
  assert "decoded 4/9 tokens" in err and "decoded 8/9 tokens" in err
