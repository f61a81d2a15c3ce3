"""Gemma through the tools: the PEFT LoRA export in transformers + peft, GGUF files as
transformers loads them, a reward head (train step, sequence-classifier export), and published
configs (shapes shrunk, tests/data/hf_configs) against transformers."""

from __future__ import annotations

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from gguf_files import tokenizer_tokens, write_gemma_gguf
from research.interop.gguf_import import load_gguf_checkpoint
from research.interop.hf_config import model_config_from_hf
from research.interop.hf_export import export_hf
from research.interop.hf_import import load_hf_checkpoint
from research.interop.peft_export import export_peft
from research.models.decoder import Decoder
from research.models.heads import SCORE_HEAD, apply_with_head, gather_last, init_with_head
from research.models.peft import LORA_TARGETS, PeftConfig, merge_lora, strip_peft

transformers = pytest.importorskip("transformers")
peft_lib = pytest.importorskip("peft")

CONFIGS = pathlib.Path(__file__).parent / "data" / "hf_configs"
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=128, initializer_range=0.2)
LORA = PeftConfig(method="lora", r=4, alpha=8.0, targets=LORA_TARGETS)


def _randomize_norms_(model, seed: int = 1):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(0.3 * torch.randn(p.shape, generator=gen))
  return model


def _tiny_hf(config_class: str, **fields):
  config = getattr(transformers, config_class)(**{**TINY, **fields})
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  torch.manual_seed(0)
  return _randomize_norms_(transformers.AutoModelForCausalLM.from_config(config,
                                                                          dtype=torch.float32))


def _hf_logits(model, tokens) -> np.ndarray:
  model.eval()
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _our_logits(cfg, params, tokens, peft=PeftConfig()) -> np.ndarray:
  fn = jax.jit(lambda p, t: Decoder(cfg, peft).apply({"params": p}, t)[0])
  return np.asarray(fn(params, jnp.asarray(tokens)))


def _tokens(vocab: int, length: int = 12, rows: int = 2, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(3, vocab, (rows, length)).astype(np.int32)


def _overlay(tree: dict, base: dict) -> dict:
  """`tree` with every leaf that `base` has replaced by base's."""
  return {k: (_overlay(v, base[k]) if isinstance(v, dict) else base[k]) if k in base else v
          for k, v in tree.items()}


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp("gemma2") / "hf"
  _tiny_hf("Gemma2Config", vocab_size=96, num_hidden_layers=2, query_pre_attn_scalar=24,
           attn_logit_softcapping=2.0, final_logit_softcapping=3.0, sliding_window=64
           ).save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp("gemma3") / "hf"
  _tiny_hf("Gemma3TextConfig", vocab_size=96, num_hidden_layers=2, query_pre_attn_scalar=24,
           sliding_window=6, layer_types=["sliding_attention", "full_attention"],
           rope_local_base_freq=100.0).save_pretrained(path)
  return path


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_peft_adapter_loads_in_peft_on_the_exported_base(arch, request, tmp_path):
  """LoRA on every projection of a Gemma 2 / Gemma 3 decoder: the adapter exported with its base
  gives our logits in transformers + peft, and so does our merged model."""
  cfg, base = load_hf_checkpoint(request.getfixturevalue(
      "gemma2_dir" if arch == "gemma2" else "gemma3_dir"))
  shapes = jax.eval_shape(lambda: nn.meta.unbox(Decoder(cfg, LORA).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]))
  rng = np.random.default_rng(0)
  lora = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  params = _overlay(lora, base)  # the imported base, random LoRA A and B
  tokens = _tokens(cfg.vocab_size)
  ours = _our_logits(cfg, params, tokens, LORA)
  merged = _our_logits(cfg, jax.jit(lambda p: merge_lora(p, LORA))(params), tokens)
  np.testing.assert_allclose(merged, ours, atol=1e-4, rtol=0)
  adapter, base_dir = export_peft(params, cfg, LORA, tmp_path / "adapter")
  assert json.loads((base_dir / "config.json").read_text())["model_type"] == arch
  base_model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
  assert type(base_model).__name__ == {"gemma2": "Gemma2ForCausalLM",
                                       "gemma3_text": "Gemma3ForCausalLM"}[arch]
  without = _hf_logits(base_model, tokens)
  with_adapter = _hf_logits(peft_lib.PeftModel.from_pretrained(base_model, str(adapter)), tokens)
  np.testing.assert_allclose(with_adapter, ours, atol=1e-4, rtol=0)
  np.testing.assert_allclose(without, _our_logits(cfg, strip_peft(params), tokens), atol=1e-4,
                             rtol=0)
  assert np.abs(without - ours).max() > 1e-2  # the adapter is loaded and matters


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_gguf_loads_as_transformers_loads_it(arch, tmp_path):
  """llama.cpp's layout (norms stored as 1 + w, ffn_norm the pre-MLP norm, Gemma 3's q/k norms,
  tied output): our import equals transformers' `from_pretrained(gguf_file=...)` of the same
  file, which takes query_pre_attn_scalar, the soft caps, the layer pattern and Gemma 3's local
  rope base from the config class's defaults; the window (8) is shorter than the tokens."""
  vocab = len(tokenizer_tokens())
  config_class, layers = {"gemma2": ("Gemma2Config", 2), "gemma3": ("Gemma3TextConfig", 6)}[arch]
  model = _tiny_hf(config_class, vocab_size=vocab, num_hidden_layers=layers, sliding_window=8,
                   rope_theta=1e5)
  state = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
  hf_config = model.config.to_dict()
  hf_config["rope_theta"] = 1e5
  path = write_gemma_gguf(tmp_path / "tiny.gguf", arch, hf_config, state)
  cfg, params = load_gguf_checkpoint(path)
  theirs_model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), gguf_file=path.name, dtype=torch.float32)
  want = theirs_model.config
  assert (cfg.hf_architecture, cfg.query_pre_attn_scalar, cfg.attn_logit_softcap,
          cfg.final_logit_softcap, cfg.sliding_window, cfg.layer_types, cfg.tie_embeddings,
          cfg.qk_norm) == (
              want.model_type, want.query_pre_attn_scalar, want.attn_logit_softcapping,
              want.final_logit_softcapping, want.sliding_window, tuple(want.layer_types), True,
              arch == "gemma3")
  tokens = _tokens(vocab)
  np.testing.assert_allclose(_our_logits(cfg, params, tokens), _hf_logits(theirs_model, tokens),
                             atol=1e-4, rtol=0)
  # The norms come back as HF's w (1 + w - 1 in float32, as transformers computes it).
  np.testing.assert_array_equal(
      np.asarray(params["final_norm"]["scale"]),
      theirs_model.state_dict()["model.norm.weight"].numpy())


