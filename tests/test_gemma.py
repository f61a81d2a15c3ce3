"""Gemma 2 and Gemma 3 (text) against transformers: logits (scanned and unrolled, every attention
this host runs), greedy generation, and the export/import round trip, bit for bit."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from research.errors import ConfigError
from research.interop.hf_config import hf_config_from_model_config, model_config_from_hf
from research.interop.hf_export import export_hf
from research.interop.hf_import import load_hf_checkpoint, read_safetensors_dir
from research.models.decoder import Decoder, from_scanned
from research.sampling import greedy_generate

transformers = pytest.importorskip("transformers")

VOCAB, T = 128, 24
WINDOW = 8  # shorter than T and than prompt + generation: the sliding layers see a window
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
              initializer_range=0.2, pad_token_id=0, eos_token_id=1, bos_token_id=2)
# Scale from query_pre_attn_scalar 24 (not head_dim), caps that bind on these weights' scores
# and logits (checked in test_the_caps_bind), untied and tied heads.
CASES = {
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=4, query_pre_attn_scalar=24,
                                     attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                     sliding_window=WINDOW)),
    "gemma2_untied": ("Gemma2Config", dict(num_hidden_layers=2, query_pre_attn_scalar=16,
                                           attn_logit_softcapping=None,
                                           final_logit_softcapping=None, sliding_window=WINDOW,
                                           tie_word_embeddings=False)),
    # Gemma 3: q/k norms, layers 0-1 and 3-4 sliding with their own rope base, 2 and 5 full
    # with linear rope scaling (as Gemma-3-4B and larger), no attention cap.
    "gemma3": ("Gemma3TextConfig", dict(
        num_hidden_layers=6, query_pre_attn_scalar=24, final_logit_softcapping=3.0,
        sliding_window=WINDOW, layer_types=["sliding_attention"] * 2 + ["full_attention"] +
        ["sliding_attention"] * 2 + ["full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 1_000_000.0}})),
}
CAUSAL_LM = {"Gemma2Config": "Gemma2ForCausalLM", "Gemma3TextConfig": "Gemma3ForCausalLM"}


def hf_model(case: str, **overrides):
  """A random tiny transformers model of `case`; norm weights random around Gemma's zero."""
  config_class, fields = CASES[case]
  config = getattr(transformers, config_class)(**{**COMMON, **fields, **overrides})
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  torch.manual_seed(sorted(CASES).index(case))
  model = getattr(transformers, CAUSAL_LM[config_class])(config).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(0.3 * torch.randn(p.shape, generator=gen))
  return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
  root = tmp_path_factory.mktemp("gemma")
  out = {}
  for case in CASES:
    hf_model(case).save_pretrained(root / case, safe_serialization=True)
    out[case] = root / case
  return out


def _tokens(seed: int = 0, rows: int = 2, length: int = T) -> np.ndarray:
  return np.random.default_rng(seed).integers(3, VOCAB, (rows, length)).astype(np.int32)


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(tokens).long()).logits.numpy()


def our_logits(cfg, params, tokens: np.ndarray) -> np.ndarray:
  fn = jax.jit(lambda p, t: Decoder(cfg).apply({"params": p}, t)[0])
  return np.asarray(fn(from_scanned(params, cfg), jnp.asarray(tokens)))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("attention", ["reference", "cpu_blocked"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_logits_equal_transformers(case, attention, scan, hf_dirs):
  cfg, params = load_hf_checkpoint(hf_dirs[case])
  assert cfg.hf_architecture == {"Gemma2Config": "gemma2", "Gemma3TextConfig": "gemma3_text"}[
      CASES[case][0]]
  cfg = cfg.replace(attention=attention, scan_layers=scan)
  tokens = _tokens()
  theirs = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[case]), tokens)
  np.testing.assert_allclose(our_logits(cfg, params, tokens), theirs, atol=1e-4, rtol=0)


def test_the_caps_bind(hf_dirs):
  """Each soft cap changes these logits (else the tests above could not see a missing one)."""
  cfg, params = load_hf_checkpoint(hf_dirs["gemma2"])
  tokens = _tokens()
  capped = our_logits(cfg, params, tokens)
  for field in ("attn_logit_softcap", "final_logit_softcap"):
    assert np.abs(our_logits(cfg.replace(**{field: None}), params, tokens) - capped).max() > 0.1


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_equals_transformers(case, hf_dirs):
  """Left-padded prompts of different lengths, decoded with the KV cache; transformers pads a
  row after its EOS, ours stops it there."""
  cfg, params = load_hf_checkpoint(hf_dirs[case])
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[case])
  rng = np.random.default_rng(3)
  prompts = [rng.integers(3, VOCAB, n).tolist() for n in (5, 9, 2)]
  new = 12
  ours = greedy_generate(params, cfg, prompts, new, pad_id=0, eos_id=cfg.eos_token_id)
  width = max(map(len, prompts))
  ids = torch.zeros((len(prompts), width), dtype=torch.long)
  mask = torch.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):] = torch.tensor(p)
    mask[i, width - len(p):] = 1
  with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                         max_new_tokens=new, pad_token_id=0).numpy()[:, width:]
  for row, theirs in zip(ours, out):
    assert row == theirs[:len(row)].tolist()
    assert len(row) == new or (row[-1] == cfg.eos_token_id and not theirs[len(row):].any())


