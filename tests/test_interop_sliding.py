"""Sliding windows and Qwen3 against transformers: tiny Mistral (every layer slides), Qwen2 (the
layers from max_window_layers on), Qwen3 with and without sliding layers; logits over sequences
longer than the window (scanned and unrolled), bit-exact export round trips, greedy generation past
the window, and published configs (shapes shrunk, tests/data/hf_configs) importing to their logits."""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from research.interop.hf_config import hf_config_from_model_config, model_config_from_hf
from research.interop.hf_export import export_hf
from research.interop.hf_import import load_hf_checkpoint, read_safetensors_dir
from research.models.decoder import Decoder, unstack_layers
from research.sampling import greedy_generate

transformers = pytest.importorskip("transformers")

VOCAB = 96
WINDOW = 8
T = 40
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
SLIDE, FULL = "sliding_attention", "full_attention"
CASES = {  # case: (architecture, config overrides, the layers transformers slides)
    "mistral_window": ("mistral", dict(sliding_window=WINDOW), (True, True, True)),
    "qwen2_max_window_layers": ("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW,
                                              max_window_layers=1), (False, True, True)),
    "qwen3_alternating": ("qwen3", dict(use_sliding_window=True, sliding_window=WINDOW,
                                        head_dim=24, layer_types=[SLIDE, FULL, SLIDE]),
                          (True, False, True)),
    "qwen3_full": ("qwen3", dict(head_dim=24, tie_word_embeddings=True), (False, False, False)),
}
_CONFIG_CLASSES = {"qwen2": "Qwen2Config", "mistral": "MistralConfig", "qwen3": "Qwen3Config"}
DATA = pathlib.Path(__file__).parent / "data" / "hf_configs"


def _randomize_(model: torch.nn.Module, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
      else:  # larger weights than init's: attention far from uniform, so the window matters
        p.mul_(4.0)


def _save(config, root: pathlib.Path, seed: int) -> pathlib.Path:
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config)
  _randomize_(model, seed)
  model.save_pretrained(root, safe_serialization=True)
  return root


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
  root = tmp_path_factory.mktemp("hf_sliding")
  out = {}
  for seed, (case, (arch, overrides, _)) in enumerate(CASES.items()):
    config = getattr(transformers, _CONFIG_CLASSES[arch])(**{**BASE, **overrides})
    out[case] = _save(config, root / case, seed)
  return out


def _batch(vocab: int, t: int = T):
  """Row 0 whole, row 1 left padded by 5, row 2 right padded by 6."""
  tokens = np.random.default_rng(0).integers(3, vocab, (3, t)).astype(np.int32)
  mask = np.ones((3, t), np.int32)
  mask[1, :5] = 0
  mask[2, -6:] = 0
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
  return tokens, mask, positions


def _hf_logits(model, tokens, mask, positions) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(tokens).long(),
                 attention_mask=torch.from_numpy(mask).long(),
                 position_ids=torch.from_numpy(positions).long()).logits.float().numpy()


def _our_logits(cfg, params, tokens, mask, positions) -> np.ndarray:
  return np.asarray(Decoder(cfg).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask),
                                       jnp.asarray(positions))[0])