def test_reward_head_on_gemma_scores_trains_and_exports_as_a_classifier(gemma2_dir, tmp_path):
  cfg, base = load_hf_checkpoint(gemma2_dir)
  params = nn.meta.unbox(init_with_head(cfg, PeftConfig(), SCORE_HEAD, jax.random.PRNGKey(0)))
  params = {**params, **base}
  tokens = jnp.asarray(_tokens(cfg.vocab_size, rows=4))
  segments = jnp.ones_like(tokens).at[1, :3].set(0)
  last = jnp.full((4,), tokens.shape[1] - 1)

  def loss_fn(p):  # chosen rows 0, 2 against rejected rows 1, 3 (Bradley-Terry)
    values, _, _ = apply_with_head(p, cfg, SCORE_HEAD, tokens, segments)
    scores = gather_last(values, last)
    return -jnp.mean(jax.nn.log_sigmoid(scores[::2] - scores[1::2])), scores

  opt = optax.adam(1e-3)
  state = opt.init(params)

  @jax.jit
  def step(p, s):
    (loss, scores), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss, scores

  losses = []
  for _ in range(3):
    params, state, loss, scores = step(params, state)
    assert np.all(np.isfinite(scores))
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  cfg = cfg.replace(pad_token_id=0)
  out = export_hf(params, cfg, tmp_path / "rm")
  classifier = transformers.AutoModelForSequenceClassification.from_pretrained(
      out, dtype=torch.float32)
  assert type(classifier).__name__ == "Gemma2ForSequenceClassification"
  row = np.asarray(tokens[:1])
  with torch.no_grad():
    theirs = classifier(input_ids=torch.as_tensor(row, dtype=torch.long)).logits.numpy()[0, 0]
  ours, _, _ = apply_with_head(params, cfg, SCORE_HEAD, jnp.asarray(row))
  np.testing.assert_allclose(float(ours[0, -1]), theirs, atol=1e-4)


@pytest.mark.parametrize("name", ["gemma-2-2b", "gemma-3-1b"])
def test_published_configs_import_and_give_transformers_logits(name, tmp_path):
  """The config.json as published (shapes shrunk): it imports, and random weights saved by
  transformers give its logits here on a short sequence."""
  d = json.loads((CONFIGS / f"{name}.json").read_text())
  cfg = model_config_from_hf(d)
  assert cfg.hf_architecture == d["model_type"] and cfg.norm_offset == 1.0
  config = transformers.AutoConfig.for_model(**d)
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  config.initializer_range = 0.2
  torch.manual_seed(0)
  model = _randomize_norms_(transformers.AutoModelForCausalLM.from_config(config,
                                                                          dtype=torch.float32))
  model.save_pretrained(tmp_path / "hf")
  loaded, params = load_hf_checkpoint(tmp_path / "hf")
  assert loaded == cfg
  tokens = _tokens(cfg.vocab_size, length=16)
  np.testing.assert_allclose(_our_logits(cfg, params, tokens), _hf_logits(model, tokens),
                             atol=1e-4, rtol=0)