@pytest.mark.parametrize("case", list(CASES))
def test_export_and_import_round_trip_bit_exact(case, hf_dirs, tmp_path):
  """Import then export writes every tensor exactly as transformers saved it (norm weights stay
  HF's w, the model scaling by 1 + w), a config that imports to the same ModelConfig, and a
  checkpoint transformers loads to the same logits."""
  cfg, params = load_hf_checkpoint(hf_dirs[case])
  out = export_hf(params, cfg, tmp_path / "out")
  theirs, ours = read_safetensors_dir(hf_dirs[case]), read_safetensors_dir(out)
  assert sorted(ours) == sorted(theirs)
  for name, x in theirs.items():
    assert ours[name].dtype == x.dtype and np.array_equal(ours[name], x), name
  assert cfg.num_params() == transformers.AutoModelForCausalLM.from_pretrained(
      hf_dirs[case]).num_parameters()
  exported = json.loads((out / "config.json").read_text())
  assert model_config_from_hf(exported) == cfg
  assert exported["architectures"] == [CAUSAL_LM[CASES[case][0]]]
  tokens = _tokens(seed=1)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
  original = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[case])
  np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(original, tokens))


def test_gemma_config_fields_and_transformers_defaults():
  """A config.json that omits Gemma's fields gets transformers' class defaults."""
  base = dict(COMMON, num_hidden_layers=4, model_type="gemma2")
  for key in ("head_dim", "num_key_value_heads", "pad_token_id", "eos_token_id", "bos_token_id"):
    base.pop(key)
  cfg = model_config_from_hf(base)
  want = transformers.Gemma2Config(**{k: v for k, v in base.items() if k != "model_type"})
  assert (cfg.resolved_head_dim, cfg.num_kv_heads, cfg.query_pre_attn_scalar,
          cfg.attn_logit_softcap, cfg.final_logit_softcap, cfg.sliding_window, cfg.layer_types,
          cfg.tie_embeddings, cfg.eos_token_id) == (
              want.head_dim, want.num_key_value_heads, want.query_pre_attn_scalar,
              want.attn_logit_softcapping, want.final_logit_softcapping, want.sliding_window,
              tuple(want.layer_types), want.tie_word_embeddings, want.eos_token_id)
  assert (cfg.norm_offset, cfg.mlp_activation, cfg.embed_scale, cfg.post_norms) == (
      1.0, "gelu_tanh", True, True)


def test_what_this_decoder_cannot_compute_is_one_config_error():
  gemma2 = dict(COMMON, num_hidden_layers=2, model_type="gemma2")
  with pytest.raises(ConfigError, match="only its text model is supported.*gemma3_text"):
    model_config_from_hf({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}})
  with pytest.raises(ConfigError, match="hidden_activation='gelu'"):
    model_config_from_hf({**gemma2, "hidden_activation": "gelu"})
  with pytest.raises(ConfigError, match="use_bidirectional_attention"):
    model_config_from_hf({**gemma2, "use_bidirectional_attention": True})
  cfg = model_config_from_hf(gemma2)
  with pytest.raises(ConfigError, match="model.norm_offset=1.0 cannot be exported as llama"):
    hf_config_from_model_config(cfg, "llama")
  llama = cfg.replace(norm_offset=0.0, mlp_activation="silu", embed_scale=False, post_norms=False,
                      hf_architecture="llama")
  with pytest.raises(ConfigError, match="cannot be exported as llama.*export as gemma2"):
    hf_config_from_model_config(llama, "llama")
  with pytest.raises(ConfigError, match="model.norm_offset=0.0 cannot be exported as gemma2"):
    hf_config_from_model_config(llama, "gemma2")


@pytest.mark.parametrize("name", ["gemma3_4b", "qwen3_8b"])
def test_planner_models_have_the_published_shapes(name):
  """The planner's real-size configs export to a config.json whose transformers model (built on
  the meta device: no memory) has exactly the parameters ModelConfig counts."""
  from configs import plan_models  # pylint: disable=import-outside-toplevel
  from research.models.config import ModelConfig  # pylint: disable=import-outside-toplevel
  cfg = ModelConfig.from_dict(getattr(plan_models, name)().to_dict())
  hf = hf_config_from_model_config(cfg)
  assert model_config_from_hf(hf) == cfg.replace(dtype="float32")
  config = transformers.AutoConfig.for_model(**hf)
  with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(config)
  assert model.num_parameters() == cfg.num_params()
  want = {"gemma3_4b": 3_880_263_168, "qwen3_8b": 8_190_735_360}[name]
  assert cfg.num_params() == want
