"""Scaled RoPE (llama3, linear, dynamic, yarn) against transformers: logits past the original
context, bit-exact export/import round trips, cached greedy decoding against `generate`."""

from __future__ import annotations

import json
import pathlib

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gguf_files import write_gguf
from research.errors import ConfigError
from research.interop.gguf_import import load_gguf_checkpoint
from research.interop.gguf_rope import llama3_freq_factors
from research.interop.hf_config import hf_config_from_model_config, model_config_from_hf
from research.interop.hf_export import export_hf
from research.interop.hf_import import load_hf_checkpoint, read_safetensors_dir
from research.interop.hf_rope import rope_fields_from_hf, rope_fields_to_hf
from research.models.config import ModelConfig
from research.models.decoder import Decoder
from research.models.rope import attention_factor, inv_freq
from research.sampling import decode_length_error, greedy_generate

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 96, 48  # SEQ is past every case's original context (16 or 32)
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            initializer_range=0.1, bos_token_id=1, eos_token_id=2)
# case -> (architecture, rope parameters (transformers 5 spelling), max_position_embeddings).
# With head_dim 16 and theta 1e4 the wavelengths are 6.3, 20, 63, ...: llama3's original length 32
# puts one frequency in each of its high, medium and low bands.
CASES = {
    "llama3": ("llama", dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=32), 256),
    "linear": ("llama", dict(rope_type="linear", factor=4.0), 64),
    # dynamic stretches past max_position_embeddings itself (transformers' "original" length).
    "dynamic": ("llama", dict(rope_type="dynamic", factor=4.0), 16),
    "yarn": ("llama", dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16), 64),
    "yarn_qwen2": ("qwen2", dict(rope_type="yarn", factor=4.0,
                                 original_max_position_embeddings=16), 64),
    "yarn_qwen2_attention_factor": ("qwen2", dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=32, attention_factor=0.9,
        beta_fast=16.0, beta_slow=2.0), 128),
    "yarn_mscale_untruncated": ("llama", dict(
        rope_type="yarn", factor=8.0, original_max_position_embeddings=16, mscale=1.0,
        mscale_all_dim=0.5, truncate=False), 128),
}
_CONFIG_CLASSES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config"}


def _hf_model(case: str, seed: int = 0):
  arch, rope, max_positions = CASES[case]
  cls = getattr(transformers, _CONFIG_CLASSES[arch])
  config = cls(**BASE, max_position_embeddings=max_positions,
               rope_parameters={**rope, "rope_theta": 10000.0})
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():  # random norms and biases, so their mapping is tested too
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
  return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
  root = tmp_path_factory.mktemp("rope")
  out = {}
  for seed, case in enumerate(CASES):
    _hf_model(case, seed).save_pretrained(root / case)
    out[case] = root / case
  return out