def _assert_close(ours, theirs, mask, atol=1e-4):
  real = mask.astype(bool)
  diff = np.abs(ours[real] - theirs[real]).max()
  assert diff < atol, f"max abs logit difference {diff}"


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers_scanned_and_unrolled_and_round_trip(case, hf_dirs, tmp_path):
  arch, _, slides = CASES[case]
  cfg, params = load_hf_checkpoint(hf_dirs[case])
  assert cfg.hf_architecture == arch and cfg.sliding_layers() == slides
  assert cfg.qk_norm == (arch == "qwen3")
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[case], dtype=torch.float32)
  assert [t == SLIDE for t in getattr(hf_model.config, "layer_types", [SLIDE] * 3)] == \
      list(slides) or arch == "mistral"
  tokens, mask, positions = _batch(cfg.vocab_size)
  theirs = _hf_logits(hf_model, tokens, mask, positions)
  _assert_close(_our_logits(cfg, params, tokens, mask, positions), theirs, mask)
  unrolled = cfg.replace(scan_layers=False, attention="reference")
  _assert_close(_our_logits(unrolled, unstack_layers(params, cfg.num_layers), tokens, mask,
                            positions), theirs, mask)
  if any(slides):  # the window binds: full attention gives other logits
    full = cfg.replace(sliding_window=None, layer_types=None)
    assert np.abs(_our_logits(full, params, tokens, mask, positions) - theirs)[mask == 1].max() > 1e-3

  export_hf(params, cfg, tmp_path / "out")
  exported = json.loads((tmp_path / "out" / "config.json").read_text())
  assert exported["model_type"] == arch
  src, out = read_safetensors_dir(hf_dirs[case]), read_safetensors_dir(tmp_path / "out")
  assert sorted(src) == sorted(out)
  assert all(np.array_equal(src[n], out[n]) for n in src)
  assert model_config_from_hf(exported, param_dtype=cfg.param_dtype) == cfg
  again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
  _assert_close(_hf_logits(again, tokens, mask, positions), theirs, mask, atol=1e-6)


@pytest.mark.parametrize("case", ["mistral_window", "qwen2_max_window_layers", "qwen3_alternating"])
def test_greedy_generation_past_the_window_equals_transformers(case, hf_dirs):
  """A left-padded batch (prompts of 10 and 6 tokens) generating 12 tokens each: both run past
  the window of 8 with the prompt's first tokens outside it."""
  cfg, params = load_hf_checkpoint(hf_dirs[case])
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[case], dtype=torch.float32)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(3, VOCAB, 10).tolist(), rng.integers(3, VOCAB, 6).tolist()]
  ours = greedy_generate(params, cfg, prompts, 12, pad_id=0, eos_id=None)
  ids = np.zeros((2, 10), np.int64)
  mask = np.zeros((2, 10), np.int64)
  for i, p in enumerate(prompts):
    ids[i, 10 - len(p):], mask[i, 10 - len(p):] = p, 1
  with torch.no_grad():
    out = hf_model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                            do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0,
                            eos_token_id=None)
  assert ours == out[:, 10:].tolist()


@pytest.mark.parametrize("name", ["mistral-7b-v0.1.json", "qwen3-8b.json"])
def test_published_configs_import_and_give_transformers_logits(name, tmp_path):
  d = json.loads((DATA / name).read_text())
  cfg = model_config_from_hf(d)
  if d["model_type"] == "mistral":
    assert cfg.sliding_window == 4096 and cfg.sliding_layers() == (True,) * cfg.num_layers
  else:
    assert cfg.sliding_window is None and cfg.qk_norm and cfg.resolved_head_dim == d["head_dim"]
  config = transformers.AutoConfig.for_model(**d)
  hf_dir = _save(config, tmp_path / "hf", seed=3)
  cfg, params = load_hf_checkpoint(hf_dir)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  tokens, mask, positions = _batch(cfg.vocab_size, t=12)
  _assert_close(_our_logits(cfg, params, tokens, mask, positions),
                _hf_logits(hf_model, tokens, mask, positions), mask)


def test_exporting_a_window_an_architecture_cannot_hold_is_one_config_error():
  from research.errors import ConfigError
  cfg = model_config_from_hf(json.loads((DATA / "mistral-7b-v0.1.json").read_text()))
  with pytest.raises(ConfigError, match="cannot be exported as llama.*architecture='mistral'"):
    hf_config_from_model_config(cfg, architecture="llama")
  mixed = cfg.replace(layer_types=(SLIDE, FULL), hf_architecture=None)
  with pytest.raises(ConfigError, match="mixes sliding and full.*'qwen2'"):
    hf_config_from_model_config(mixed, architecture="mistral")
  assert hf_config_from_model_config(mixed)["model_type"] == "qwen2"
  with pytest.raises(ConfigError, match="qk_norm=True cannot be exported as qwen2"):
    hf_config_from_model_config(cfg.replace(qk_norm=True), architecture="qwen2")