def _batch(seed: int = 0):
  """Two rows of SEQ tokens; the second left-padded by 5 (positions start after the padding)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, VOCAB, (2, SEQ)).astype(np.int32)
  mask = np.ones((2, SEQ), np.int32)
  mask[1, :5] = 0
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
  return tokens, mask, positions


def _fresh(hf_dir: pathlib.Path):
  # A newly loaded model: transformers' dynamic rope remembers the longest call it has seen.
  return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_past_the_original_context(case, hf_dirs):
  cfg, params = load_hf_checkpoint(hf_dirs[case])
  assert dict(cfg.rope_scaling)["rope_type"] == CASES[case][1]["rope_type"]
  hf_model = _fresh(hf_dirs[case])
  tokens, mask, positions = _batch()
  with torch.no_grad():
    theirs = hf_model(input_ids=torch.from_numpy(tokens).long(),
                      attention_mask=torch.from_numpy(mask).long(),
                      position_ids=torch.from_numpy(positions).long()).logits.numpy()
  ours, _ = Decoder(cfg).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask),
                               jnp.asarray(positions))
  real = mask.astype(bool)
  diff = np.abs(np.asarray(ours)[real] - theirs[real]).max()
  assert diff < 1e-4, f"max abs logit difference {diff}"
  # The tables themselves: transformers' inv_freq (after that call) and attention factor.
  rotary = hf_model.model.rotary_emb
  ours_inv = inv_freq(16, cfg.rope_theta, dict(cfg.rope_scaling), cfg.max_position_embeddings,
                      jnp.asarray(positions))
  np.testing.assert_allclose(np.asarray(ours_inv), rotary.inv_freq.numpy(), rtol=1e-6)
  assert attention_factor(dict(cfg.rope_scaling)) == rotary.attention_scaling


@pytest.mark.parametrize("case", list(CASES))
def test_export_import_round_trip_is_bit_exact(case, hf_dirs, tmp_path):
  cfg, params = load_hf_checkpoint(hf_dirs[case])
  out = export_hf(params, cfg, tmp_path / "out")
  src, back = read_safetensors_dir(hf_dirs[case]), read_safetensors_dir(out)
  assert sorted(src) == sorted(back)
  assert all(np.array_equal(src[n], back[n]) for n in src)
  exported = json.loads((out / "config.json").read_text())
  assert model_config_from_hf(exported) == cfg
  # transformers 5 reads the same rope parameters as it saved in the source dir.
  source = transformers.AutoConfig.from_pretrained(hf_dirs[case]).rope_parameters
  assert transformers.AutoConfig.from_pretrained(out).rope_parameters == source
  # Either spelling alone gives the same config: 4.x (rope_scaling + rope_theta) and 5.x.
  v4 = {k: v for k, v in exported.items() if k != "rope_parameters"}
  v5 = {k: v for k, v in exported.items() if k not in ("rope_scaling", "rope_theta")}
  assert model_config_from_hf(v4) == model_config_from_hf(v5) == cfg
  assert set(v4["rope_scaling"]) == set(CASES[case][1])  # no rope_theta inside: 4.x's layout


@pytest.mark.parametrize("case", ["llama3", "dynamic"])
def test_cached_greedy_decoding_matches_generate(case, hf_dirs):
  """Prompts shorter than the original context, decoded well past it: for dynamic, every step
  past max_position_embeddings recomputes the base from its own position."""
  cfg, params = load_hf_checkpoint(hf_dirs[case])
  prompts = [[5, 17, 33, 8, 41, 12, 9, 70, 3, 22], [61, 7, 19, 4, 88, 50]]
  new = 40  # 50 positions: past 16 (dynamic) and 32 (llama3)
  ours = greedy_generate(params, cfg, prompts, max_new_tokens=new, pad_id=0)
  hf_model = _fresh(hf_dirs[case])
  width = max(map(len, prompts))
  ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  with torch.no_grad():
    theirs = hf_model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                               max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                               eos_token_id=None)
  assert ours == theirs[:, width:].tolist()


def test_dynamic_is_plain_within_the_original_context():
  positions = jnp.arange(12)[None]
  scaling = {"rope_type": "dynamic", "factor": 4.0}
  np.testing.assert_array_equal(np.asarray(inv_freq(16, 1e4, scaling, 16, positions)),
                                np.asarray(inv_freq(16, 1e4)))
  longer = inv_freq(16, 1e4, scaling, 16, jnp.arange(40)[None])
  assert np.all(np.asarray(longer)[1:] < np.asarray(inv_freq(16, 1e4))[1:])


def test_dynamic_may_decode_past_max_position_embeddings():
  plain = ModelConfig(max_position_embeddings=16)
  assert "at most 6 new tokens" in decode_length_error(plain, 1, 10, 10, 40, None)
  dynamic = plain.replace(rope_scaling={"rope_type": "dynamic", "factor": 4.0})
  assert decode_length_error(dynamic, 1, 10, 10, 40, None) is None


def test_model_config_validation_names_the_key():
  ok = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)
  cfg = ModelConfig(rope_scaling={**ok, "beta_fast": 16})
  assert cfg.rope_scaling[0] == ("rope_type", "yarn")  # rope_type first, then by key
  assert ModelConfig(rope_scaling=list(reversed(cfg.rope_scaling))) == cfg
  # model_config.json: the pairs become lists of lists and come back as the same config.
  assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  bad = {
      "rope_scaling.rope_type='longrope'": {"rope_type": "longrope", "factor": 2.0},
      "rope_scaling.rope_type=None": {"factor": 2.0},
      "rope_scaling.original_max_position_embeddings is missing": {"rope_type": "yarn",
                                                                   "factor": 2.0},
      "rope_scaling.low_freq_factor is missing": {"rope_type": "llama3", "factor": 8.0,
                                                 "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 16},
      "rope_scaling.factor must be a number >= 1": {"rope_type": "linear", "factor": 0.5},
      "rope_scaling.mscale is not a 'linear' parameter": {"rope_type": "linear", "factor": 2.0,
                                                           "mscale": 1.0},
      "rope_scaling.truncate must be true or false": {**ok, "truncate": "yes"},
      "rope_scaling must be a dict": "yarn",
  }
  for message, scaling in bad.items():
    with pytest.raises(ConfigError, match=r"model\." + message.replace("(", r"\(")):
      ModelConfig(rope_scaling=scaling)


def _llama_json(**rope) -> dict:
  return {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
          "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": VOCAB,
          "max_position_embeddings": 64, **rope}


def test_import_spellings_and_defaults():
  v4 = _llama_json(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2})
  v5 = _llama_json(rope_parameters={"rope_type": "linear", "factor": 2, "rope_theta": 5e5})
  assert model_config_from_hf(v4) == model_config_from_hf(v5)
  assert model_config_from_hf(v4).rope_theta == 5e5
  # transformers 5 takes rope_scaling over rope_parameters, and a dict's rope_theta over the
  # top-level one.
  both = _llama_json(rope_theta=1.0, rope_scaling={"rope_type": "linear", "factor": 3.0,
                                                  "rope_theta": 7e4},
                     rope_parameters={"rope_type": "default", "rope_theta": 9.0})
  assert rope_fields_from_hf(both)["rope_theta"] == 7e4
  assert dict(model_config_from_hf(both).rope_scaling)["factor"] == 3.0
  # original_max_position_embeddings defaults to max_position_embeddings, as transformers does;
  # a yarn factor of null is their ratio.
  yarn = rope_fields_from_hf(_llama_json(rope_scaling={
      "rope_type": "yarn", "factor": None, "original_max_position_embeddings": 16}))
  assert yarn["rope_scaling"]["factor"] == 4.0
  llama3 = rope_fields_from_hf(_llama_json(rope_scaling={
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}))
  assert llama3["rope_scaling"]["original_max_position_embeddings"] == 64
  assert rope_fields_from_hf(_llama_json(rope_scaling={"rope_type": "default"}))[
      "rope_scaling"] is None


def test_import_refusals_are_one_line():
  refusals = {
      r"rope_scaling\.rope_type='longrope' is not supported \(transformers has it": {
          "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8,
                           "long_factor": [2.0] * 8, "original_max_position_embeddings": 16}},
      r"rope_parameters\.rope_type='ntk-by-parts' is not supported \(unknown": {
          "rope_parameters": {"rope_type": "ntk-by-parts", "factor": 2.0}},
      r"partial_rotary_factor=0\.5": {"partial_rotary_factor": 0.5},
      r"rope_scaling\.factor must be a number >= 1": {
          "rope_scaling": {"rope_type": "linear", "factor": "2"}},
  }
  for message, fields in refusals.items():
    with pytest.raises(ConfigError, match=message) as e:
      model_config_from_hf(_llama_json(**fields))
    assert "\n" not in str(e.value)


def test_per_layer_type_rope_gemma3_spellings():
  """Gemma 3: transformers 5 nests by layer type; 4.x has rope_scaling (full layers) and
  rope_local_base_freq (sliding layers)."""
  full = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
  v5 = {"model_type": "gemma3_text", "max_position_embeddings": 64, "rope_parameters": {
      "full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
  v4 = {"model_type": "gemma3_text", "max_position_embeddings": 64, "rope_theta": 1e6,
        "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
  want = {"rope_theta": 1e6, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
          "rope_local_theta": 1e4}
  assert rope_fields_from_hf(v5) == rope_fields_from_hf(v4) == want
  # Neither spelling given: Gemma3TextConfig's defaults (1e6 global, 1e4 local).
  assert rope_fields_from_hf({"model_type": "gemma3_text"}) == {
      "rope_theta": 1e6, "rope_scaling": None, "rope_local_theta": 1e4}
  cfg = ModelConfig(rope_theta=1e6, rope_local_theta=1e4, rope_scaling=want["rope_scaling"])
  written = rope_fields_to_hf(cfg, "gemma3_text")
  assert written["rope_parameters"] == v5["rope_parameters"]
  assert written["rope_local_base_freq"] == 1e4 and written["rope_scaling"]["factor"] == 8.0
  for spelling in (written, {k: v for k, v in written.items() if k != "rope_parameters"}):
    assert rope_fields_from_hf({"model_type": "gemma3_text", **spelling}) == want
  # transformers' own config class reads what is written to the same rope parameters.
  hf = transformers.Gemma3TextConfig(**written)
  assert hf.rope_parameters["full_attention"] == full
  assert hf.rope_parameters["sliding_attention"] == v5["rope_parameters"]["sliding_attention"]
  with pytest.raises(ConfigError, match="sliding_attention.rope_type='linear'"):
    rope_fields_from_hf({"model_type": "gemma3_text", "rope_parameters": {
        "full_attention": full, "sliding_attention": full}})
  with pytest.raises(ConfigError, match="rope_local_theta=10000.0 cannot be exported as llama"):
    hf_config_from_model_config(cfg, architecture="llama")


# GGUF: llama.cpp's rope scaling metadata. transformers' GGUF loader drops it (plain RoPE), so the
# reference is transformers with the GGUF's weights and the HF config the metadata stands for.
_LLAMA3_32 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=32)
GGUF_CASES = {  # case -> (arch, write_gguf extras, the HF rope parameters they mean)
    "llama3_rope_freqs": ("llama", dict(
        extra_tensors={"rope_freqs.weight": llama3_freq_factors(1e4, 16, 8.0, 1.0, 4.0, 32)},
        extra_fields={"add_rope_scaling_orig_ctx_len": 32}), _LLAMA3_32),
    "linear": ("llama", dict(extra_fields={
        "add_rope_scaling_type": gguf.RopeScalingType.LINEAR, "add_rope_scaling_factor": 4.0}),
        dict(rope_type="linear", factor=4.0)),
    "qwen2_yarn": ("qwen2", dict(extra_fields={
        "add_rope_scaling_type": gguf.RopeScalingType.YARN, "add_rope_scaling_factor": 4.0,
        "add_rope_scaling_orig_ctx_len": 16}),
        dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_rope_scaling_matches_transformers_with_the_hf_config(case, tmp_path):
  arch, extras, rope = GGUF_CASES[case]
  path = write_gguf(tmp_path / f"{case}.gguf", arch=arch, rope_theta=1e4, **extras)
  cfg, params = load_gguf_checkpoint(path)
  assert dict(cfg.rope_scaling) == rope
  hf_config = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
  plain = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
  hf_config.rope_parameters = {**rope, "rope_theta": 1e4}
  scaled = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, gguf_file=path.name, config=hf_config, dtype=torch.float32).eval()
  tokens, mask, positions = _batch()
  ours, _ = Decoder(cfg).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask),
                               jnp.asarray(positions))
  real = mask.astype(bool)
  for model, agrees in ((scaled, True), (plain, False)):
    with torch.no_grad():
      theirs = model(input_ids=torch.from_numpy(tokens).long(),
                     attention_mask=torch.from_numpy(mask).long(),
                     position_ids=torch.from_numpy(positions).long()).logits.numpy()
    diff = np.abs(np.asarray(ours)[real] - theirs[real]).max()
    assert (diff < 1e-4) == agrees, f"max abs logit difference {diff} (scaled: {agrees})"


def test_gguf_rope_refusals_are_one_line(tmp_path):
  refusals = {
      r"llama\.rope\.scaling\.type='longrope'; transformers' GGUF loader ignores it": dict(
          extra_fields={"add_rope_scaling_type": gguf.RopeScalingType.LONGROPE,
                        "add_rope_scaling_factor": 4.0}),
      r"llama\.rope\.scaling\.attn_factor=0\.5": dict(extra_fields={
          "add_rope_scaling_type": gguf.RopeScalingType.YARN, "add_rope_scaling_factor": 4.0,
          "add_rope_scaling_attn_factors": 0.5}),
      r"rope_freqs\.weight is not llama3 rope scaling with factor 2\.0": dict(
          extra_tensors={"rope_freqs.weight": np.full(8, 2.0, np.float32)}),
  }
  for i, (message, extras) in enumerate(refusals.items()):
    with pytest.raises(ConfigError, match=message) as e:
      load_gguf_checkpoint(write_gguf(tmp_path / f"{i}.gguf", **extras))
    assert "\n" not in str(e.value)
